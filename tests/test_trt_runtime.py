"""The TensorRT runtime (deploy/runtime/trt_backend.py) against a fake TensorRT module (tests/fake_trt.py)
on the CPU: profile selection per phase, the KV cache written in place, output buffers reused across
steps, every copy and execution on the one stream, and what the real TensorRT enforces (256-byte
aligned addresses, shapes inside the selected profile, False on a violation): each runtime bug of
issue 21 fails here (a misaligned new-row slot, an unchecked return value, a batch above engine.json's
max_batch, a second concurrent request). The real TensorRT path needs a GPU (tests/test_runtime_gpu.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tokenskip.deploy.runtime import trt_backend as trt_runtime
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens, left_pad
from tokenskip.errors import UserError

from fake_trt import FakeContext, FakeDevice, FakeRegistry, Spec, ToyReference, fake_trt_module

PROMPTS = [[5, 9, 17, 3, 44, 8, 21, 60, 2, 7, 19], [40, 2, 77, 31, 9, 10]]
UNEVEN = {0: (1, 1), 1: (1, 2), 2: (3, 5)}


def engine_dir(path, spec: Spec, **meta):
    """An engine folder whose engine.json matches the fake engine's build settings."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "model.engine").exists():
        (path / "model.engine").write_bytes(b"engine")
    side = {"format": "tokenskip-engines", "version": 1, "backend": "tensorrt", "max_seq_len": spec.max_seq,
            "max_batch": spec.max_batch, "compute_capabilities": ["9.0"], "plugin_library": None,
            "engines": {"model": {"file": "model.engine", "profiles": list(spec.profiles)}}, **meta}
    (path / "engine.json").write_text(json.dumps(side))
    return path


def opener(tmp_path, monkeypatch, spec: Spec):
    """(make_backend(**engine.json fields), module): TrtBackend on a fake TensorRT for `spec`."""
    mod = fake_trt_module(spec)
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda flavour: mod)

    def make(**meta):
        return trt_runtime.TrtBackend(engine_dir(tmp_path / "eng", spec, **meta), device=FakeDevice(mod))
    return make, mod


@pytest.fixture(params=[("shared",), ("prefill", "decode")], ids=["shared-profile", "phase-profiles"])
def fake(tmp_path, monkeypatch, request):
    """A toy model with uneven kept counts, one shared profile or a prefill and a decode profile."""
    return opener(tmp_path, monkeypatch, Spec(keep=UNEVEN, profiles=request.param))


def executions(mod):
    return [e for e in mod.log if e[0] == "execute"]


def test_generation_matches_the_reference_with_the_cache_in_place(fake):
    """Greedy generation through the runtime equals the toy model computed with growing lists: the
    runtime fed each layer exactly its filled rows and wrote every new row to the next slot, across
    a capacity growth, with left padding and per-layer kept counts."""
    make, mod = fake
    backend = make()
    backend.check_length(11, 12)
    backend.expect_new_tokens = lambda n: setattr(backend, "new_tokens", 1)  # the cache grows (x2 copies) in the run
    got = generate_tokens(backend, PROMPTS, Sampling(12), pad_id=0)
    want = generate_tokens(ToyReference(mod.spec), PROMPTS, Sampling(12), pad_id=0)
    assert got.tokens == want.tokens and len(got.tokens[0]) == 12
    assert len({tuple(t) for t in got.tokens}) > 1  # the toy model's tokens depend on the cache
    assert not [e for e in mod.log if e[0] == "refused"]


