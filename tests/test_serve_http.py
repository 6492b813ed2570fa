"""`tokenskip serve` over HTTP, driven by the official `openai` client against a live server on
127.0.0.1 (uvicorn on a thread, a free port, stopped by the fixture): completions and chat,
streaming and not, errors, backpressure, cancellation, metrics, and a 64-stream load test whose
greedy outputs must equal unbatched generation token for token.

The tiny model's char tokenizer maps every one of its 256 ids to exactly one character, so a text
is its token sequence: a lost or duplicated token shows as a wrong string."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tokenskip.config import build_routed  # noqa: E402
from tokenskip.deploy.runtime.torch_backend import TorchBackend  # noqa: E402
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens  # noqa: E402
from tokenskip.deploy.serve.api_server import build_app  # noqa: E402
from tokenskip.deploy.serve.engine import AsyncEngine, EngineSettings  # noqa: E402
from tokenskip.deploy.serve.model_info import model_info  # noqa: E402
from tokenskip.deploy.serve.runner import ServerThread  # noqa: E402

from conftest import make_char_tokenizer  # noqa: E402

NAME = "tiny"
pytestmark = pytest.mark.usefixtures("one_thread")


def start(backend, tok, **settings) -> tuple[ServerThread, AsyncEngine]:
    engine = AsyncEngine(backend, tok, model_info(backend, NAME), EngineSettings(**settings))
    return ServerThread(build_app(engine, NAME)).start(), engine


@pytest.fixture(scope="module")
def server(tiny_chat):
    model, tok, _ = tiny_chat
    routed, _ = build_routed(model, router="dense")
    srv, engine = start(TorchBackend(routed), tok, max_batch=32)
    yield srv, engine
    srv.stop()


class SlowBackend(TorchBackend):
    """20 ms per decode step: long enough to watch a queue fill and a cancel land."""

    def decode(self, token, position, cache):
        time.sleep(0.02)
        return super().decode(token, position, cache)


@pytest.fixture(scope="module")
def slow_server(tiny_chat):
    model, tok, _ = tiny_chat
    routed, _ = build_routed(model, router="dense")
    srv, engine = start(SlowBackend(routed), tok, max_batch=1, max_waiting=1)
    yield srv, engine
    srv.stop()


def client(srv, **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def greedy(engine, ids, n, eos=True) -> list[int]:
    eos_ids = [engine.tokenizer.eos_token_id] if eos else []
    return generate_tokens(engine.backend, [ids], Sampling(n), pad_id=engine.pad_id, eos_ids=eos_ids).tokens[0]


def text_of(engine, tokens) -> str:
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


# ------------------------------------------------------------------------------ endpoints
def test_completion_and_stream_equal_unbatched_greedy(server):
    srv, engine = server
    c = client(srv)
    prompt = "The capital of France is"
    want = greedy(engine, engine.tokenizer(prompt)["input_ids"], 20)
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == text_of(engine, want)
    assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(prompt)
    assert r.choices[0].finish_reason == ("stop" if want[-1] == engine.tokenizer.eos_token_id else "length")
    chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == len(want)
    # token ids as the prompt give the same answer
    r2 = c.completions.create(model=NAME, prompt=engine.tokenizer(prompt)["input_ids"], max_tokens=20, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_chat_and_stream_use_the_chat_template(server):
    srv, engine = server
    c = client(srv)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = engine.tokenizer(engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    want = text_of(engine, greedy(engine, ids, 16))
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    stream = c.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=16, temperature=0,
                                       stream=True)
    chunks = [ch for ch in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_seed_and_models(server):
    srv, engine = server
    c = client(srv)
    stops0, aborts0 = _finished(srv, "stop"), _finished(srv, "abort")
    full = c.completions.create(model=NAME, prompt="Once upon", max_tokens=24, temperature=0, extra_body={
        "ignore_eos": True}).choices[0].text
    stop = full[6:8]
    cut = full[:full.find(stop)]
    r = c.completions.create(model=NAME, prompt="Once upon", max_tokens=24, temperature=0, stop=[stop, "\x00"],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=NAME, prompt="Once upon", max_tokens=24, temperature=0, stop=stop,
                                    stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed) == cut
    # a stop string ends the sequence as "stop", not as a cancelled one
    assert wait_for(lambda: _finished(srv, "stop") >= stops0 + 2) and _finished(srv, "abort") == aborts0
    # seeded sampling is reproducible, as `generate --seed` (generator seeded seed + 0)
    a = [c.completions.create(model=NAME, prompt="abc", max_tokens=12, temperature=1.0, top_p=0.9, seed=3).choices[0].text
         for _ in range(2)]
    ids = engine.tokenizer("abc")["input_ids"]
    gen = generate_tokens(engine.backend, [ids], Sampling(12, 1.0, 0.9, 3), pad_id=engine.pad_id,
                          eos_ids=[engine.tokenizer.eos_token_id]).tokens[0]
    assert a[0] == a[1] == text_of(engine, gen)
    models = c.models.list()
    assert [m.id for m in models.data] == [NAME]


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 600}, "max_tokens"),  # prompt + max_tokens beyond the 512-token context
    ({"prompt": "x" * 600}, "prompt"),  # the prompt alone is longer than the context
    ({"n": 2}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logprobs": 21}, "logprobs"),  # at most 20 alternatives
    ({"seed": 2**70}, "seed"),  # beyond a 64-bit signed seed
    ({"prompt": [5, 9999]}, "prompt"),
    ({"prompt": ["two", "prompts"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_requests_get_400_with_an_openai_error_body(server, kwargs, param):
    srv, _ = server
    args = {"model": NAME, "prompt": "hello", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client(srv).completions.create(**args)
    body = err.value.body
    assert err.value.status_code == 400 and body["type"] == "invalid_request_error" and body["message"]
    assert body["param"] == param or param in body["message"]


def test_malformed_bodies_and_unknown_model(server):
    srv, _ = server
    for content in (b"{not json", b"[1, 2]", b'{"prompt": 5}', b'{"max_tokens": 3}'):
        r = httpx.post(srv.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", content
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [], "max_tokens": 3})
    assert r.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client(srv).completions.create(model="other-model", prompt="hi", max_tokens=2)


def test_chat_without_a_template_is_a_clear_400(tiny_chat, tmp_path):
    model, _, _ = tiny_chat
    plain = make_char_tokenizer(tmp_path, vocab_size=256)  # no chat template
    routed, _ = build_routed(model, router="dense")
    srv, engine = start(TorchBackend(routed), plain)
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client(srv).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
        r = client(srv).completions.create(model=NAME, prompt="hi", max_tokens=2, temperature=0)  # still served
        assert r.choices[0].text == text_of(engine, greedy(engine, plain("hi")["input_ids"], 2))
    finally:
        srv.stop()


def test_metrics_parse(server):
    from prometheus_client.parser import text_string_to_metric_families

    srv, _ = server
    client(srv).completions.create(model=NAME, prompt="metrics", max_tokens=5, temperature=0, stream=True).close()
    client(srv).completions.create(model=NAME, prompt="metrics", max_tokens=5, temperature=0)
    text = httpx.get(srv.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("tokenskip_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 2
    assert samples[("tokenskip_time_to_first_token_seconds_count", ())] >= 2
    assert samples[("tokenskip_time_per_output_token_seconds_count", ())] >= 4
    assert samples[("tokenskip_generation_tokens_total", ())] >= 6
    assert samples[("tokenskip_prompt_tokens_total", ())] >= 14
    assert ("tokenskip_queue_depth", ()) in samples and samples[("tokenskip_routed_blocks", ())] == 0
    assert samples[("tokenskip_blocks", ())] == 4
    health = httpx.get(srv.url + "/health").json()
    assert health["status"] == "ok" and health["batching"] == "continuous"


# ------------------------------------------------------------------ backpressure, cancellation
def _finished(srv, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text):
        for s in fam.samples:
            if s.name == "tokenskip_sequences_finished_total" and s.labels.get("reason") == reason:
                return s.value
    return 0.0


def test_full_queue_is_429_and_disconnects_cancel(slow_server):
    srv, engine = slow_server
    c = client(srv)
    health = lambda: httpx.get(srv.url + "/health").json()  # noqa: E731
    aborted0 = _finished(srv, "abort")
    # A runs (the only batch slot), B waits (the only queue slot), C is refused
    a = c.completions.create(model=NAME, prompt="aaa", max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(a))
    assert first.choices[0].text
    b_result = {}

    def run_b():
        try:
            httpx.post(srv.url + "/v1/completions", json={"prompt": "bbb", "max_tokens": 400, "ignore_eos": True},
                       timeout=1.5)
        except httpx.ReadTimeout:  # B's client gives up: a non-streaming disconnect
            b_result["timed_out"] = True

    b = threading.Thread(target=run_b)
    b.start()
    assert wait_for(lambda: health()["waiting"] == 1)
    with pytest.raises(openai.RateLimitError) as err:
        c.completions.create(model=NAME, prompt="ccc", max_tokens=4)
    assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
    # A's client hangs up mid-stream: its sequence is aborted well before its 400 tokens
    a.close()
    assert wait_for(lambda: _finished(srv, "abort") >= aborted0 + 1)
    # B got A's slot; its client times out after 1.5 s and its work is cancelled too
    b.join(10)
    assert b_result.get("timed_out")
    assert wait_for(lambda: _finished(srv, "abort") >= aborted0 + 2)
    assert wait_for(lambda: health()["running"] == 0 and health()["waiting"] == 0)
    assert _finished(srv, "length") == 0  # nothing ran to its 400 tokens
    # the server is free again
    assert c.completions.create(model=NAME, prompt="ddd", max_tokens=3).usage.completion_tokens <= 3


# ------------------------------------------------------------------------------- load test
def test_64_concurrent_streams_equal_unbatched(server):
    """64 streaming requests at once (32 per batch, continuous batching): every one completes, each
    chunk is exactly one token, and the text equals the same prompt generated alone."""
    srv, engine = server
    n = 64
    prompts = [("Request %d: " % i) + "abcdefghij"[: i % 10] * (1 + i % 3) for i in range(n)]
    max_tokens = [8 + (i * 7) % 17 for i in range(n)]
    want = [greedy(engine, engine.tokenizer(p)["input_ids"], m) for p, m in zip(prompts, max_tokens)]

    async def one(ac, i):
        stream = await ac.completions.create(model=NAME, prompt=prompts[i], max_tokens=max_tokens[i], temperature=0,
                                             stream=True, stream_options={"include_usage": True})
        pieces, usage, finish = [], None, None
        async for ch in stream:
            if ch.usage:
                usage = ch.usage
            for choice in ch.choices:
                if choice.text:
                    pieces.append(choice.text)
                finish = choice.finish_reason or finish
        return pieces, usage, finish

    async def main():
        ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120,
                                http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=n)))
        async with ac:
            return await asyncio.wait_for(asyncio.gather(*[one(ac, i) for i in range(n)]), 150)

    prefills0 = engine.stats.prefills
    results = asyncio.run(main())
    for i, (pieces, usage, finish) in enumerate(results):
        expect = text_of(engine, want[i])
        assert "".join(pieces) == expect, i
        assert all(len(p) == 1 for p in pieces) and len(pieces) == len(expect), i  # one token per chunk
        assert usage.completion_tokens == len(want[i]) and finish in ("stop", "length")
    assert engine.stats.max_running >= 8  # requests really shared batches
    assert engine.stats.prefills - prefills0 < n
