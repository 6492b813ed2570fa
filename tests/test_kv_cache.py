"""The preallocated KV cache (tokenskip.kv_buffer) and the CUDA-graph plumbing (tokenskip.cuda_graphs).

Greedy generation through the in-place buffers equals the concatenating cache token for token
(dense and routed, both kv policies, a left-padded batch); a decode step writes into the
preallocated storage (its pointers do not move); branching and growth stay correct; cache bytes
count the capacity. The graph wrappers run here in emulation (the function where a graph would
replay); real CUDA graphs run in the CUDA tests, which skip here with the reason printed.
"""

from __future__ import annotations

import pytest
import torch

from tokenskip.block import LayerKV
from tokenskip.cuda_graphs import Graph, GraphedDecodeCache, GraphedPrefill
from tokenskip.deploy.runtime.torch_backend import TorchBackend
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens, left_pad
from tokenskip.kv_buffer import KVBuffer, preallocate, stores
from tokenskip.routed import RoutedModel
from tokenskip.routers import StaticRouter
from tokenskip.schedule import Schedule

PROMPTS = [[5, 9, 17, 3, 44, 8, 21, 60, 2, 7, 19, 33, 12, 4, 80, 6, 11, 70, 25, 9, 14, 3, 50, 41, 23, 8],
           [40, 2, 77, 31, 9, 10, 58, 61, 3, 22, 15, 90, 7, 1, 5, 66, 13],
           [7, 7, 1, 99, 3, 18, 45, 2, 63, 5]]
NEW = 10
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (real CUDA graphs): run by scripts/device_speed.sh")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_routed(model, kind: str, kv_policy: str = "skip") -> RoutedModel:
    n = model.config.num_hidden_layers
    if kind == "dense":
        return RoutedModel(model, Schedule.dense(n), None, kv_policy=kv_policy)
    return RoutedModel(model, Schedule((0.0, 0.5, 0.3, 0.6)[:n] + (0.0,) * max(0, n - 4)), StaticRouter(),
                       kv_policy=kv_policy)


class ConcatBackend(TorchBackend):
    """The old behaviour: plain LayerKV lists, concatenated every step (the reference)."""

    @torch.no_grad()
    def prefill(self, ids, mask):
        logits, cache = self.routed.prefill(ids.to(self.device), mask.to(self.device))
        return logits.float(), cache


class Recorder:
    def __init__(self, inner):
        self.inner, self.logits, self.caches = inner, [], []

    def __getattr__(self, name):  # check_length, expect_new_tokens, stats
        return getattr(self.inner, name)

    def prefill(self, ids, mask):
        logits, cache = self.inner.prefill(ids, mask)
        self.logits.append(logits)
        self.caches.append(cache)
        return logits, cache

    def decode(self, token, position, cache):
        logits, cache = self.inner.decode(token, position, cache)
        self.logits.append(logits)
        self.caches.append(cache)
        return logits, cache


class EmulatedGraphBackend(TorchBackend):
    """TorchBackend whose decode cache carries an emulated graphed step (what CUDA gets)."""

    replays = 0

    @torch.no_grad()
    def prefill(self, ids, mask):
        logits, cache = self.routed.prefill(ids.to(self.device), mask.to(self.device))
        graphed = GraphedDecodeCache(self.routed, preallocate(cache, self.new_tokens), emulate=True)
        real = graphed.graphed_step.graph.replay

        def counted():
            EmulatedGraphBackend.replays += 1
            return real()

        graphed.graphed_step.graph.replay = counted
        return logits.float(), graphed


