"""OpenAI compatibility of `tokenskip serve`, as vLLM gives it (issue 21 item 4): stop ids from the
generation config, stop strings, the seed range, stream chunk shape, the field rule (unknown
ignored, known-but-unsupported refused unless no-op), OpenAI error bodies for every status
(400/404/405/413/503), the body limit, tokenization off the event loop, incremental
detokenization, and log-probs (generated tokens, top alternatives, echo with prompt log-probs).

Live servers on 127.0.0.1 (uvicorn on a thread) around the tiny random Llama and its 256-id char
tokenizer (one character per id, so text positions are token positions)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tokenskip.config import build_routed  # noqa: E402
from tokenskip.deploy.runtime.torch_backend import TorchBackend  # noqa: E402
from tokenskip.deploy.serve.api_server import MIN_BODY_BYTES, body_limit, build_app  # noqa: E402
from tokenskip.deploy.serve.engine import AsyncEngine, EngineSettings  # noqa: E402
from tokenskip.deploy.serve.model_info import model_info  # noqa: E402
from tokenskip.deploy.serve.runner import ServerThread  # noqa: E402
from tokenskip.deploy.runtime.stop_ids import model_eos_ids  # noqa: E402
from tokenskip.deploy.serve.textstream import TextStream  # noqa: E402

from conftest import make_char_tokenizer  # noqa: E402

NAME = "tiny"
ERROR_KEYS = {"message", "type", "param", "code"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_chat):
    return tiny_chat[:2]  # (model, tokenizer)


def start(backend, tok, **settings):
    engine = AsyncEngine(backend, tok, model_info(backend, NAME), EngineSettings(**settings))
    return ServerThread(build_app(engine, NAME)).start(), engine


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    routed, _ = build_routed(model, router="dense")
    srv, engine = start(TorchBackend(routed), tok, max_batch=8)
    yield srv, engine
    srv.stop()


def post(srv, path, body, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60, **kw)


def complete(srv, **body) -> dict:
    r = post(srv, "/v1/completions", {"model": NAME, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse(srv, path, body) -> list[dict]:
    """The data chunks of a streamed response (without [DONE], which must end it)."""
    with httpx.stream("POST", srv.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


def reference_logprobs(routed, ids: list[int]) -> torch.Tensor:
    """log_softmax of the full forward: row i is the distribution of token i + 1."""
    x = torch.tensor([ids])
    with torch.no_grad():
        return torch.log_softmax(routed(x, torch.ones_like(x)).logits[0].float(), -1)  # [S,V]


# ------------------------------------------------------------------------------------ stopping
def test_generation_config_eos_ids_and_stop_token_ids_stop(tiny, server):
    model, tok = tiny
    srv, _ = server
    free = complete(srv, prompt="Once upon", max_tokens=16, ignore_eos=True)["choices"][0]["text"]
    ids = [tok.convert_tokens_to_ids(c) for c in free]
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])  # a token that appears first at k
    # stop_token_ids (vLLM's extension) on the running server: the text ends before it
    r = complete(srv, prompt="Once upon", max_tokens=16, stop_token_ids=[ids[k]])
    assert r["choices"][0]["text"] == free[:k] and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == k + 1  # the stop token is generated (and counted), not shown
    # an end-of-turn id listed in the model's generation config stops as the EOS does
    routed, _ = build_routed(model, router="dense")
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, ids[k]]
    srv2, engine2 = start(TorchBackend(routed), tok)
    try:
        assert model_eos_ids(tok, engine2.backend) == {tok.eos_token_id, ids[k]}
        r = complete(srv2, prompt="Once upon", max_tokens=16)
        assert r["choices"][0]["text"] == free[:k] and r["choices"][0]["finish_reason"] == "stop"
        chunks = sse(srv2, "/v1/completions", {"prompt": "Once upon", "max_tokens": 16, "temperature": 0})
        assert "".join(c["choices"][0]["text"] for c in chunks) == free[:k]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        # ignore_eos ignores the model's ids
        r = complete(srv2, prompt="Once upon", max_tokens=16, ignore_eos=True)
        assert r["choices"][0]["text"] == free
    finally:
        srv2.stop()
        model.generation_config.eos_token_id = saved


def test_eos_ids_from_a_generation_config_file_next_to_the_tokenizer(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    tok = make_char_tokenizer(tmp_path / "tokenizer")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7, 9]}))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert model_eos_ids(loaded, SimpleNamespace()) == {1, 7, 9}  # an export: tokenizer/ inside the folder
    assert model_eos_ids(tok, SimpleNamespace()) == {tok.eos_token_id}  # no file found: the tokenizer's EOS


def test_stop_strings_are_cut_streamed_or_not(server):
    srv, _ = server
    body = {"prompt": "Once upon", "max_tokens": 24, "ignore_eos": True}
    full = complete(srv, **body)["choices"][0]["text"]
    a, b = full[9:12], full[4:6]  # b starts earlier: the first match wins, whichever is listed first
    for stop in ([a, b], b):
        r = complete(srv, **body, stop=stop)["choices"][0]
        assert r["text"] == full[:full.find(b)] and r["finish_reason"] == "stop"
        chunks = sse(srv, "/v1/completions", {**body, "temperature": 0, "stop": stop})
        assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.find(b)]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "ignore_eos": True, "temperature": 0}
    text = post(srv, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    stop = text[5:7]
    r = post(srv, "/v1/chat/completions", {**chat, "stop": stop}).json()["choices"][0]
    assert r["message"]["content"] == text[:text.find(stop)] and r["finish_reason"] == "stop"


# --------------------------------------------------------------------------------- validation
def test_seed_range_is_64_bit_signed(server):
    srv, _ = server
    for seed in (2**63 - 1, -2**63):
        r = post(srv, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "seed": seed})
        assert r.status_code == 200, r.text
    for seed in (2**63, 2**70, -2**63 - 1):
        assert_openai_error(post(srv, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "seed": seed}), 400,
                            "seed")


@pytest.mark.parametrize("extra,status", [
    ({"some_future_field": 1, "metadata": {"a": "b"}, "store": False}, 200),  # unknown: ignored
    ({"top_k": -1, "presence_penalty": 0, "logit_bias": {}, "repetition_penalty": 1.0}, 200),  # no-op values
    ({"response_format": {"type": "text"}, "tools": [], "tool_choice": "none"}, 200),
    ({"top_k": 5}, "top_k"),
    ({"min_p": 0.1}, "min_p"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"best_of": 2}, "best_of"),
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
])
def test_field_rule_unknown_ignored_unsupported_refused(server, extra, status):
    srv, _ = server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = post(srv, "/v1/chat/completions", body)
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        error = assert_openai_error(r, 400, status)
        assert error["type"] == "invalid_request_error" and status in error["message"]


def test_stream_chunks_carry_null_finish_reason_and_logprobs(server):
    srv, _ = server
    for path, body in (("/v1/completions", {"prompt": "abc"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        chunks = sse(srv, path, {**body, "max_tokens": 5, "ignore_eos": True,
                                 "stream_options": {"include_usage": True}})
        *token_chunks, usage = chunks
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
        for c in token_chunks:
            choice = c["choices"][0]
            assert "finish_reason" in choice and "logprobs" in choice and choice["logprobs"] is None
            assert "usage" not in c
            if "delta" in choice:
                assert None not in choice["delta"].values()
        assert [c["choices"][0]["finish_reason"] for c in token_chunks][-1] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks[:-1])


# ------------------------------------------------------------------------------------- errors
def test_every_error_status_has_the_openai_shape(tiny):
    model, tok = tiny
    routed, _ = build_routed(model, router="dense")
    srv, engine = start(TorchBackend(routed), tok, max_body_bytes=4096)
    try:
        error = assert_openai_error(httpx.get(srv.url + "/v1/nowhere"), 404)
        assert "/v1/nowhere" in error["message"] and error["code"] == "not_found"
        r = httpx.get(srv.url + "/v1/completions")
        assert_openai_error(r, 405)
        assert "POST" in r.headers["allow"]
        assert_openai_error(post(srv, "/v1/completions", {"prompt": 5}), 400, "prompt")  # FastAPI's 422 -> 400
        assert_openai_error(post(srv, "/v1/completions", {"prompt": "hi", "model": "gpt-4"}), 404, "model")
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        error = assert_openai_error(post(srv, "/v1/completions", big), 413)
        assert error["code"] == "request_too_large" and "4096" in error["message"]

        def chunked():  # no Content-Length: counted as it arrives
            body = json.dumps(big).encode()
            for i in range(0, len(body), 1000):
                yield body[i:i + 1000]
        assert_openai_error(httpx.post(srv.url + "/v1/completions", content=chunked(), timeout=30), 413)
        assert post(srv, "/v1/completions", {"prompt": "x" * 3000, "max_tokens": 1}).status_code == 400  # > context
        assert post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200
        engine.shutdown()
        error = assert_openai_error(post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 1}), 503)
        assert error["code"] == "engine_stopped"
    finally:
        srv.stop()


def test_default_body_limit_follows_the_context():
    assert body_limit(EngineSettings(), None) == MIN_BODY_BYTES
    assert body_limit(EngineSettings(), 512) == MIN_BODY_BYTES
    assert body_limit(EngineSettings(), 131072) == 64 * 131072
    assert body_limit(EngineSettings(max_body_bytes=100), 131072) == 100


def test_a_prompt_far_beyond_the_context_is_refused_from_a_prefix(server):
    srv, _ = server
    t0 = time.monotonic()
    error = assert_openai_error(post(srv, "/v1/completions", {"prompt": "x" * 1_000_000, "max_tokens": 1}), 400,
                                "prompt")
    assert "maximum context length is 512" in error["message"] and "more than" in error["message"]
    assert time.monotonic() - t0 < 3.0  # the whole megabyte would take ~4 s to tokenize here


class SlowTokenizer:
    """The char tokenizer, but encoding a prompt that starts with SLOW takes 1.5 s of blocking work."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)

    def __call__(self, text, **kw):
        if text.startswith("SLOW"):
            time.sleep(1.5)
        return self._tok(text, **kw)