def test_profiles_aligned_bindings_buffers_and_stream(fake):
    make, mod = fake
    backend = make()
    backend.expect_new_tokens(6)  # cache sized for the whole generation: no growth
    logits, cache = backend.prefill(*left_pad(PROMPTS, 0))
    for step in range(5):
        logits, cache = backend.decode(logits.argmax(-1, keepdim=True), torch.full((2, 1), 11 + step), cache)
    runs = executions(mod)
    # each phase on its own profile (prefill 0, decode 1), or both on the shared one
    two = mod.spec.profiles == ["prefill", "decode"]
    assert [r[1] for r in runs] == [0] + [1 if two else 0] * 5
    assert runs[0][4]["input_ids"] == (2, 11) and all(r[4]["input_ids"] == (2, 1) for r in runs[1:])
    assert runs[0][4]["past.1.key"][0] == 0  # prefill: an empty past
    # every address TensorRT saw is 256-byte aligned
    assert all(ptr % 256 == 0 for r in runs for ptr in r[3].values())
    # the past grows by one row per decode step, bound at the cache buffer's address (no copy)
    lengths = [r[4]["past.1.key"][0] for r in runs[1:]]
    assert lengths == list(range(6, 11))  # kept 6 of 11
    assert {r[3]["past.1.key"] for r in runs[1:]} == {cache.buffers[1]["key"].data_ptr()}
    # new rows: at the next slot where that is aligned, else in one reused staging buffer
    for field in ("key", "pos", "valid"):
        buf = cache.buffers[1][field]
        slots = [buf.data_ptr() + buf[0].nbytes * n for n in lengths]
        bound = [r[3][f"new.1.{field}"] for r in runs[1:]]
        direct = [b for b, s in zip(bound, slots) if b == s]
        assert all(s % 256 == 0 for s in direct) and len(set(bound) - set(direct)) <= 1, field
    assert [r[3]["new.1.pos"] for r in runs[1:]].count(runs[1][3]["new.1.pos"]) == 5  # 16-byte rows: staged
    # output and input buffers are reused across decode steps
    for name in ("logits", "input_ids", "position_ids", "index.1"):
        assert len({r[3][name] for r in runs[1:]}) == 1, name
    # one stream: profile selection, every copy and every execution
    streams = {e[2] for e in mod.log if e[0] in ("profile", "execute")} | {e[1] for e in mod.log if e[0] == "copy"}
    assert streams == {FakeDevice.handle}
    # one context per profile; they share one activation buffer sized for the larger profile
    contexts = backend.engine.contexts
    assert len(contexts) == len(mod.spec.profiles) and len({c.device_memory for c in contexts}) == 1
    assert contexts[0].device_memory[1] == (2048 if two else 1024)
    assert backend.cache_nbytes(cache) == cache.nbytes() > 0


def test_the_old_misaligned_slot_binding_fails(fake, monkeypatch):
    """Binding new rows at base + n * row (the bug) is refused by TensorRT's alignment rule: the
    fake refuses the address, and the runtime says which tensor."""
    make, mod = fake
    backend = make()
    logits, cache = backend.prefill(*left_pad(PROMPTS, 0))
    monkeypatch.setattr(trt_runtime, "is_aligned", lambda t: True)  # bind every slot directly, as before
    with pytest.raises(RuntimeError, match=r"refused the address of new\.\d\.(key|value|pos|valid) .*not 256-byte"):
        backend.decode(logits.argmax(-1, keepdim=True), torch.full((2, 1), 11), cache)
    assert any(e[0] == "refused" and e[1] == "address" for e in mod.log)


def test_the_fake_refuses_what_tensorrt_refuses(tmp_path, monkeypatch):
    make, mod = opener(tmp_path, monkeypatch, Spec())
    ctx = make().engine.contexts[1]  # the decode profile: S = 1, past 1..64, batch 1..4
    assert ctx.set_input_shape("input_ids", (2, 1)) and not ctx.set_input_shape("input_ids", (2, 5))
    assert not ctx.set_input_shape("input_ids", (5, 1)) and not ctx.set_input_shape("past.0.pos", (0, 2))
    assert not ctx.set_tensor_address("logits", 0x1000 + 64) and ctx.set_tensor_address("logits", 0x1000)
    assert not ctx.set_optimization_profile_async(2, FakeDevice.handle)
    assert not ctx.execute_async_v3(FakeDevice.handle)  # inputs and addresses unset
    assert mod.registry.load_library(str(tmp_path / "eng" / "model.engine")) is None  # not a plugin library


@pytest.mark.parametrize("method, result, match", [
    ("set_input_shape", False, r"refused input input_ids of shape \(2, 11\) in the prefill profile"),
    ("set_tensor_address", False, r"refused the address of input_ids \(shape \(2, 11\)"),
    ("infer_shapes", ["past.0.key"], r"cannot infer the prefill output shapes: past\.0\.key"),
    ("execute_async_v3", False, r"execute_async_v3 failed in the prefill step \(input_ids \(2, 11\)"),
])
def test_every_return_value_is_checked(tmp_path, monkeypatch, method, result, match):
    make, mod = opener(tmp_path, monkeypatch, Spec())
    backend = make()
    monkeypatch.setattr(FakeContext, method, lambda self, *a: result)
    with pytest.raises(RuntimeError, match=match):
        backend.prefill(*left_pad(PROMPTS, 0))


