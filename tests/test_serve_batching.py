"""Serving without HTTP: the batching scheduler, cache row operations and the analytic KV-cache
size, on the tiny random Llama (PyTorch backend). The scheduler is stepped by the test itself,
so which requests share a prefill and when new ones join is deterministic."""

from __future__ import annotations

import pytest
import torch

from tokenskip.config import build_routed
from tokenskip.deploy.runtime.torch_backend import TorchBackend
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens, left_pad
from tokenskip.deploy.runtime.kv_cache import KVCache
from tokenskip.deploy.runtime.kv_rows import SEQ_MAJOR_OPS
from tokenskip.export.wrappers import from_seq_major, to_seq_major
from tokenskip.kv_buffer import KVBuffer
from tokenskip.deploy.serve.model_info import model_info
from tokenskip.deploy.serve.scheduler import QueueFull, Scheduler, Sequence
from tokenskip.kv_bytes import cached_tokens, kv_cache_bytes
from tokenskip.schedule import Schedule

PAD = 1
pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = (3, 40, 17, 9, 60, 25)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 250, (n,), generator=g).tolist() for n in LENGTHS]


def backend(tiny_llama, router: str, kv_policy: str = "skip") -> TorchBackend:
    model, _ = tiny_llama
    routed, _ = build_routed(model, router=router, sparsity=0.5 if router == "static" else None, kv_policy=kv_policy)
    return TorchBackend(routed)


def run_staggered(be, prompts, sampling, continuous: bool, join_after: int = 3, **kw):
    """Submit the first half, run `join_after` steps, submit the rest, run to the end."""
    sched = Scheduler(be, pad_id=PAD, max_batch=8, continuous=continuous, batch_wait_s=0, **kw)
    events: dict[int, list] = {}
    seqs = [Sequence(rid=str(i), prompt=p, sampling=sampling, emit=lambda e, i=i: events.setdefault(i, []).append(e))
            for i, p in enumerate(prompts)]
    half = len(seqs) // 2
    for s in seqs[:half]:
        sched.submit(s)
    for _ in range(join_after):
        sched.step()
    for s in seqs[half:]:
        sched.submit(s)
    for _ in range(10_000):
        if not sched.step():
            break
    return seqs, events, sched


def alone(be, prompts, sampling, eos=()):
    return [generate_tokens(be, [p], sampling, pad_id=PAD, eos_ids=eos).tokens[0] for p in prompts]


# ------------------------------------------------------------------------ batched == unbatched
@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "dynamic"])
def test_dense_batched_equals_unbatched_greedy(tiny_llama, prompts, continuous):
    be = backend(tiny_llama, "dense")
    seqs, events, sched = run_staggered(be, prompts, Sampling(12), continuous)
    assert [s.tokens for s in seqs] == alone(be, prompts, Sampling(12))
    assert sched.stats.prefills == 2 and sched.ops is be.cache_ops()  # the backend's row operations
    # continuous: the second half joined the running batch, so fewer decode steps in all
    assert sched.stats.decode_steps == (13 if continuous else 22)
    for i, s in enumerate(seqs):  # every token emitted once, the last one carries the finish
        assert [e.token for e in events[i]] == s.tokens and events[i][-1].finish == "length"


def test_routed_batched_equals_alone_with_the_batch_padding(tiny_llama, prompts):
    """The batching machinery is exact for a routed model too: each row equals the prompt run
    alone, left-padded as its prefill batch was (today k follows the padded length)."""
    be = backend(tiny_llama, "static")
    seqs, _, _ = run_staggered(be, prompts, Sampling(12), continuous=True)
    half = len(prompts) // 2
    for group in (prompts[:half], prompts[half:]):
        width = max(len(p) for p in group)
        for p in group:
            ids, mask = left_pad([p], PAD)
            padded = TorchBackend(be.routed)
            pad = width - len(p)
            padded.prefill = lambda _i, _m, ids=ids, mask=mask, pad=pad, inner=be: inner.prefill(
                torch.nn.functional.pad(ids, (pad, 0), value=PAD), torch.nn.functional.pad(mask, (pad, 0)))
            want = generate_tokens(padded, [p], Sampling(12), pad_id=PAD).tokens[0]
            assert seqs[prompts.index(p)].tokens == want


def test_routed_batched_equals_unbatched_greedy(tiny_llama, prompts):
    be = backend(tiny_llama, "static")
    seqs, _, _ = run_staggered(be, prompts, Sampling(12), continuous=True)
    assert [s.tokens for s in seqs] == alone(be, prompts, Sampling(12))


