"""Deploy: generation loop, cached decode, sampling, batching, threshold-skip, CLI errors, decode
quality and benchmarks, on a tiny random Llama (fast). Real-model checks are marked slow."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tokenskip.config import RoutingConfig, build_routed, save_routing
from tokenskip.deploy.runtime.torch_backend import TorchBackend
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens, left_pad, sample
from tokenskip.flops import flops_ratio
from tokenskip.routers import LearnedRouter

from conftest import make_char_tokenizer, make_tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_deploy):
    """(model, folder): tiny random Llama + char tokenizer, loadable with --model <folder>."""
    return tiny_deploy


class Recorder:
    """Wraps a backend and keeps every logits row it returns (prefill, then each decode step)."""

    def __init__(self, inner):
        self.inner, self.logits = inner, []

    def __getattr__(self, name):  # check_length, expect_new_tokens, stats, ...
        return getattr(self.inner, name)

    def prefill(self, ids, mask):
        logits, cache = self.inner.prefill(ids, mask)
        self.logits.append(logits)
        return logits, cache

    def decode(self, token, position, cache):
        logits, cache = self.inner.decode(token, position, cache)
        self.logits.append(logits)
        return logits, cache


PROMPTS = [[5, 9, 17, 3, 44, 8, 21, 60, 2, 7, 19, 33, 12, 4, 80, 6, 11, 70, 25, 9, 14, 3, 50, 41, 23, 8],
           [40, 2, 77, 31, 9, 10, 58, 61, 3, 22, 15, 90, 7, 1, 5, 66, 13]]


# ------------------------------------------------------------------------------ cached decode
@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
@pytest.mark.parametrize("router", ["static", "random"])
def test_cached_decode_equals_full_recompute(tiny, kv_policy, router):
    """Routed prefill + cached decode (ragged per-layer caches) gives the same logits as recomputing
    the whole sequence with the continuation force-kept (RoutedModel n_tail), left padding included."""
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import make_router
    from tokenskip.schedule import Schedule

    model, _ = tiny
    routed = RoutedModel(model, Schedule((0.0, 0.5, 0.3, 0.6)), make_router(router, 3), kv_policy=kv_policy)
    prompts = PROMPTS if router == "static" else PROMPTS[:1]  # random noise depends on the batch shape
    n = 8
    rec = Recorder(TorchBackend(routed))
    gen = generate_tokens(rec, prompts, Sampling(max_new_tokens=n), pad_id=0)
    if kv_policy == "skip":  # the ragged caches really are ragged
        lengths = {kv.length for kv in gen_cache_lengths(routed, prompts)}
        assert len(lengths) > 1
    full = [p + g[:-1] for p, g in zip(prompts, gen.tokens)]
    ids, mask = left_pad(full, 0)
    with torch.no_grad():
        ref = routed(ids, mask, n_tail=n - 1, num_logits=n).logits  # [B,n,V]
    got = torch.stack(rec.logits, 1)  # [B,n,V]
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)


def gen_cache_lengths(routed, prompts):
    ids, mask = left_pad(prompts, 0)
    with torch.no_grad():
        _, cache = routed.prefill(ids, mask)
    return cache


def test_dense_generation_equals_hf_generate(tiny):
    model, _ = tiny
    routed, _ = build_routed(model, router="dense")
    gen = generate_tokens(TorchBackend(routed), PROMPTS[:1], Sampling(max_new_tokens=12), pad_id=0)
    with torch.no_grad():
        hf = model.generate(torch.tensor(PROMPTS[:1]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
    assert gen.tokens[0] == hf[0, len(PROMPTS[0]):].tolist()


# ----------------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_deterministic(tiny):
    model, _ = tiny
    routed, _ = build_routed(model, router="static", sparsity=0.3)
    backend = TorchBackend(routed)

    def run(seed, top_p=0.9):
        return generate_tokens(backend, PROMPTS, Sampling(16, temperature=1.0, top_p=top_p, seed=seed), pad_id=0).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)
    greedy = generate_tokens(backend, PROMPTS, Sampling(16), pad_id=0).tokens
    assert run(7, top_p=1e-6) == greedy  # a vanishing nucleus is greedy


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(1)]
    seen = {int(sample(logits, Sampling(temperature=1.0, top_p=0.7), gens)) for _ in range(200)}
    assert seen == {0, 1}  # p = .67, .24, .09: the first two reach 0.7


@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_batch_left_padding_equals_per_sample(tiny, kv_policy):
    """Dense: a left-padded batch gives each prompt's own tokens. Routed: a row gives the same tokens
    as alone with the same padding (k follows the padded length, so rows never interact)."""
    model, _ = tiny
    dense, _ = build_routed(model, router="dense", kv_policy=kv_policy)
    routed, _ = build_routed(model, router="static", sparsity=0.3, kv_policy=kv_policy)
    sampling = Sampling(10, temperature=0.7, seed=5)
    batch = generate_tokens(TorchBackend(dense), PROMPTS, sampling, pad_id=0).tokens
    for i, p in enumerate(PROMPTS):
        assert batch[i] == generate_tokens(TorchBackend(dense), [p], sampling, pad_id=0, seed_offsets=[i]).tokens[0]
    seq = max(len(p) for p in PROMPTS)
    batch = generate_tokens(TorchBackend(routed), PROMPTS, sampling, pad_id=0).tokens
    for i, p in enumerate(PROMPTS):
        ids, mask = left_pad([p], 0)
        pad = seq - len(p)
        padded = Recorder(TorchBackend(routed))
        # run the lone prompt with the batch's left padding
        padded.prefill = lambda _ids, _mask, inner=padded.inner, pad=pad, ids=ids, mask=mask: inner.prefill(
            torch.nn.functional.pad(ids, (pad, 0)), torch.nn.functional.pad(mask, (pad, 0)))
        assert batch[i] == generate_tokens(padded, [p], sampling, pad_id=0, seed_offsets=[i]).tokens[0]


def test_eos_stops_a_row(tiny):
    model, _ = tiny
    routed, _ = build_routed(model, router="dense")
    first = generate_tokens(TorchBackend(routed), PROMPTS, Sampling(6), pad_id=0).tokens
    eos = first[0][2]
    gen = generate_tokens(TorchBackend(routed), PROMPTS, Sampling(6), pad_id=0, eos_ids=[eos]).tokens
    assert gen[0] == first[0][:first[0].index(eos) + 1]


# ----------------------------------------------------------------------------- threshold skip
def learned_routers_dir(model, path, bias: float, sparsity: float = 0.4):
    routed, cfg = build_routed(model, router="static", sparsity=sparsity)
    router = LearnedRouter()
    torch.nn.init.normal_(router.mlp[2].weight, std=0.5, generator=torch.Generator().manual_seed(0))
    torch.nn.init.constant_(router.mlp[2].bias, bias)
    cfg = RoutingConfig(model=str(path.parent), num_layers=cfg.num_layers, router="learned", schedule=cfg.schedule,
                        model_type="llama", hidden_size=model.config.hidden_size)
    path.mkdir(parents=True, exist_ok=True)
    save_routing(path, cfg, router)
    return path


@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_threshold_skip(tiny, tmp_path, kv_policy):
    model, folder = tiny
    prompt = PROMPTS[:1]
    # a router that always keeps: identical to ordinary decode
    keep_dir = learned_routers_dir(model, tmp_path / "keep", bias=100.0)
    routed, _ = build_routed(model, routers_dir=keep_dir, kv_policy=kv_policy)
    plain = generate_tokens(TorchBackend(routed), prompt, Sampling(8), pad_id=0).tokens
    ts = TorchBackend(routed, threshold_skip=True)
    assert generate_tokens(ts, prompt, Sampling(8), pad_id=0).tokens == plain
    assert ts.stats["skipped_blocks"] == 0 and ts.stats["decode_tokens"] == 7
    # a router that always skips: routed blocks never run for generated tokens
    skip_dir = learned_routers_dir(model, tmp_path / "skip", bias=-100.0)
    routed, _ = build_routed(model, routers_dir=skip_dir, kv_policy=kv_policy)
    ts = TorchBackend(routed, threshold_skip=True)
    gen = generate_tokens(ts, prompt, Sampling(8), pad_id=0)
    assert ts.stats["skipped_blocks"] == ts.stats["routed_block_visits"] > 0
    # equal to a model whose routed blocks are removed for decode (prefill unchanged)
    from tokenskip.routed import RoutedModel

    ids, mask = left_pad(prompt, 0)
    with torch.no_grad():
        logits, cache = routed.prefill(ids, mask)
        routed_layers = frozenset(i for i in range(4) if routed.layer_is_routed(i))
        removed = RoutedModel(model, routed.schedule, routed.router, kv_policy=kv_policy, removed_layers=routed_layers)
        tok = logits.argmax(-1).view(1, 1)
        ref, _ = removed.decode_step(tok, torch.tensor([[len(prompt[0])]]), cache)
    assert gen.tokens[0][1] == int(ref.argmax(-1))


def test_threshold_skip_needs_learned_router_and_batch_1(tiny, tmp_path):
    model, folder = tiny
    runner = CliRunner()
    res = runner.invoke(_generate(), ["--model", str(folder), "--sparsity", "0.3", "--prompt", "hi", "--threshold-skip"])
    assert res.exit_code == 1 and "learned router" in res.output
    rdir = learned_routers_dir(model, tmp_path / "r", bias=0.0)
    res = runner.invoke(_generate(), ["--model", str(folder), "--routers", str(rdir), "--prompt", "hello there",
                                      "--prompt", "x", "--threshold-skip", "--json", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert len(out["results"]) == 2 and out["stats"]["routed_block_visits"] > 0


# ------------------------------------------------------------------------------------------ CLI
def _generate():
    from tokenskip.deploy.cli import generate

    return generate


def test_generate_cli_json_and_prompts_file(tiny, tmp_path):
    _, folder = tiny
    pf = tmp_path / "prompts.txt"
    pf.write_text("The quick brown fox\n\nHello\nA somewhat longer prompt than the others\n", encoding="utf-8")
    args = ["--model", str(folder), "--sparsity", "0.3", "--prompts-file", str(pf), "--max-new-tokens", "6",
            "--json", "--ignore-eos"]
    res = CliRunner().invoke(_generate(), args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [r["prompt"] for r in out["results"]] == ["The quick brown fox", "Hello",
                                                     "A somewhat longer prompt than the others"]
    assert all(len(r["tokens"]) == 6 for r in out["results"])
    # each prompt alone gives the same tokens as in the batch with the dense model
    res_b = CliRunner().invoke(_generate(), ["--model", str(folder), "--prompts-file", str(pf), "--json",
                                             "--max-new-tokens", "6", "--ignore-eos"])
    single = CliRunner().invoke(_generate(), ["--model", str(folder), "--prompt", "Hello", "--json",
                                              "--max-new-tokens", "6", "--ignore-eos"])
    assert json.loads(res_b.output)["results"][1]["tokens"] == json.loads(single.output)["results"][0]["tokens"]
    streamed = CliRunner().invoke(_generate(), ["--model", str(folder), "--prompt", "Hello", "--stream",
                                                "--max-new-tokens", "6", "--ignore-eos"])
    assert streamed.exit_code == 0 and streamed.output.startswith("Hello")


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "empty"),
    (["--prompt", "   "], "empty"),
    ([], "--prompt"),
    (["--prompt", "x" * 500, "--max-new-tokens", "20"], "maximum length 512"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["--prompt", "hi", "--onnx", "/nonexistent/export"], "no such export folder"),
    (["--prompt", "hi", "--onnx", "/tmp", "--sparsity", "0.3"], "PyTorch backend"),
    (["--prompt", "hi", "--engine", "/nonexistent/engine"], "no such folder"),
    (["--prompt", "hi", "--onnx", "/tmp", "--dtype", "fp16"], "--dtype applies to the PyTorch backend"),
])
def test_generate_cli_errors(tiny, args, message):
    _, folder = tiny
    res = CliRunner().invoke(_generate(), ["--model", str(folder), *args])
    assert res.exit_code != 0
    assert message in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 3


def test_generate_in_bf16(tiny):
    """--dtype loads the LLM directly in that precision (routers fp32): greedy bf16 tokens."""
    _, folder = tiny
    res = CliRunner().invoke(_generate(), ["--model", str(folder), "--sparsity", "0.3", "--prompt", "Hello there",
                                           "--dtype", "bf16", "--max-new-tokens", "4", "--ignore-eos", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["results"][0]["tokens"]) == 4


def test_engine_without_compute_capabilities_is_refused(tmp_path, monkeypatch):
    """An engine.json that records no target GPUs (older builds) cannot be checked: rebuild. The
    positive and negative checks against a build-written engine.json are in test_engine_build.py."""
    from tokenskip.deploy.runtime import trt_backend as trt_runtime
    from tokenskip.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(UserError, match="records no compute capabilities"):
        trt_runtime.check_gpu({"backend": "tensorrt"}, tmp_path)


# ------------------------------------------------------------------------------ decode quality
def test_decode_quality_matches_one_pass_evaluation(tiny):
    """Teacher forcing through decode_step == the evaluation's one-pass continuation scoring."""
    from tokenskip.deploy.quality.decode_eval import decode_quality, teacher_forced_logprobs
    from tokenskip.evaluate import continuation_logprobs

    model, _ = tiny
    routed, _ = build_routed(model, router="static", sparsity=0.4)
    windows = torch.randint(2, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    c = 8
    lp = teacher_forced_logprobs(routed, windows[:, :-c], windows[:, -c:])
    with torch.no_grad():
        ref = continuation_logprobs(routed, windows, c)
    torch.testing.assert_close(lp, ref, rtol=0, atol=2e-4)
    res = decode_quality(routed, windows, 32, c, batch_size=2)
    assert res["windows"] == 3 and res["dense_ppl"] > 1 and res["routed_ppl"] > 1
    assert 0 <= res["greedy_agree"] <= 1 and res["prefill_flops"] < 1
    dense, _ = build_routed(model, router="dense")
    same = decode_quality(build_routed(model, router="static", sparsity=0.0)[0], windows, 32, c)
    assert same["ppl_ratio"] == pytest.approx(1.0) and same["greedy_agree"] == 1.0


def test_decode_eval_cli(tiny, tmp_path):
    from tokenskip.deploy.cli import decode_eval

    _, folder = tiny
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    res = CliRunner().invoke(decode_eval, ["--model", str(folder), "--sparsity", "0.3", "--text", str(text),
                                           "--prompt-len", "48", "--new-tokens", "8", "--windows", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["new_tokens"] == 8 and out["ppl_ratio"] > 0


# ------------------------------------------------------------------------------------- benchmarks
def test_bench_runs_on_tiny_model(tiny):
    from tokenskip.deploy.cli import bench

    _, folder = tiny
    res = CliRunner().invoke(bench, ["--model", str(folder), "--seq-lens", "32,64", "--batch", "1,2",
                                     "--sparsity", "0.3", "--repeats", "1", "--warmup", "0", "--decode-steps", "2",
                                     "--overhead-seq", "64", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert len(out["rows"]) == 4
    row = out["rows"][0]
    assert row["ideal"] > 1 and row["speedup"] > 0 and row["efficiency"] == pytest.approx(row["speedup"] / row["ideal"])
    assert out["overhead"]["router"] == "LearnedRouter" and out["overhead"]["overhead"] > 0
    table = CliRunner().invoke(bench, ["--model", str(folder), "--seq-lens", "32", "--batch", "1", "--sparsity",
                                       "0.3", "--repeats", "1", "--warmup", "0", "--overhead-seq", "0"])
    assert table.exit_code == 0 and "| torch | 32 | 1 |" in table.output


def test_bench_gpu_tiny_runs_on_cpu(tmp_path):
    from tokenskip.deploy.bench import gpu as bench_gpu

    out = tmp_path / "gpu.json"
    bench_gpu.main(["--tiny", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["rows"] and all(r["ideal"] > 1 for r in data["rows"] if r["sparsity"] > 0)


# ----------------------------------------------------------------------------------- ONNX Runtime
def test_ort_generation_equals_torch(tiny_export):
    """Greedy tokens and logits from ONNX Runtime equal PyTorch's, left-padded batch included."""
    from tokenskip.deploy.runtime.ort_backend import OrtBackend

    routed, out = tiny_export
    t_rec, o_rec = Recorder(TorchBackend(routed)), Recorder(OrtBackend(out, threads=1))
    prompts = [p[:20] for p in PROMPTS]
    t = generate_tokens(t_rec, prompts, Sampling(12), pad_id=0).tokens
    o = generate_tokens(o_rec, prompts, Sampling(12), pad_id=0).tokens
    assert o == t
    torch.testing.assert_close(torch.stack(o_rec.logits), torch.stack(t_rec.logits), rtol=0, atol=1e-3)


def test_ort_cli_and_length_limit(tiny_export, tiny):
    routed, out = tiny_export
    res = CliRunner().invoke(_generate(), ["--onnx", str(out), "--prompt", "Hello", "--max-new-tokens", "5", "--json",
                                           "--ignore-eos"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["backend"] == "ort"
    res = CliRunner().invoke(_generate(), ["--onnx", str(out), "--prompt", "x" * 60, "--max-new-tokens", "10"])
    assert res.exit_code == 1 and "maximum length 64" in res.output
    res = CliRunner().invoke(_generate(), ["--onnx", str(out), "--prompt", "hi", "--threshold-skip"])
    assert res.exit_code == 1 and "PyTorch backend only" in res.output


def test_bench_ort_on_given_exports(tiny_export):
    from tokenskip.deploy.cli import bench

    routed, out = tiny_export
    res = CliRunner().invoke(bench, ["--backend", "ort", "--onnx", str(out),
                                     "--onnx-dense", str(out), "--seq-lens", "24", "--batch", "1", "--repeats", "1",
                                     "--warmup", "0", "--decode-steps", "2", "--overhead-seq", "0", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)["rows"][0]
    assert row["backend"] == "ort" and row["seq"] == 24 and row["dense_decode_ms"] > 0
    assert row["ideal"] == pytest.approx(1 / flops_ratio(routed.model.config, routed.schedule, 24))


# ------------------------------------------------------------------------ real model (slow)
@pytest.mark.slow
def test_smollm2_decode_quality_at_0_3(smollm2):
    """Decode with prefill routing stays within 10% of dense prefill + dense decode (static router, 0.3)."""
    from tokenskip.deploy.quality.decode_eval import decode_quality
    from tokenskip.windows import load_windows

    torch.set_num_threads(2)
    ids = load_windows(smollm2.tokenizer, "eval", 512, 4)
    routed, _ = build_routed(smollm2.model, router="static", sparsity=0.3)
    res = decode_quality(routed, ids, 448, 64, batch_size=2)
    assert res["ppl_ratio"] < 1.10, res


@pytest.mark.slow
def test_smollm2_torch_and_ort_agree_for_32_tokens(smollm2, smol_export):
    """Greedy generation from PyTorch and ONNX Runtime agree token for token on the same routed model."""
    pytest.importorskip("onnxruntime")
    from tokenskip.deploy.runtime.ort_backend import OrtBackend

    torch.set_num_threads(2)
    routed, _ = build_routed(smollm2.model, router="static", sparsity=0.3, model_name="smollm2-135m")
    prompt = smollm2.tokenizer("The history of the Roman Empire begins with")["input_ids"]
    t = generate_tokens(TorchBackend(routed), [prompt], Sampling(32), pad_id=0).tokens
    o = generate_tokens(OrtBackend(smol_export), [prompt], Sampling(32), pad_id=0).tokens
    assert o == t and len(t[0]) == 32