def test_tokenizing_a_prompt_does_not_block_other_clients(tiny):
    model, tok = tiny
    routed, _ = build_routed(model, router="dense")
    srv, _ = start(TorchBackend(routed), SlowTokenizer(tok))
    try:
        slow = threading.Thread(target=post, args=(srv, "/v1/completions", {"prompt": "SLOW", "max_tokens": 1}))
        slow.start()
        time.sleep(0.3)  # the slow request is being tokenized now
        t0 = time.monotonic()
        assert post(srv, "/v1/completions", {"prompt": "fast", "max_tokens": 1}).status_code == 200
        assert time.monotonic() - t0 < 1.0 and slow.is_alive()  # answered while the slow one still tokenizes
        slow.join(30)
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- detokenization
def smollm2_tokenizer():
    path = Path.home() / ".cache/tokenskip/models/smollm2-135m"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"the SmolLM2 tokenizer is not cached at {path} (byte-level BPE needed for this test)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_incremental_detokenization_equals_full_decode_and_is_linear():
    tok = smollm2_tokenizer()
    windows = []
    decode = tok.decode
    tok.decode = lambda ids, **kw: (windows.append(len(ids)), decode(ids, **kw))[1]
    try:
        text = "Héllo wörld: 日本語 🎉👩‍👩‍👧 done. " * 150  # multi-byte characters split over byte tokens
        prompt, ids = tok("Say:")["input_ids"], tok(text)["input_ids"]
        ts = TextStream(tok, [], prompt)
        got = "".join(ts.push(t) for t in ids) + ts.push(None, final=True)
        assert got == decode(ids)
        assert len(ids) > 2000 and max(windows) <= 32  # each token decodes a bounded window: linear
        gen = torch.Generator().manual_seed(0)  # arbitrary ids, invalid UTF-8 included: still the full decode
        for _ in range(20):
            rand = torch.randint(0, len(tok), (40,), generator=gen).tolist()
            ts = TextStream(tok, [])
            got = "".join(ts.push(t) for t in rand) + ts.push(None, final=True)
            assert got == decode(rand, skip_special_tokens=True)
    finally:
        del tok.decode