# ------------------------------------------------------------------------------- generation equality
@pytest.mark.parametrize("kind,kv_policy", [("dense", "skip"), ("routed", "skip"), ("routed", "dense")])
@pytest.mark.parametrize("room", ["reserved", "grows"])
def test_preallocated_generation_equals_concatenation(tiny_llama, kind, kv_policy, room):
    """Greedy tokens equal, logits equal to float32 rounding, over a left-padded batch of 3."""
    model, _ = tiny_llama
    routed = make_routed(model, kind, kv_policy)
    ref = Recorder(ConcatBackend(routed))
    ref_gen = generate_tokens(ref, PROMPTS, Sampling(max_new_tokens=NEW), pad_id=0)
    fast_backend = TorchBackend(routed)
    if room == "grows":  # room for 3 tokens only: the stores must grow during decode
        fast_backend.expect_new_tokens = lambda n: setattr(fast_backend, "new_tokens", 3)
    fast = Recorder(fast_backend)
    fast_gen = generate_tokens(fast, PROMPTS, Sampling(max_new_tokens=NEW), pad_id=0)
    assert fast_gen.tokens == ref_gen.tokens
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(ref.logits), rtol=0, atol=1e-5)
    assert all(isinstance(kv, KVBuffer) for kv in fast.caches[-1])  # really the preallocated cache
    assert all(type(kv) is LayerKV for kv in ref.caches[-1])
    for a, b in zip(fast.caches[-1], ref.caches[-1]):
        assert a.length == b.length and torch.equal(a.valid, b.valid) and torch.equal(a.pos, b.pos)
        torch.testing.assert_close(a.key, b.key, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------- in place
def prefill_cache(routed, prompts=PROMPTS):
    ids, mask = left_pad(prompts, 0)
    with torch.no_grad():
        logits, cache = routed.prefill(ids, mask)
    return logits, cache, mask.sum(-1, keepdim=True)


def test_decode_step_writes_in_place(tiny_llama):
    """No decode step allocates cache storage: every layer's key/value/pos/valid keep their data
    pointer (the preallocated store), step after step, until the capacity is used up."""
    model, _ = tiny_llama
    routed = make_routed(model, "routed")
    logits, cache, lengths = prefill_cache(routed)
    cache = preallocate(cache, 6)
    held = stores(cache)
    ptrs = [(st.key.data_ptr(), st.value.data_ptr(), st.pos.data_ptr(), st.valid.data_ptr()) for st in held]
    with torch.no_grad():
        for i in range(6):
            token = logits.argmax(-1, keepdim=True)
            logits, cache = routed.decode_step(token, lengths + i, cache)
            assert stores(cache) == held  # the same store objects
            for kv, p in zip(cache, ptrs):
                assert (kv.key.data_ptr(), kv.value.data_ptr(), kv.pos.data_ptr(), kv.valid.data_ptr()) == p
        assert all(st.length == st.capacity for st in held)
        _, grown = routed.decode_step(logits.argmax(-1, keepdim=True), lengths + 6, cache)  # past capacity
    assert all(a.store is not b.store and a.length == b.length + 1 for a, b in zip(grown, cache))


def test_branching_an_old_state_copies_and_stays_correct(tiny_llama):
    """Two continuations decoded from the same prompt cache (multiple-choice scoring does it):
    the second finds the storage taken, falls back to concatenation, and both equal the reference."""
    model, _ = tiny_llama
    routed = make_routed(model, "routed", "dense")
    _, cache, lengths = prefill_cache(routed)
    buf = preallocate(cache, 4)
    a, b = torch.full((3, 1), 11), torch.full((3, 1), 42)
    with torch.no_grad():
        la, ca = routed.decode_step(a, lengths, buf)
        lb, cb = routed.decode_step(b, lengths, buf)  # branch from the same state
        ra, _ = routed.decode_step(a, lengths, cache)
        rb, _ = routed.decode_step(b, lengths, cache)
    assert isinstance(ca[1], KVBuffer) and type(cb[1]) is LayerKV  # in place, then copied
    torch.testing.assert_close(la, ra, rtol=0, atol=1e-6)
    torch.testing.assert_close(lb, rb, rtol=0, atol=1e-6)
    assert all(kv.length == old.length for kv, old in zip(buf, cache))  # the old state still shows itself


def test_cache_bytes_count_the_capacity(tiny_llama):
    model, _ = tiny_llama
    _, cache, _ = prefill_cache(make_routed(model, "routed"))
    buf = preallocate(cache, 16)
    for kv, plain in zip(buf, cache):
        per_col = plain.nbytes // plain.length
        assert kv.nbytes == per_col * (plain.length + 16) == kv.store.nbytes
        assert sum(getattr(kv, f).nbytes for f in ("key", "value", "pos", "valid")) == plain.nbytes  # views: used part


# ------------------------------------------------------------------------------ graphs (emulated)
@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_graphed_decode_equals_eager(tiny_llama, kv_policy):
    """The static-shape step (full-capacity keys, device-side slot) that a CUDA graph captures,
    run in emulation through the generation loop: the same greedy tokens as the concatenating cache."""
    model, _ = tiny_llama
    routed = make_routed(model, "routed", kv_policy)
    ref = Recorder(ConcatBackend(routed))
    ref_gen = generate_tokens(ref, PROMPTS, Sampling(max_new_tokens=NEW), pad_id=0)
    EmulatedGraphBackend.replays = 0
    rec = Recorder(EmulatedGraphBackend(routed))
    gen = generate_tokens(rec, PROMPTS, Sampling(max_new_tokens=NEW), pad_id=0)
    assert gen.tokens == ref_gen.tokens
    assert EmulatedGraphBackend.replays == NEW - 1  # every decode step replayed the graph
    torch.testing.assert_close(torch.stack(rec.logits), torch.stack(ref.logits), rtol=0, atol=1e-5)
    last = rec.caches[-1]
    assert isinstance(last, GraphedDecodeCache)
    for kv, plain in zip(last, ref.caches[-1]):
        st = kv.store
        assert int(st.slot) == st.length == plain.length  # device slot and host mirror in step
        torch.testing.assert_close(st.key[:, :, :st.length], plain.key, rtol=0, atol=1e-6)
        assert not st.valid[:, st.length:].any()  # warm-up writes were undone


def test_graph_warmup_is_undone():
    state = torch.zeros(1)
    g = Graph(lambda: (state.add_(1).clone(),), warmup=2, emulate=True, reset=lambda: state.zero_())
    assert float(state) == 0
    assert float(g.replay()[0]) == 1 and float(g.replay()[0]) == 2


@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_graphed_prefill_equals_eager(tiny_llama, kv_policy):
    model, _ = tiny_llama
    routed = make_routed(model, "routed", kv_policy)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    graphed = GraphedPrefill(routed, 2, 24, padded=False, emulate=True)
    for seed in (1, 2):  # the static inputs take new values each call
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
        logits, cache = graphed(ids, mask)
        with torch.no_grad():
            ref_logits, ref_cache = routed.prefill(ids, mask)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
        for a, b in zip(cache, ref_cache):
            torch.testing.assert_close(a.key, b.key, rtol=0, atol=1e-6)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded"):
        graphed(ids, mask)


# ------------------------------------------------------------------------------------ real CUDA
@needs_cuda
@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_cuda_graphs_equal_eager(tiny_llama, kv_policy):
    """Real CUDA graphs: the graphed prefill and the generation loop's graphed decode (TorchBackend
    captures it on CUDA) give eager's logits and tokens."""
    model, _ = tiny_llama
    gpu = type(model)(model.config).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    routed = make_routed(gpu, "routed", kv_policy)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    for padded in (False, True):
        graphed = GraphedPrefill(routed, 2, 40, padded=padded)
        logits, _ = graphed(ids, mask)
        with torch.no_grad():
            ref, _ = routed.prefill(ids, mask)
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)
    ref_gen = generate_tokens(ConcatBackend(routed), PROMPTS, Sampling(max_new_tokens=24), pad_id=0)
    rec = Recorder(TorchBackend(routed))
    gen = generate_tokens(rec, PROMPTS, Sampling(max_new_tokens=24), pad_id=0)
    assert isinstance(rec.caches[-1], GraphedDecodeCache)
    assert gen.tokens == ref_gen.tokens


