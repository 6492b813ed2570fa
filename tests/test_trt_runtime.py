"""The TensorRT runtime (deploy/runtime/trt_backend.py) against a fake TensorRT module (tests/fake_trt.py)
on the CPU: profile selection, the KV cache written in place, output buffers reused across steps,
every copy and execution on the one stream, and the checks that guard it. The real TensorRT path
needs a GPU; what the fake cannot show is in the GPU device script (docs/deploy.md)."""

from __future__ import annotations

import json

import pytest
import torch

from tokenskip.deploy.runtime import trt_backend as trt_runtime
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens
from tokenskip.errors import UserError

from fake_trt import FakeDevice, Spec, ToyReference, fake_trt_module

PROMPTS = [[5, 9, 17, 3, 44, 8, 21, 60, 2, 7, 19], [40, 2, 77, 31, 9, 10]]


def engine_dir(path, profiles=("prefill", "decode"), **meta):
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "model.engine").exists():
        (path / "model.engine").write_bytes(b"engine")
    side = {"format": "tokenskip-engines", "version": 1, "backend": "tensorrt", "max_seq_len": 64,
            "compute_capabilities": ["9.0"], "plugin_library": None,
            "engines": {"model": {"file": "model.engine", "profiles": list(profiles)}}, **meta}
    (path / "engine.json").write_text(json.dumps(side))
    return path


@pytest.fixture(params=[("shared",), ("prefill", "decode")], ids=["shared-profile", "phase-profiles"])
def fake(tmp_path, monkeypatch, request):
    """(make_backend, module): TrtBackend on a fake TensorRT whose toy model has uneven kept counts,
    with one shared optimisation profile or a prefill and a decode profile."""
    spec = Spec(layers=(0, 1, 2), keep={0: (1, 1), 1: (1, 2), 2: (3, 5)}, profiles=request.param)
    mod = fake_trt_module(spec)
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda flavour: mod)

    def make(**meta):
        return trt_runtime.TrtBackend(engine_dir(tmp_path / "eng", request.param, **meta), device=FakeDevice(mod))
    return make, mod


def test_generation_matches_the_reference_with_the_cache_in_place(fake):
    """Greedy generation through the runtime equals the toy model computed with growing lists: the
    runtime fed each layer exactly its filled rows and wrote every new row to the next slot, across
    a capacity growth (reserve 1), with left padding and per-layer kept counts."""
    make, mod = fake
    backend = make()
    backend.check_length(11, 12)
    backend.reserve = 1  # force the cache to grow (x2 copies) during the run
    got = generate_tokens(backend, PROMPTS, Sampling(12), pad_id=0)
    want = generate_tokens(ToyReference(mod.spec), PROMPTS, Sampling(12), pad_id=0)
    assert got.tokens == want.tokens and len(got.tokens[0]) == 12
    assert len({tuple(t) for t in got.tokens}) > 1  # the toy model's tokens depend on the cache


def test_profiles_buffers_and_stream(fake):
    make, mod = fake
    backend = make()
    backend.check_length(11, 6)  # cache sized for the whole generation: no growth
    logits, cache = backend.prefill(*_batch())
    for step in range(5):
        logits, cache = backend.decode(logits.argmax(-1, keepdim=True), torch.full((2, 1), 11 + step), cache)
    runs = [e for e in mod.log if e[0] == "execute"]
    # profile selection: prefill on the prefill (or shared) profile with the prompt, decode on the
    # decode (or shared) profile with one token
    two = mod.spec.profiles == ["prefill", "decode"]
    assert [r[1] for r in runs] == [0] + [1 if two else 0] * 5
    assert runs[0][4]["input_ids"] == (2, 11) and all(r[4]["input_ids"] == (2, 1) for r in runs[1:])
    assert runs[0][4]["past.1.key"][0] == 0  # prefill: an empty past
    # the past grows by one row per decode step; its address is the cache buffer's (no copy)
    lengths = [r[4]["past.1.key"][0] for r in runs[1:]]
    assert lengths == list(range(lengths[0], lengths[0] + 5)) and lengths[0] == 6  # kept 6 of 11
    assert len({r[3]["past.1.key"] for r in runs[1:]}) == 1
    assert runs[1][3]["past.1.key"] == cache.buffers[1]["key"].data_ptr()
    # the new rows are written in place: each step's output address is the next slot of the buffer
    row = cache.buffers[1]["key"][0].nbytes
    assert [r[3]["new.1.key"] for r in runs[1:]] == [cache.buffers[1]["key"].data_ptr() + row * n for n in lengths]
    # output and input buffers are reused across decode steps
    for name in ("logits", "input_ids", "position_ids", "index.1"):
        assert len({r[3][name] for r in runs[1:]}) == 1, name
    # one stream: contexts, every copy and every execution
    streams = {e[2] for e in mod.log if e[0] in ("profile", "execute")} | {e[1] for e in mod.log if e[0] == "copy"}
    assert streams == {FakeDevice.handle}
    # one context per profile; they share one activation buffer sized for the larger profile
    contexts = backend.engine.contexts
    assert len(contexts) == len(mod.spec.profiles) and len({c.device_memory for c in contexts}) == 1
    assert contexts[0].device_memory[1] == (2048 if two else 1024)
    assert backend.cache_nbytes(cache) == cache.nbytes() > 0


def test_cache_bytes_follow_the_kept_rows(fake):
    """Under kv_policy=skip a routed layer caches only its kept tokens: fewer bytes than dense."""
    make, mod = fake
    backend = make()
    _, cache = backend.prefill(*_batch())
    assert [cache.length[li] for li in (0, 1, 2)] == [11, 6, 7]
    per_row = sum(b[0].nbytes for b in cache.buffers[0].values())
    assert backend.cache_nbytes(cache) == per_row * (11 + 6 + 7)


def test_profile_limits_and_bad_engines(fake, tmp_path):
    make, mod = fake
    backend = make()
    with pytest.raises(UserError, match="outside the engine's (prefill|shared) profile"):
        backend.prefill(torch.ones(1, 65, dtype=torch.long), torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(UserError, match="maximum length 64"):
        backend.check_length(60, 10)
    (tmp_path / "eng" / "model.engine").write_bytes(b"corrupt")
    with pytest.raises(UserError, match="could not deserialise"):
        make()
    with pytest.raises(UserError, match="one engine 'model' with profiles 'shared' or 'prefill, decode'"):
        make(engines={"prefill": {"file": "model.engine"}})


def test_gpu_is_checked_before_anything_else(tmp_path, monkeypatch):
    """Without a device override the runtime checks the GPU against engine.json first."""
    d = engine_dir(tmp_path / "eng")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="need a CUDA GPU"):
        trt_runtime.TrtBackend(d)


def _batch():
    from tokenskip.deploy.runtime.generation import left_pad

    return left_pad(PROMPTS, 0)
