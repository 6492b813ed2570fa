"""Faults are contained: an exception anywhere on the engine thread (a cache operation mid-batch,
reaping, decode) ends the sequences in flight with an error and the engine goes on with a fresh
cache; repeated faults mark it failed (/health and new work: 503). Per-request deadlines end a
request with a 504. SIGTERM drains: the requests in flight finish, new ones get 503, exit 0.
Ray: the replica's health check reports the engine's state. All on the toy backend."""

from __future__ import annotations

import signal
import threading
import time

import pytest

import toy_backend
from conftest import make_char_tokenizer
from tokenskip.deploy.runtime.base import CacheOps
from tokenskip.deploy.runtime.generation import Sampling
from tokenskip.deploy.serve.scheduler import Scheduler, Sequence, Unavailable

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tokenskip.deploy.serve.api_server import build_app  # noqa: E402
from tokenskip.deploy.serve.engine import AsyncEngine, EngineSettings  # noqa: E402
from tokenskip.deploy.serve.model_info import model_info  # noqa: E402
from tokenskip.deploy.serve.runner import ServerProcess, ServerThread  # noqa: E402


class FlakyOps(toy_backend.ToyBackend):
    """The toy whose cache operation `op` raises on its `on`-th call (a CUDA OOM mid-batch)."""

    def __init__(self, op: str, on: int) -> None:
        super().__init__(vocab=97)
        calls = {"n": 0}
        real = getattr(toy_backend.TOY_OPS, op)

        def flaky(*args):
            calls["n"] += 1
            if calls["n"] == on:
                raise RuntimeError(f"CUDA out of memory in {op}")
            return real(*args)

        self.row_ops = CacheOps(**{**{f: getattr(toy_backend.TOY_OPS, f) for f in ("name", "select", "concat", "fit")},
                                   op: flaky})


def _seq(rid, prompt, n, events):
    return Sequence(rid=rid, prompt=prompt, sampling=Sampling(n), emit=lambda e: events.setdefault(rid, []).append(e))


def test_a_cache_op_raising_mid_batch_fails_the_batch_and_the_engine_goes_on():
    sched = Scheduler(FlakyOps("concat", on=1), pad_id=1, max_batch=8, batch_wait_s=0)
    events: dict = {}
    a, b = _seq("a", [5, 6], 10, events), _seq("b", [7], 10, events)
    sched.submit(a)
    sched.submit(b)
    sched.step()  # prefill a, b
    sched.step()  # decode
    c = _seq("c", [9, 9, 9], 5, events)
    sched.submit(c)
    assert sched.step()  # c's prefill joins the batch: concat raises
    for seq in (a, b, c):  # every sequence in flight ends with a 500 error, in the OpenAI shape's terms
        last = events[seq.rid][-1]
        assert seq.finish == "error" and last.status == 500 and last.code == "engine_fault"
        assert "CUDA out of memory in concat" in last.error
    assert sched.rows == [] and sched.cache is None and sched.kv_used == 0 and sched.state == "ok"
    d = _seq("d", [3, 4], 6, events)  # a fresh cache: the next request runs, exactly
    sched.submit(d)
    while sched.step():
        pass
    assert d.finish == "length" and d.tokens == toy_backend.continuation([3, 4], 6)


def test_reaping_that_raises_is_contained():
    """An abort regroups the batch (select): it raising on the engine thread used to kill it."""
    sched = Scheduler(FlakyOps("select", on=1), pad_id=1, max_batch=8, batch_wait_s=0)
    events: dict = {}
    a, b = _seq("a", [5], 10, events), _seq("b", [6], 10, events)
    sched.submit(a)
    sched.submit(b)
    sched.step()
    sched.abort("a")
    stop = threading.Event()
    engine = threading.Thread(target=sched.serve_forever, args=(stop,), daemon=True)
    engine.start()
    deadline = time.monotonic() + 10
    while b.finish is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.is_alive() and a.finish == "abort" and b.finish == "error" and sched.stats.faults == 1
    stop.set()
    sched._wake.set()
    engine.join(5)


