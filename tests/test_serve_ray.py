"""The same app on Ray Serve: a local Ray cluster (2 CPUs, no dashboard), 2 replicas each with
its own model copy, HTTP on 127.0.0.1, answered through the official `openai` client."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray", reason="the serve-ray extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve")

from click.testing import CliRunner  # noqa: E402

from tokenskip.config import build_routed  # noqa: E402
from tokenskip.deploy.runtime.torch_backend import TorchBackend  # noqa: E402
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens  # noqa: E402

from conftest import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_llama  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """(url, spec file, model folder): `tokenskip serve --ray --replicas 2` as run() starts it."""
    from tokenskip.deploy.serve import ray_app
    from tokenskip.deploy.serve.cli import serve as serve_cmd
    from tokenskip.deploy.serve.launch import ServeSpec

    folder = tmp_path_factory.mktemp("tiny-ray")
    make_tiny_llama(folder, seed=1)
    make_char_tokenizer(folder, vocab_size=256, chat_template=CHAT_TEMPLATE)
    spec_file = folder / "spec.json"
    res = CliRunner().invoke(serve_cmd, ["--model", str(folder), "--router", "static", "--sparsity", "0.5",
                                         "--threads", "1", "--max-batch", "8", "--write-spec", str(spec_file)])
    assert res.exit_code == 0, res.output
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        spec = ServeSpec(**json.loads(spec_file.read_text()))
        ray_app.run(spec, host="127.0.0.1", port=port, replicas=2, max_replicas=None, cpus_per_replica=0.5,
                    gpus_per_replica=0.0, address=None, blocking=False)
        yield f"http://127.0.0.1:{port}", spec_file, folder
    finally:
        if ray.is_initialized():  # the drain test (last) has shut it down already
            serve.shutdown()
            ray.shutdown()


def test_two_replicas_answer_the_openai_client(ray_server):
    url, _, folder = ray_server
    from tokenskip.models import load_model

    lm = load_model(str(folder))
    routed, _ = build_routed(lm.model, router="static", sparsity=0.5)
    tok = lm.tokenizer
    with torch.no_grad():
        want = generate_tokens(TorchBackend(routed), [tok("Scale out")["input_ids"]], Sampling(12), pad_id=1,
                               eos_ids=[tok.eos_token_id]).tokens[0]
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = c.completions.create(model=folder.name, prompt="Scale out", max_tokens=12, temperature=0)
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    streamed = c.completions.create(model=folder.name, prompt="Scale out", max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text
    chat = c.chat.completions.create(model=folder.name, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                     temperature=0, stream=True)
    assert [ch.choices[0].delta.role for ch in chat][0] == "assistant"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=folder.name, prompt="x", max_tokens=0)
    # both replicas serve: each has its own engine (process id) behind Ray's proxy
    pids = set()
    for _ in range(60):
        pids.add(httpx.get(url + "/health", timeout=10).json()["pid"])
        if len(pids) == 2:
            break
        time.sleep(0.05)
    assert len(pids) == 2
    app = serve.status().applications["tokenskip"]
    assert app.status == "RUNNING" and app.deployments["tokenskip"].replica_states.get("RUNNING") == 2


def test_serve_run_builder_and_autoscaling_options(ray_server, monkeypatch):
    from tokenskip.deploy.serve import ray_app
    from tokenskip.deploy.serve.launch import ServeSpec

    _, spec_file, _ = ray_server
    args = {"spec": str(spec_file), "replicas": "1", "max_replicas": "4"}
    assert isinstance(ray_app.app_builder(args), serve.Application)
    monkeypatch.setattr(ray_app, "bind", lambda *a: a)  # what `serve run` arguments become
    assert ray_app.app_builder(args) == (ServeSpec(**json.loads(spec_file.read_text())), 1, 4, 1.0, 0.0)
    opts = ray_app.deployment_options(1, 4, 1.0, 0.0, {"max_batch": 8, "max_waiting": 64})
    assert opts["autoscaling_config"]["max_replicas"] == 4 and opts["max_ongoing_requests"] == 8
    assert opts["max_queued_requests"] == 64  # overload past the queues: Ray answers 503
    assert "num_replicas" not in opts


def test_sigterm_drain_finishes_the_stream_in_flight_then_stops_ray(ray_server):
    """What `serve --ray` does on SIGTERM (ray_app.drain): a stream in flight runs to its end, new
    requests are refused, then Ray stops. (serve.shutdown() alone closed the proxy under the open
    stream: the client got an empty reply.) Last in the module: it stops the fixture's cluster."""
    import threading

    from tokenskip.deploy.serve import ray_app

    url, _, folder = ray_server
    body = {"model": folder.name, "prompt": "Drain", "max_tokens": 480, "temperature": 0, "stream": True,
            "ignore_eos": True}
    drained, events = {}, []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        t = threading.Thread(target=lambda: (drained.setdefault("start", time.monotonic()), ray_app.drain(),
                                             drained.setdefault("end", time.monotonic())))
        t.start()
        time.sleep(0.5)  # the app is being deleted: the proxy refuses new requests
        try:
            refused = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2},
                                 timeout=30).status_code  # Ray's proxy: 404, the app is going
        except httpx.TransportError:
            refused = "closed"
        events = [first] + [line for line in lines if line.startswith("data:")]
        stream_end = time.monotonic()
    t.join(120)
    assert not t.is_alive() and not ray.is_initialized()
    assert drained["start"] < stream_end, "the stream ended before the drain began: nothing was tested"
    assert drained["end"] >= stream_end - 0.5  # the drain waited for the stream
    assert refused == "closed" or refused >= 400
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