def test_profile_selection_is_checked(tmp_path, monkeypatch):
    make, _ = opener(tmp_path, monkeypatch, Spec())
    monkeypatch.setattr(FakeContext, "set_optimization_profile_async", lambda self, p, stream: False)
    with pytest.raises(RuntimeError, match=r"refused optimisation profile 0 \(prefill\)"):
        make()


def test_limits_come_from_engine_json(tmp_path, monkeypatch):
    make, mod = opener(tmp_path, monkeypatch, Spec(max_batch=2, min_seq=4))
    backend = make()
    assert (backend.max_batch, backend.max_length, backend.min_seq_len) == (2, 64, 4)
    assert backend.model_facts().max_batch == 2  # what `generate --engine` batches prompts by
    three = left_pad(PROMPTS + [[1, 2, 3, 4, 5]], 0)
    with pytest.raises(UserError, match=r"batch of 3 sequences exceeds the engine's --max-batch 2 .*engine\.json"):
        backend.prefill(*three)
    with pytest.raises(UserError, match="batch of 3 sequences exceeds the engine's --max-batch 2"):
        backend.decode(torch.ones(3, 1, dtype=torch.long), torch.full((3, 1), 9), None)
    with pytest.raises(UserError, match=r"65 tokens .* --max-seq-len 64"):
        backend.prefill(torch.ones(1, 65, dtype=torch.long), torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(UserError, match=r"3 tokens .* --min-seq-len 4"):
        backend.prefill(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(UserError, match="maximum length 64"):
        backend.check_length(60, 10)
    assert not executions(mod)
    with pytest.raises(UserError, match=r"says max_batch 8, max_seq_len 64; the engine's profiles allow batch 2"):
        make(max_batch=8)
    with pytest.raises(UserError, match="'max_batch' is None"):
        make(max_batch=None)


def test_serve_takes_its_max_batch_from_engine_json(tmp_path):
    d = engine_dir(tmp_path / "eng", Spec(max_batch=2))
    assert trt_runtime.serve_max_batch(d, 32, given=False) == 2  # serve's default 32 is not the engine's
    assert trt_runtime.serve_max_batch(d, 1, given=True) == 1
    with pytest.raises(UserError, match=r"--max-batch 3: the engine .* runs at most 2 sequences at once"):
        trt_runtime.serve_max_batch(d, 3, given=True)


@pytest.mark.parametrize("engine_batch", [1, 2])
def test_two_concurrent_requests_decode(tmp_path, monkeypatch, engine_batch):
    """The server's scheduler with serve's batch size for this engine: a second request that arrives
    while the first decodes joins it (engine batch 2) or waits (batch 1); both finish normally, with
    the tokens each gets alone. Before, a batch-1 engine served with --max-batch 32 failed both."""
    from tokenskip.deploy.serve.scheduler import Scheduler, Sequence

    make, mod = opener(tmp_path, monkeypatch, Spec(max_batch=engine_batch))
    backend = make()
    sched = Scheduler(backend, pad_id=0, max_batch=trt_runtime.serve_max_batch(tmp_path / "eng", 32, given=False),
                      batch_wait_s=0)
    events: dict[int, list] = {0: [], 1: []}
    seqs = [Sequence(rid=str(i), prompt=p, sampling=Sampling(8), emit=events[i].append)
            for i, p in enumerate(PROMPTS)]
    sched.submit(seqs[0])
    sched.step(), sched.step()  # prefill, one decode step
    sched.submit(seqs[1])
    for _ in range(100):
        if not sched.step():
            break
    assert [s.finish for s in seqs] == ["length", "length"], [e for ev in events.values() for e in ev if e.error]
    want = [generate_tokens(ToyReference(mod.spec), [p], Sampling(8), pad_id=0).tokens[0] for p in PROMPTS]
    assert [s.tokens for s in seqs] == want
    assert max(r[4]["input_ids"][0] for r in executions(mod)) == engine_batch


def test_rtx_runtime_cache_is_persisted_and_reused(tmp_path, monkeypatch, capsys):
    make, mod = opener(tmp_path, monkeypatch, Spec())
    backend = make(backend="tensorrt-rtx")
    path = tmp_path / "eng" / "runtime-fake-gpu-9000.cache"
    logits, cache = backend.prefill(*left_pad(PROMPTS, 0))
    backend.decode(logits.argmax(-1, keepdim=True), torch.full((2, 1), 11), cache)
    assert [r[5] for r in executions(mod)] == ["compiled", "compiled"] and path.is_file()
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
    again = make(backend="tensorrt-rtx")
    assert again.runtime_cache.loaded
    again.prefill(*left_pad(PROMPTS, 0))
    assert executions(mod)[-1][5] == "hit"  # the kernels compiled by the first process
    path.write_bytes(b"from another driver")
    stale = make(backend="tensorrt-rtx")
    assert not stale.runtime_cache.loaded and "recompiles" in capsys.readouterr().err
    stale.close()
    assert path.read_bytes().startswith(b"fake-rtx-runtime-cache")
    monkeypatch.setattr("os.access", lambda p, mode: False)  # a read-only engine folder: the user cache instead
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))
    ro = make(backend="tensorrt-rtx")
    assert ro.runtime_cache.path.parent.parent == tmp_path / "cache" / "trt-runtime"
    assert not make().runtime_cache  # full TensorRT: no runtime cache