def test_failed_capture_leaves_an_eager_cache(tiny_llama, monkeypatch):
    """If capturing the decode step fails, generation decodes eagerly on intact buffers."""
    from tokenskip import cuda_graphs

    model, _ = tiny_llama
    routed = make_routed(model, "routed")
    _, cache, lengths = prefill_cache(routed)

    class Boom(RuntimeError):
        pass

    def failing_graph(fn, **kw):
        fn()  # a warm-up step runs (it writes into the cache), then the capture fails
        raise Boom("capture refused")

    monkeypatch.setattr(cuda_graphs, "Graph", failing_graph)
    monkeypatch.setattr(cuda_graphs, "decode_graphs_wanted", lambda b, n: True)
    monkeypatch.setattr(cuda_graphs, "_failures", [])
    with pytest.warns(UserWarning, match="decoding eagerly"):
        buf = cuda_graphs.decode_cache(routed, cache, 4)
    assert type(buf) is list and all(kv.store.slot is None for kv in buf)
    assert all(kv.store.length == plain.length and not kv.store.valid[:, plain.length:].any()
               for kv, plain in zip(buf, cache))
    with torch.no_grad():
        got, _ = routed.decode_step(torch.full((3, 1), 5), lengths, buf)
        ref, _ = routed.decode_step(torch.full((3, 1), 5), lengths, cache)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
