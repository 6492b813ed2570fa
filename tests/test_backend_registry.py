"""The backend registry (deploy/runtime/base.py): a backend registered from one file (tests/
toy_backend.py) is built by name, generates through the one generation loop, and serves real HTTP
requests (continuous batching with its own cache row operations) with exactly the tokens its rule
implies; the `--backend` choices are the registry's."""

from __future__ import annotations

import asyncio
import re
import sys

import pytest
from click.testing import CliRunner

from tokenskip.deploy.runtime import base
from tokenskip.deploy.runtime.base import BackendSpec, backend_names, create_backend, register_backend
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens
from tokenskip.errors import UserError

import toy_backend
from conftest import make_char_tokenizer

PROMPTS = ["The capital of France is", "a", "Once upon a time, in a land far away", "xyz", "0123456789", "!?"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy-tok")
    make_char_tokenizer(path)
    return path


def test_builtins_register_without_importing_optional_runtimes():
    assert backend_names()[:3] == ["torch", "ort", "trt"]
    assert backend_names("bench") == ["torch", "ort", "trt"] and backend_names("bench-serve") == ["torch", "ort"]
    assert "toy" in backend_names() and "toy" not in backend_names("bench")
    assert "tensorrt" not in sys.modules  # registering trt imported no TensorRT


def test_unknown_name_and_duplicate_registration_are_refused(tok_dir):
    with pytest.raises(UserError, match="--backend nope: no such backend"):
        create_backend("nope", tokenizer_dir=str(tok_dir))
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_backend("toy")(type("Other", (), {"create": classmethod(lambda c, s: None),
                                                   "open": classmethod(lambda c, s: None)}))
    with pytest.raises(UserError, match="--threshold-skip runs on the PyTorch backend only"):
        create_backend(BackendSpec(onnx_dir="x", threshold_skip=True))


def test_generation_loop_runs_the_toy(tok_dir):
    backend, tok, desc = create_backend("toy", tokenizer_dir=str(tok_dir))
    assert desc == {"backend": "toy", "model": "toy-rule"}
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    gen = generate_tokens(backend, prompts, Sampling(max_new_tokens=7), pad_id=tok.pad_token_id)
    assert gen.tokens == [toy_backend.continuation(p, 7) for p in prompts]
    assert backend.new_tokens == 7  # the loop announced the generation's length


def _serve(tok_dir, prompts, max_tokens):
    """Every prompt as a concurrent /v1/completions request to a live server on 127.0.0.1."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from tokenskip.deploy.serve.api_server import build_app
    from tokenskip.deploy.serve.launch import ServeSpec, build_async_engine
    from tokenskip.deploy.serve.runner import ServerThread

    spec = ServeSpec(backend={"backend": "toy", "tokenizer_dir": str(tok_dir)}, served_model_name="toy",
                     settings={"max_batch": 4, "batch_wait_ms": 0.0})
    engine, name = build_async_engine(spec)
    assert name == "toy" and engine.info.max_length == toy_backend.MAX_LENGTH and engine.info.config is None

    async def ask(url):
        async with httpx.AsyncClient(timeout=60) as client:
            rs = await asyncio.gather(*[client.post(url + "/v1/completions", json={
                "model": "toy", "prompt": p, "max_tokens": n, "temperature": 0}) for p, n in zip(prompts, max_tokens)])
            return [r.json() for r in rs], (await client.get(url + "/health")).json()

    srv = ServerThread(build_app(engine, name)).start()  # build_app starts the engine
    try:
        return engine, *asyncio.run(ask(srv.url))
    finally:
        srv.stop()


def test_the_server_serves_a_registered_backend(tok_dir):
    """Six requests with different lengths on a batch of four: rows join and leave the running
    batch through the toy's own row operations; every text is the rule's continuation."""
    tok = toy_backend.load_tokenizer(tok_dir, "--tokenizer")
    max_tokens = [5, 12, 3, 9, 1, 7]
    engine, answers, health = _serve(tok_dir, PROMPTS, max_tokens)
    for prompt, n, answer in zip(PROMPTS, max_tokens, answers):
        want = tok.decode(toy_backend.continuation(tok(prompt)["input_ids"], n))
        assert answer["choices"][0]["text"] == want and answer["usage"]["completion_tokens"] == n
        assert re.fullmatch(r"[ -~]+", want)  # printable ASCII, never EOS
    assert health["batching"] == "continuous" and engine.scheduler.ops is toy_backend.TOY_OPS


def test_a_backend_without_row_ops_is_served_with_dynamic_batching(tok_dir, monkeypatch):
    monkeypatch.setattr(toy_backend.ToyBackend, "cache_ops", lambda self: None)
    tok = toy_backend.load_tokenizer(tok_dir, "--tokenizer")
    engine, answers, health = _serve(tok_dir, PROMPTS[:3], [4, 6, 2])
    assert [a["choices"][0]["text"] for a in answers] == [
        tok.decode(toy_backend.continuation(tok(p)["input_ids"], n)) for p, n in zip(PROMPTS[:3], [4, 6, 2])]
    assert health["batching"].startswith("dynamic")


def test_bench_backend_choices_are_the_registry(monkeypatch):
    from tokenskip.deploy.cli import bench
    from tokenskip.deploy.serve.cli import bench_serve

    def choices(command) -> str:
        out = CliRunner().invoke(command, ["--help"]).output
        return re.search(r"--backend \[([^\]]+)\]", out).group(1)

    assert choices(bench) == "|".join(backend_names("bench")) == "torch|ort|trt"
    assert choices(bench_serve) == "torch|ort"
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # a registration this test takes back
    register_backend("toy-bench", features=("bench",))(toy_backend.ToyBackend)
    assert choices(bench) == "torch|ort|trt|toy-bench"