class BrokenDecode(toy_backend.ToyBackend):
    def decode(self, token, position, cache):
        raise RuntimeError("device lost")


class SlowToy(toy_backend.ToyBackend):
    def decode(self, token, position, cache):
        time.sleep(0.02)
        return super().decode(token, position, cache)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("faults-tok"))


def _server(backend, tok, **settings):
    engine = AsyncEngine(backend, tok, model_info(backend, "toy"), EngineSettings(batch_wait_ms=0, **settings))
    return ServerThread(build_app(engine, "toy")).start(), engine


def test_repeated_faults_fail_the_engine_health_503_and_new_work_503(tok):
    backend = BrokenDecode(vocab=len(tok))
    srv, engine = _server(backend, tok, fault_limit=2)
    try:
        body = {"model": "toy", "prompt": "hello", "max_tokens": 5}
        first = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert first.status_code == 500 and first.json()["error"]["code"] == "engine_fault"
        assert "device lost" in first.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 200  # one fault: recovered with a fresh cache
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            text = r.read().decode()
        assert '"code": "engine_fault"' in text or '"code":"engine_fault"' in text  # the error event in the stream
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "failed" and health.json()["faults"] == 2
        refused = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"
        with pytest.raises(Unavailable):
            engine.scheduler.submit(_seq("x", [3], 2, {}))
    finally:
        srv.stop()


def test_request_timeout_ends_a_request_with_504(tok):
    srv, engine = _server(SlowToy(vocab=len(tok)), tok, request_timeout_s=0.3)
    try:
        body = {"model": "toy", "prompt": "abc", "max_tokens": 200, "ignore_eos": True}
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - t0 < 3  # not the 4 s the 200 tokens take
        ok = httpx.post(srv.url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
        assert engine.scheduler.stats.finished["timeout"] == 1 and engine.scheduler.kv_used == 0
    finally:
        srv.stop()


PRELUDE = """
import sys, time
sys.path.insert(0, {tests!r})
import toy_backend
from tokenskip.deploy.runtime.base import BackendSpec, register_backend

@register_backend("toy-slow")
class SlowToy(toy_backend.ToyBackend):
    def decode(self, token, position, cache):
        time.sleep(0.03)
        return super().decode(token, position, cache)

BackendSpec.name = property(lambda self: "toy-slow")  # `serve` has no --backend flag: its spec names the toy
"""


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(tok, tmp_path):
    import pathlib

    tok.save_pretrained(tmp_path)
    prelude = PRELUDE.format(tests=str(pathlib.Path(__file__).parent))
    server = ServerProcess(["--tokenizer", str(tmp_path), "--served-model-name", "toy", "--log-level", "warning"],
                           timeout=120, prelude=prelude)
    try:
        body = {"model": "toy", "prompt": "abc", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
                "stream": True}
        chunks = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for line in lines:  # the first token is out: the request is in flight
                if line.startswith("data:"):
                    chunks.append(line)
                    break
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            refused = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert httpx.get(server.url + "/health").json()["status"] == "draining"
            chunks += [line for line in lines if line.startswith("data:")]
        assert chunks[-1] == "data: [DONE]" and '"finish_reason":"length"' in chunks[-2]
        assert len(chunks) == 41  # 40 tokens, then [DONE]: the drained request finished
        assert server.proc.wait(20) == 0
    finally:
        server.stop()


def test_ray_health_check_reports_the_engine_state():
    pytest.importorskip("ray.serve")
    from types import SimpleNamespace

    from tokenskip.deploy.serve.ray_app import check_engine, deployment_options

    for state in ("ok", "draining"):
        check_engine(SimpleNamespace(state=state, scheduler=SimpleNamespace(last_fault=None)))
    with pytest.raises(RuntimeError, match="engine failed: RuntimeError: device lost"):
        check_engine(SimpleNamespace(state="failed", scheduler=SimpleNamespace(last_fault="RuntimeError: device lost")))
    opts = deployment_options(2, None, 1.0, 0.0, {"max_batch": 16, "max_waiting": 100})
    assert opts["max_ongoing_requests"] == 16 and opts["max_queued_requests"] == 100 and opts["num_replicas"] == 2