def test_per_row_stopping_and_sampling(tiny_llama, prompts):
    """EOS ends one row, max_tokens differ per row, a sampled row equals its unbatched run."""
    be = backend(tiny_llama, "dense")
    ref = alone(be, prompts[:1], Sampling(12))[0]
    eos = ref[4]
    sched = Scheduler(be, pad_id=PAD, max_batch=8, batch_wait_s=0)
    spec = [Sampling(12), Sampling(5), Sampling(9, temperature=0.9, top_p=0.8, seed=7)]
    seqs = [Sequence(rid=str(i), prompt=p, sampling=s, emit=lambda e: None, eos=frozenset([eos]) if i == 0 else frozenset())
            for i, (p, s) in enumerate(zip(prompts, spec))]
    for s in seqs:
        sched.submit(s)
    while sched.step():
        pass
    assert seqs[0].tokens == ref[:ref.index(eos) + 1] and seqs[0].finish == "stop"
    assert seqs[1].tokens == alone(be, prompts[1:2], spec[1])[0] and seqs[1].finish == "length"
    assert seqs[2].tokens == alone(be, prompts[2:3], spec[2])[0] and len(seqs[2].tokens) == 9


def test_abort_drops_the_row_and_its_cache(tiny_llama, prompts):
    be = backend(tiny_llama, "dense")
    sched = Scheduler(be, pad_id=PAD, max_batch=8, batch_wait_s=0)
    got = {}
    seqs = [Sequence(rid=str(i), prompt=p, sampling=Sampling(50), emit=lambda e, i=i: got.setdefault(i, e))
            for i, p in enumerate(prompts[:3])]
    for s in seqs:
        sched.submit(s)
    sched.step()
    sched.step()
    before = sched.cache[0].key.shape[0]
    sched.abort("1")
    sched.step()
    assert seqs[1].finish == "abort" and len(seqs[1].tokens) == 2
    assert before == 3 and sched.cache[0].key.shape[0] == 2 and [s.rid for s in sched.rows] == ["0", "2"]
    while sched.step():
        pass
    assert seqs[0].tokens == alone(be, prompts[:1], Sampling(50))[0]


def test_queue_bound(tiny_llama, prompts):
    be = backend(tiny_llama, "dense")
    sched = Scheduler(be, pad_id=PAD, max_batch=1, max_waiting=2, batch_wait_s=0)
    mk = lambda i: Sequence(rid=str(i), prompt=prompts[0], sampling=Sampling(4), emit=lambda e: None)  # noqa: E731
    sched.submit(mk(0))
    sched.submit(mk(1))
    with pytest.raises(QueueFull, match="queue is full"):
        sched.submit(mk(2))


class OpaqueCache(TorchBackend):
    """A backend whose cache the scheduler cannot split: it must fall back to dynamic batching."""

    def prefill(self, ids, mask):
        logits, cache = super().prefill(ids, mask)
        return logits, ("opaque", cache)

    def decode(self, token, position, cache):
        logits, inner = super().decode(token, position, cache[1])
        return logits, ("opaque", inner)

    def cache_ops(self):
        return None


def test_unknown_cache_layout_falls_back_to_dynamic_batching(tiny_llama, prompts):
    be = OpaqueCache(backend(tiny_llama, "dense").routed)
    seqs, _, sched = run_staggered(be, prompts[:4], Sampling(6), continuous=True)
    assert sched.ops is None and sched.stats.prefills == 2
    assert [s.tokens for s in seqs] == alone(be, prompts[:4], Sampling(6))


# ------------------------------------------------------------------------------ cache row ops
def seq_major(cache) -> KVCache:
    """A torch cache copied into the ONNX Runtime / TensorRT cache type (seq-major KVCache)."""
    first = cache[0]
    kv = KVCache.allocate({li: c.length + 2 for li, c in enumerate(cache)}, first.key.shape[0], first.key.shape[1],
                          first.key.shape[3], first.key.dtype, "cpu")
    for li, c in enumerate(cache):
        kv.write(li, dict(zip(("key", "value", "pos", "valid"), to_seq_major(c))))
    return kv


