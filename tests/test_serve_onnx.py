"""`tokenskip serve --onnx DIR` as a user runs it: a real subprocess on 127.0.0.1 serving an ONNX
export of the tiny model (static router, uneven schedule, kv_policy=skip) on ONNX Runtime,
answered through the official `openai` client, then stopped."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
openai = pytest.importorskip("openai")

from tokenskip.deploy.runtime.generation import Sampling, generate_tokens, left_pad  # noqa: E402

from conftest import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_llama  # noqa: E402

SCHEDULE = (0.0, 0.5, 0.3, 0.6)
START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from tokenskip.config import build_routed
    from tokenskip.export.exporter import export_model
    from tokenskip.models import load_model
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import StaticRouter
    from tokenskip.schedule import Schedule

    folder = tmp_path_factory.mktemp("tiny-onnx-model")
    make_tiny_llama(folder, seed=1)
    make_char_tokenizer(folder, vocab_size=256, chat_template=CHAT_TEMPLATE)
    lm = load_model(str(folder))
    _, cfg = build_routed(lm.model, router="static", sparsity=0.3, model_name=str(folder))
    cfg.schedule = list(SCHEDULE)
    routed = RoutedModel(lm.model, Schedule(SCHEDULE), StaticRouter())
    out = tmp_path_factory.mktemp("tiny-onnx") / "export"
    export_model(lm, routed, cfg, out, max_seq_len=128, check=False)
    return out


@pytest.fixture(scope="module")
def ort(tiny_onnx):
    from tokenskip.deploy.runtime.ort_backend import OrtBackend
    from transformers import AutoTokenizer

    return OrtBackend(tiny_onnx, threads=1), AutoTokenizer.from_pretrained(str(tiny_onnx / "tokenizer"))


@pytest.fixture(scope="module")
def served(tiny_onnx):
    """`tokenskip serve --onnx DIR --port 0` in a subprocess; yields its base URL."""
    from tokenskip.deploy.serve.runner import ServerProcess

    with ServerProcess(["--onnx", str(tiny_onnx), "--threads", "1", "--max-batch", "8", "--log-level", "warning"],
                       timeout=START_TIMEOUT_S) as server:
        yield server.url


def greedy(ort, ids, n):
    backend, tok = ort
    return generate_tokens(backend, [ids], Sampling(n), pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id]).tokens[0]


def test_serve_onnx_answers_the_openai_client(served, ort):
    backend, tok = ort
    c = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "Tokens skip blocks"
    want = tok.decode(greedy(ort, tok(prompt)["input_ids"], 24), skip_special_tokens=True)
    r = c.completions.create(model="export", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == want
    streamed = c.completions.create(model="export", prompt=prompt, max_tokens=24, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == want
    messages = [{"role": "user", "content": "hello"}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    want = tok.decode(greedy(ort, ids, 16), skip_special_tokens=True)
    chat = c.chat.completions.create(model="export", messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == want
    streamed = c.chat.completions.create(model="export", messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == want
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        c.completions.create(model="export", prompt="x" * 100, max_tokens=40)


def test_serve_onnx_batches_equal_length_prompts_exactly(served, ort):
    """Concurrent requests share ORT prefill and decode batches (numpy cache rows stacked and
    dropped); prompts of one length need no padding, so even routed rows equal their lone runs."""
    _, tok = ort
    prompts = [f"prompt number {i:02d}" for i in range(8)]
    want = [tok.decode(greedy(ort, tok(p)["input_ids"], 10 + i), skip_special_tokens=True)
            for i, p in enumerate(prompts)]

    async def main():
        async with openai.AsyncOpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=60) as ac:
            async def one(i):
                r = await ac.completions.create(model="export", prompt=prompts[i], max_tokens=10 + i, temperature=0)
                return r.choices[0].text
            return await asyncio.gather(*[one(i) for i in range(len(prompts))])

    assert asyncio.run(main()) == want
    from prometheus_client.parser import text_string_to_metric_families

    values = {(s.name, s.labels.get("outcome", "")): s.value
              for f in text_string_to_metric_families(httpx.get(served + "/metrics").text) for s in f.samples}
    assert values[("tokenskip_routed_blocks", "")] == 3
    assert values[("tokenskip_prefill_token_blocks_total", "skipped")] > 0
    assert values[("tokenskip_prefill_batch_size_count", "")] < len(prompts) + 6  # some prefills were shared


def test_ort_cache_bytes_equal_the_analytic_count(ort):
    from tokenskip.deploy.serve.model_info import model_info

    backend, tok = ort
    info = model_info(backend, "export")
    ids = tok("a prompt of some length")["input_ids"]
    _, cache = backend.prefill(*left_pad([ids], tok.pad_token_id))
    assert backend.cache_nbytes(cache) == info.kv_bytes(len(ids), 0)
    _, cache = backend.decode(torch.tensor([[5]]), torch.tensor([[len(ids)]]), cache)
    assert backend.cache_nbytes(cache) == info.kv_bytes(len(ids), 1)
    dense_info = model_info(backend, "export")
    dense_info.schedule = None
    assert info.kv_bytes(len(ids), 1) < dense_info.kv_bytes(len(ids), 1)


def test_triton_repository_holds_loadable_graphs_matching_its_configs(tiny_onnx, ort, tmp_path):
    """Triton cannot run here (docs/serving.md): what can be checked is that the model folder's
    files load in ONNX Runtime (the runtime of Triton's onnxruntime backend) from where Triton
    would load them, that config.pbtxt declares exactly their inputs and outputs, and that a
    prefill call there (empty past) computes what the export computes."""
    import re

    import numpy as np

    from tokenskip.deploy.runtime.ort_backend import ort_session
    from tokenskip.deploy.serve.cli import triton_repo

    from click.testing import CliRunner

    res = CliRunner().invoke(triton_repo, [str(tiny_onnx), "--out", str(tmp_path / "repo"), "--name", "tiny"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["tiny"]  # one graph, one model
    types = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32", "tensor(bool)": "TYPE_BOOL"}
    folder = tmp_path / "repo" / "tiny"
    cfg = (folder / "config.pbtxt").read_text()
    assert 'name: "tiny"' in cfg and 'backend: "onnxruntime"' in cfg and "max_batch_size: 0" in cfg
    filename = re.search(r'default_model_filename: "([^"]+)"', cfg).group(1)
    session = ort_session(folder / "1" / filename, threads=1)
    declared = re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[ ([^\]]*) \]', cfg)
    actual = [(v.name, types[v.type], ", ".join(str(d) if isinstance(d, int) else "-1" for d in v.shape))
              for v in (*session.get_inputs(), *session.get_outputs())]
    assert declared == actual
    backend, tok = ort
    ids, mask = left_pad([tok("triton")["input_ids"]], tok.pad_token_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    for v in session.get_inputs():
        if v.name.startswith("past."):  # an empty past: sequence-major, length 0
            dims = [0, 1] + [d for d in v.shape[2:]]
            feeds[v.name] = np.zeros(dims, dtype={"tensor(float)": np.float32, "tensor(int64)": np.int64,
                                                  "tensor(bool)": np.bool_}[v.type])
    logits = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits.reshape(1, -1), backend.prefill(ids, mask)[0].numpy(), atol=1e-5)
    again = CliRunner().invoke(triton_repo, [str(tiny_onnx), "--out", str(tmp_path / "repo")])
    assert again.exit_code == 1 and "not empty" in again.output
    rtx = tmp_path / "rtx-engine"
    rtx.mkdir()
    (rtx / "engine.json").write_text('{"backend": "tensorrt-rtx"}')
    bad = CliRunner().invoke(triton_repo, [str(tiny_onnx), "--out", str(tmp_path / "r2"), "--engine", str(rtx)])
    assert bad.exit_code == 1 and "full TensorRT" in bad.output and not (tmp_path / "r2").exists()