def test_plugin_library_load_is_checked(tmp_path, monkeypatch):
    make, mod = opener(tmp_path, monkeypatch, Spec())
    lib = tmp_path / "eng" / "libtokenskip_plugins.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not a library")
    with pytest.raises(UserError, match=r"could not load the plugin library .*libtokenskip_plugins\.so"):
        make(plugin_library=lib.name)
    lib.write_bytes(FakeRegistry.MAGIC)
    make(plugin_library=lib.name)
    assert [c.name for c in mod.registry.all_creators] == ["TopKGather", "ScatterTokens"]
    copy = tmp_path / "eng" / "copy" / lib.name  # the same library from another path: replaced, not refused
    copy.parent.mkdir()
    copy.write_bytes(FakeRegistry.MAGIC)
    make(plugin_library=f"copy/{lib.name}")
    assert list(mod.registry.libraries.values()) == [str(copy.resolve())]


def test_cache_bytes_follow_the_kept_rows(fake):
    """Under kv_policy=skip a routed layer caches only its kept tokens: fewer bytes than dense."""
    make, mod = fake
    backend = make()
    _, cache = backend.prefill(*left_pad(PROMPTS, 0))
    assert [cache.length[li] for li in (0, 1, 2)] == [11, 6, 7]
    per_row = sum(b[0].nbytes for b in cache.buffers[0].values())
    assert backend.cache_nbytes(cache) == per_row * (11 + 6 + 7)


def test_bad_engines(fake, tmp_path):
    make, mod = fake
    make()
    (tmp_path / "eng" / "model.engine").write_bytes(b"corrupt")
    with pytest.raises(UserError, match="could not deserialise"):
        make()
    with pytest.raises(UserError, match="one engine 'model' with profiles 'shared' or 'prefill, decode'"):
        make(engines={"prefill": {"file": "model.engine"}})


def test_gpu_is_checked_before_anything_else(tmp_path, monkeypatch):
    """Without a device override the runtime checks the GPU against engine.json first."""
    d = engine_dir(tmp_path / "eng", Spec())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="need a CUDA GPU"):
        trt_runtime.TrtBackend(d)


def test_serve_command_line_resolves_max_batch(tmp_path):
    """`tokenskip serve --engine DIR` (resolved flags via --write-spec, nothing served)."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from click.testing import CliRunner

    from tokenskip.deploy.serve.cli import serve

    d = engine_dir(tmp_path / "eng", Spec(max_batch=2))
    spec = tmp_path / "spec.json"
    res = CliRunner().invoke(serve, ["--engine", str(d), "--write-spec", str(spec)])
    assert res.exit_code == 0, res.output
    assert json.loads(spec.read_text())["settings"]["max_batch"] == 2
    res = CliRunner().invoke(serve, ["--engine", str(d), "--max-batch", "8", "--write-spec", str(spec)])
    assert res.exit_code == 1 and "--max-batch 8: the engine" in res.output and "Traceback" not in res.output