def test_cache_ops_select_and_concat_roundtrip(tiny_llama, prompts):
    """Both cache types: concat right-aligns caches of different lengths (shorter ones left-padded
    with inert entries), select takes rows back out in any order (trimming columns no kept row
    uses), and the results are preallocated with the room asked for."""
    be = backend(tiny_llama, "static")
    caches = [be.prefill(*left_pad([p], PAD))[1] for p in prompts[:3]]  # 3, 40, 17 tokens
    ops = be.cache_ops()
    both = ops.concat(caches, 5)
    for li, kv in enumerate(both):
        assert isinstance(kv, KVBuffer) and kv.store.capacity == kv.length + 5
        assert kv.key.shape[0] == 3 and kv.length == max(c[li].length for c in caches)
        for row, c in enumerate(caches):
            pad = kv.length - c[li].length
            assert not kv.valid[row, :pad].any() and not kv.key[row, :, :pad].any()  # inert filler
        for rows in ([1], [2, 0], [0, 1, 2]):
            back = ops.select(both, rows, 7)[li]
            assert back.store.capacity == back.length + 7
            for i, row in enumerate(rows):
                want = caches[row][li]
                if len(rows) == 1:
                    torch.testing.assert_close(back.key, want.key, rtol=0, atol=0)
                    assert torch.equal(back.valid, want.valid) and torch.equal(back.pos, want.pos)
                else:  # right-aligned, padded to the longest kept row
                    assert torch.equal(back.key[i, :, back.length - want.length:], want.key[0])
                    assert not back.valid[i, :back.length - want.length].any()
    assert ops.fit(both, 5) is both and ops.fit(both, 6) is not both  # no copy when the room is there

    named = [seq_major(c) for c in caches]
    sops = SEQ_MAJOR_OPS
    stacked = sops.concat(named, 4)
    for li, kv in enumerate(both):
        assert stacked.capacity(li) == stacked.length[li] + 4
        got = from_seq_major(*(stacked.past(li)[f] for f in ("key", "value", "pos", "valid")))
        assert torch.equal(got.key, kv.key) and torch.equal(got.valid, kv.valid) and torch.equal(got.pos, kv.pos)
        back = sops.select(stacked, [2, 0], 3)
        want = ops.select(both, [2, 0], 3)[li]
        got = from_seq_major(*(back.past(li)[f] for f in ("key", "value", "pos", "valid")))
        assert torch.equal(got.key, want.key) and torch.equal(got.valid, want.valid) and torch.equal(got.pos, want.pos)
    assert stacked.extra == {} and sops.fit(stacked, 4) is stacked


def test_decode_writes_in_place_between_regroupings(tiny_llama, prompts):
    """The scheduler's caches have room for the batch's remaining decode steps (beyond the
    backend's default 64 too): a decode step moves no storage; only joins and finished rows do."""
    be = backend(tiny_llama, "static")
    sched = Scheduler(be, pad_id=PAD, max_batch=8, batch_wait_s=0)
    seqs = [Sequence(rid=str(i), prompt=p, sampling=Sampling(n), emit=lambda e: None)
            for i, (p, n) in enumerate(zip(prompts[:3], (80, 60, 70)))]
    for s in seqs[:2]:
        sched.submit(s)
    moves, decodes = 0, 0
    for step in range(200):
        if step == 5:
            sched.submit(seqs[2])  # joins after 4 decode steps
        before = [kv.store for kv in sched.cache] if sched.cache else None
        rows = [s.rid for s in sched.rows]
        decoding = bool(sched.rows) and not sched.waiting
        if not sched.step():
            break
        if decoding and before is not None and sched.cache is not None:
            decodes += 1
            same = all(a is kv.store for a, kv in zip(before, sched.cache))
            moves += not same
            assert same == (rows == [s.rid for s in sched.rows]), step  # moved exactly when rows changed
    assert all(s.finish == "length" for s in seqs) and decodes > 70 and moves == 2  # the 60 and 70 rows left
    assert [s.tokens for s in seqs] == [alone(be, [p], Sampling(n))[0] for p, n in zip(prompts, (80, 60, 70))]


# -------------------------------------------------------------------------------- KV budget
@pytest.mark.parametrize("router,kv_policy", [("dense", "skip"), ("static", "skip"), ("static", "dense")])
def test_kv_cache_bytes_equals_the_real_cache(tiny_llama, prompts, router, kv_policy):
    be = backend(tiny_llama, router, kv_policy)
    info = model_info(be, "tiny")
    p = prompts[4]  # 60 tokens
    ids, mask = left_pad([p], PAD)
    _, cache = be.prefill(ids, mask)
    assert be.cache_nbytes(cache) == info.kv_bytes(len(p), 0)
    for step in range(3):
        _, cache = be.decode(torch.tensor([[5]]), torch.tensor([[len(p) + step]]), cache)
    assert be.cache_nbytes(cache) == info.kv_bytes(len(p), 3)
    if router == "static" and kv_policy == "skip":
        assert info.kv_bytes(len(p), 3) < model_info(backend(tiny_llama, "dense"), "d").kv_bytes(len(p), 3)