def test_stop_string_split_over_tokens_and_held_back():
    tok = smollm2_tokenizer()
    ids = tok("The answer is 42. STOP now, then more text")["input_ids"]
    ts, released = TextStream(tok, [" STOP", "then"]), []
    for t in ids:
        released.append(ts.push(t))
        assert "S" not in "".join(released)  # a possible stop prefix is never released early
        if ts.stopped:
            break
    assert "".join(released) == "The answer is 42." and ts.stopped


# ------------------------------------------------------------------------------------ logprobs
def test_completion_logprobs_match_the_model(tiny, server):
    model, tok = tiny
    srv, engine = server
    prompt = tok("Once upon")["input_ids"]
    r = complete(srv, prompt=prompt, max_tokens=8, logprobs=3, ignore_eos=True)["choices"][0]
    lp = r["logprobs"]
    gen = [tok.convert_tokens_to_ids(c) for c in r["text"]]
    ref = reference_logprobs(engine.backend.routed, prompt + gen)  # [S,V]
    assert lp["tokens"] == list(r["text"]) and lp["text_offset"] == list(range(8))
    for i, tok_id in enumerate(gen):
        row = ref[len(prompt) - 1 + i]
        assert lp["token_logprobs"][i] == pytest.approx(float(row[tok_id]), abs=1e-4)
        top = lp["top_logprobs"][i]
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp["token_logprobs"][i])  # greedy: chosen = top
        assert sorted(top.values()) == pytest.approx(sorted(row.topk(3).values.tolist()), abs=1e-4)
    # streamed: the same entries, spread over the chunks
    chunks = sse(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "logprobs": 3, "ignore_eos": True,
                                           "temperature": 0})
    streamed = [x for c in chunks for x in (c["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    assert streamed == pytest.approx(lp["token_logprobs"])


def test_chat_logprobs_shape(server):
    srv, _ = server
    r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                           "logprobs": True, "top_logprobs": 2, "ignore_eos": True,
                                           "temperature": 0}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == r["choices"][0]["message"]["content"]
    for e in content:
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
        assert e["bytes"] == list(e["token"].encode())
    r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()
    assert r["choices"][0]["logprobs"] is None


def test_echo_scores_the_prompt_through_the_routed_prefill(tiny, server):
    model, tok = tiny
    srv, engine = server
    ids = tok("The quick brown fox")["input_ids"]
    ref = reference_logprobs(engine.backend.routed, ids)
    r = complete(srv, prompt=[ids], max_tokens=0, echo=True, logprobs=1)["choices"][0]  # lm-eval's shape
    lp = r["logprobs"]
    assert r["text"] == "The quick brown fox" and r["finish_reason"] == "length"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    # with generated tokens after the prompt: prompt entries, then the generated ones
    r = complete(srv, prompt="The quick brown fox", max_tokens=3, echo=True, logprobs=0, ignore_eos=True)
    choice = r["choices"][0]
    assert choice["text"].startswith("The quick brown fox") and len(choice["text"]) == len(ids) + 3
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 3 and r["usage"]["completion_tokens"] == 3
    assert choice["logprobs"]["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-5)
    # streamed echo: the prompt comes first
    chunks = sse(srv, "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 3, "echo": True,
                                           "ignore_eos": True, "temperature": 0})
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    # max_tokens 0 without echo is still a 400
    assert_openai_error(post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 0}), 400, "max_tokens")


class NoScoring:
    """A backend that holds no RoutedModel (as ONNX Runtime and TensorRT): it cannot score prompts."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        if name == "routed":
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_echo_logprobs_on_a_backend_without_scoring_is_a_clear_400(tiny):
    model, tok = tiny
    routed, _ = build_routed(model, router="dense")
    srv, _ = start(NoScoring(TorchBackend(routed)), tok)
    try:
        error = assert_openai_error(post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 0, "echo": True,
                                                                  "logprobs": 1}), 400, "echo")
        assert "PyTorch" in error["message"]
        r = post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "echo": True, "logprobs": 1,
                                          "ignore_eos": False})
        assert r.status_code == 400
        r = complete(srv, prompt="hi", max_tokens=2, logprobs=1, ignore_eos=True)  # generated tokens: any backend
        assert len(r["choices"][0]["logprobs"]["token_logprobs"]) == 2
        assert complete(srv, prompt="hi", max_tokens=2, echo=True)["choices"][0]["text"].startswith("hi")
    finally:
        srv.stop()