def test_kv_cache_bytes_formula():
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, hidden_size=256)
    sched = Schedule((0.0, 0.5, 0.5, 0.0))
    assert cached_tokens(4, sched, 100, 10, "skip") == [110, 60, 60, 110]
    assert cached_tokens(4, sched, 100, 10, "dense") == [110] * 4
    per_token = 2 * 2 * 32 * 2 + 9  # K+V fp16 over 2 KV heads of 32 + position/validity
    assert kv_cache_bytes(cfg, sched, 100, 10, "skip", "float16") == per_token * 340
    assert kv_cache_bytes(cfg, None, 100, 10, "skip", "bf16", index_bytes=0) == 2 * 2 * 32 * 2 * 440


def test_kv_budget_admits_more_routed_sequences(tiny_llama, prompts):
    """Same budget, same requests: the routed server runs more sequences at once than dense."""
    dense, routed = backend(tiny_llama, "dense"), backend(tiny_llama, "static")
    p, new = prompts[4], 8
    d_bytes = model_info(dense, "d").kv_bytes(len(p), new)
    r_bytes = model_info(routed, "r").kv_bytes(len(p), new)
    budget = 2 * d_bytes + d_bytes // 2  # 2 dense sequences fit, the routed ones are smaller
    peak = {}
    for name, be, need in (("dense", dense, d_bytes), ("routed", routed, r_bytes)):
        sched = Scheduler(be, pad_id=PAD, max_batch=16, kv_budget=budget, batch_wait_s=0)
        seqs = [Sequence(rid=str(i), prompt=p, sampling=Sampling(new), emit=lambda e: None, kv_bytes=need)
                for i in range(6)]
        for s in seqs:
            sched.submit(s)
        while sched.step():
            assert sched.kv_used <= budget
        assert all(s.finish == "length" for s in seqs)
        peak[name] = sched.stats.max_running
    assert peak["dense"] == 2 and peak["routed"] == budget // r_bytes > 2
    with pytest.raises(ValueError, match="more than the server's whole budget"):
        Scheduler(dense, pad_id=PAD, kv_budget=d_bytes - 1).submit(
            Sequence(rid="x", prompt=p, sampling=Sampling(new), emit=lambda e: None, kv_bytes=d_bytes))


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args,message", [
    (["--onnx", "/nonexistent/export"], "no such export folder"),
    (["--max-batch", "0"], "--max-batch and --max-queue must be >= 1"),
    (["--kv-cache-gb", "-1"], "--kv-cache-gb -1.0: must be > 0"),
    (["--replicas", "2", "--max-replicas", "1"], "--max-replicas >= --replicas"),
    (["--onnx", "/x", "--sparsity", "0.3"], "an export or engine carries its own routing"),
])
def test_serve_cli_errors_are_one_line(args, message):
    from click.testing import CliRunner

    from tokenskip.deploy.serve.cli import serve

    res = CliRunner().invoke(serve, [*args, "--port", "0"])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


def test_missing_extra_is_named(monkeypatch):
    from tokenskip.deploy.serve import launch
    from tokenskip.errors import UserError

    monkeypatch.setitem(launch.EXTRA_MODULES, "serve", ("fastapi", "no_such_module_xyz"))
    with pytest.raises(UserError, match=r"needs the `serve` extra .*pip install 'tokenskip\[serve\]'"):
        launch.require_extra("serve", "tokenskip serve")


@pytest.mark.slow
def test_text_stream_never_splits_a_character():
    """Byte-level BPE spells an emoji over several tokens: no delta may carry half of it (U+FFFD)."""
    from transformers import AutoTokenizer

    from tokenskip.deploy.serve.textstream import TextStream
    from tokenskip.models import resolve_model_source

    tok = AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m"))
    text = "héllo 🌍 wörld, 日本語 ok 🤖!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, [])
    deltas = [stream.push(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert len(ids) > len([d for d in deltas if d])  # some tokens really were held back
    stopper = TextStream(tok, ["wör"])
    out = "".join(stopper.push(t) for t in ids)
    assert out == "héllo 🌍 " and stopper.stopped
