"""The routed model really skips tokens, and equals dense where it should (issue: Core)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenskip import ops, ops_reference
from tokenskip.routed import RoutedModel, forced_tokens
from tokenskip.routers import LearnedRouter, RandomRouter, StaticRouter
from tokenskip.schedule import Schedule


def padded_batch(vocab: int, seq: int = 40, seed: int = 0):
    """3 rows: full, left-padded, right-padded. Position ids skip left padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, seq), generator=g)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, :7] = 0
    mask[2, seq - 10:] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def recorder(store: dict, key: str, what=lambda x: x):
    """A forward hook that keeps the first input it sees under `key` (and returns None, so the
    module's output is untouched)."""
    def hook(module, inputs, output):
        if key not in store:
            store[key] = what(inputs[0])
    return hook


def hf_logits(model, ids, mask, pos):
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


# ---------------------------------------------------------------------------------------------- ops
@pytest.mark.parametrize("seq,num,den", [(1, 1, 2), (10, 7, 10), (37, 3, 10), (64, 1, 1), (5000, 6, 10)])
def test_torch_ops_match_numpy_reference(seq, num, den):
    g = torch.Generator().manual_seed(seq)
    hidden = torch.randn(2, seq, 8, generator=g)
    scores = torch.randint(0, 5, (2, seq), generator=g).float()  # many ties
    scores[0, 0] = float("inf")
    scores[1, -1] = float("-inf")
    kept, index = ops.topk_gather(hidden, scores, torch.ones(2, seq, dtype=torch.bool), num, den, 2)
    ref_kept, ref_index = ops_reference.topk_gather(hidden.numpy(), scores.numpy(), num, den, 2)
    assert np.array_equal(index.numpy(), ref_index)
    assert np.array_equal(kept.numpy(), ref_kept)
    delta = torch.randn(kept.shape, generator=g)
    out = ops.scatter_tokens(hidden, delta, index)
    np.testing.assert_allclose(out.numpy(), ops_reference.scatter_tokens(hidden.numpy(), delta.numpy(), ref_index),
                               rtol=0, atol=1e-6)


def test_keep_count_uses_exact_integers():
    # 0.7 * 10 = 7.000000000000001 in float64: a float ceil would keep 8
    assert ops_reference.keep_count(10, 7, 10, 2) == 7
    assert Schedule((0.3,)).keep_count(0, 10) == 7
    assert ops_reference.keep_count(3, 1, 10, 2) == 2  # min_keep
    assert ops_reference.keep_count(1, 1, 10, 2) == 1  # never above S


def test_forced_tokens_first_last_and_tail():
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    f = forced_tokens(valid, n_tail=2)
    assert f[0].nonzero().flatten().tolist() == [2, 4, 5, 6]  # first valid, last prompt token, 2 tail
    assert f[1].nonzero().flatten().tolist() == [0, 2, 3, 4]
    f0 = forced_tokens(valid, n_tail=0)
    assert f0[1].nonzero().flatten().tolist() == [0, 4]


# -------------------------------------------------------------------------------- equality to dense
@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_sparsity_zero_equals_hf_tiny(tiny_llama, kv_policy):
    model, _ = tiny_llama
    ids, mask, pos = padded_batch(model.config.vocab_size)
    n = model.config.num_hidden_layers
    with torch.no_grad():
        ref = hf_logits(model, ids, mask, pos)
        for router in (StaticRouter(), LearnedRouter()):
            out = RoutedModel(model, Schedule.dense(n), router, kv_policy=kv_policy)(ids, mask).logits
            assert (out - ref).abs()[mask.bool()].max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_sparsity_zero_equals_hf_smollm2(smollm2, kv_policy):
    """Sparsity 0 (no block routed) and keep-all routing (every block gathers all S tokens)."""
    model = smollm2.model
    n = model.config.num_hidden_layers
    with torch.no_grad():
        ids, mask, pos = padded_batch(model.config.vocab_size)
        ref = hf_logits(model, ids, mask, pos)
        for rows in (slice(0, 1), slice(0, 3)):  # batch 1, batch 3 (left + right padding)
            # the reference at the same batch shape: CPU GEMM kernels block by shape, so batch 1 and
            # a row of batch 3 differ by accumulation order (5.5e-5 on an AVX-512/AMX Xeon, where
            # the same shapes agree to the bit)
            r_ids, r_mask = ids[rows], mask[rows]
            r_ref = hf_logits(model, r_ids, r_mask, pos[rows])
            out = RoutedModel(model, Schedule.dense(n), StaticRouter(), kv_policy=kv_policy)(r_ids, r_mask).logits
            diff = (out - r_ref).abs()[r_mask.bool()].max().item()
            assert diff <= 1e-5, diff
        # every block routed but k = S: real gather/scatter of all tokens. The scatter adds the
        # delta (out - in) back onto the input, which rounds differently from HF's residual adds.
        keep_all = Schedule(tuple([1e-4] * n))
        out = RoutedModel(model, keep_all, StaticRouter(), kv_policy=kv_policy)(ids, mask, trace=True)
        assert all(t.k == ids.shape[1] for t in out.traces)
        assert (out.logits - ref).abs()[mask.bool()].max().item() <= 5e-4


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    import copy

    return copy.deepcopy(smollm2.model).to(torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
@pytest.mark.parametrize("router_cls", [StaticRouter, LearnedRouter, RandomRouter])
def test_gather_equals_mask_emulation(smollm2, smollm2_f64, kv_policy, router_cls):
    """Training's mask emulation computes the same function as real gather/scatter at 0.3.

    They differ only by summation order inside attention (k keys vs S masked keys): about 4e-6
    relative to the logits in fp32. In float64 that order gives 1e-14 differences, but HF's RMSNorm
    computes in float32 even for a float64 model, so such a difference can flip one float32 rounding
    (6e-8 relative) that later blocks carry to ~1e-6 (seen with the per-row keep counts, where
    padding rows fill the slots of short rows): the float64 check allows 1e-5.
    """
    ids, mask, _ = padded_batch(smollm2.model.config.vocab_size, seq=48)
    # fp32: 2e-4 held on earlier CPUs; an AVX-512/AMX Xeon's shape-dependent GEMM kernels give up to
    # 3.1e-4 (9e-6 of the logits' 35): 5e-4 bounds that order noise, while a wrong row or key
    # moves logits by O(1); float64 stays the strict check
    for model, tol in ((smollm2_f64, 1e-5), (smollm2.model, 5e-4)):
        torch.manual_seed(0)
        rm = RoutedModel(model, Schedule.uniform(model.config.num_hidden_layers, 0.3), router_cls(),
                         kv_policy=kv_policy)
        rm.router.to(model.dtype)
        with torch.no_grad():
            g = rm(ids, mask, trace=True)
            m = rm(ids, mask, mode="mask", trace=True)
        for tg, tm in zip(g.traces, m.traces):
            if tg.index is not None:
                assert torch.equal(tg.index, tm.index)
        diff = (g.logits - m.logits).abs()[mask.bool()].max().item()
        assert diff <= tol, (model.dtype, diff)


# ------------------------------------------------------------------------------- really skips tokens
def test_fewer_rows_reach_the_mlp(tiny_llama):
    model, _ = tiny_llama
    n = model.config.num_hidden_layers
    sched = Schedule((0.0, 0.5, 0.5, 0.0))
    rows = {}
    hooks = [layer.mlp.register_forward_hook(lambda mod, inp, out, i=i: rows.__setitem__(i, inp[0].shape[1]))
             for i, layer in enumerate(model.model.layers)]
    try:
        ids = torch.randint(0, 256, (2, 30))
        with torch.no_grad():
            RoutedModel(model, sched, StaticRouter())(ids)
    finally:
        for h in hooks:
            h.remove()
    assert n == 4 and rows == {0: 30, 1: 15, 2: 15, 3: 30}


def test_skipped_tokens_pass_through_unchanged(tiny_llama):
    model, _ = tiny_llama
    sched = Schedule((0.0, 0.5, 0.0, 0.0))
    ids = torch.randint(0, 256, (1, 20))
    routed_in, dense_in = {}, {}
    hooks = [model.model.layers[1].input_layernorm.register_forward_hook(recorder(routed_in, "rows1", lambda x: x.shape[1])),
             model.model.layers[2].input_layernorm.register_forward_hook(recorder(routed_in, "in2"))]
    try:
        with torch.no_grad():
            out = RoutedModel(model, sched, StaticRouter())(ids, trace=True)
    finally:
        for h in hooks:
            h.remove()
    hook = model.model.layers[1].input_layernorm.register_forward_hook(recorder(dense_in, "in1"))
    try:
        with torch.no_grad():
            RoutedModel(model, Schedule.dense(4), None)(ids)
    finally:
        hook.remove()
    kept = set(out.traces[1].index[0].tolist())
    skipped = [i for i in range(20) if i not in kept]
    assert routed_in["rows1"] == 10 and len(skipped) == 10
    # block 2 sees exactly block 1's input at the skipped positions: they bypassed block 1
    assert torch.equal(routed_in["in2"][0, skipped], dense_in["in1"][0, skipped])


def test_rope_uses_original_positions(tiny_llama):
    """A routed block's kept tokens must get RoPE at their original positions, not 0..k-1."""
    model, _ = tiny_llama
    layer = model.model.layers[1]
    sched = Schedule((0.0, 0.6, 0.0, 0.0))
    ids = torch.randint(0, 256, (1, 24))
    got = {}
    hooks = [layer.input_layernorm.register_forward_hook(recorder(got, "x")),
             model.model.layers[2].input_layernorm.register_forward_hook(recorder(got, "y"))]
    try:
        with torch.no_grad():
            out = RoutedModel(model, sched, StaticRouter())(ids, trace=True)
    finally:
        for h in hooks:
            h.remove()
    index = out.traces[1].index  # [1,k]
    kept_in = got["x"]  # [1,k,H] the rows that ran through block 1
    k = index.shape[1]
    assert kept_in.shape[1] == k < 24 and index[0, -1].item() == 23 and index[0, 0].item() == 0

    def hf_block(position_ids):
        cos_sin = model.model.rotary_emb(kept_in, position_ids)
        return layer(kept_in, attention_mask=None, position_embeddings=cos_sin, position_ids=position_ids)

    with torch.no_grad():
        original = hf_block(index)  # HF's own layer at the original positions
        naive = hf_block(torch.arange(k).unsqueeze(0))  # the classic bug: 0..k-1
    routed_out = got["y"][0, index[0]]  # block 2's input at kept rows = block 1's output
    err_original = (routed_out - original[0]).abs().max().item()
    err_naive = (routed_out - naive[0]).abs().max().item()
    assert err_original <= 1e-6, err_original
    assert err_naive > 1000 * max(err_original, 1e-9), (err_naive, err_original)


def test_decode_cache_lengths_follow_kept_counts(tiny_llama):
    model, _ = tiny_llama
    sched = Schedule((0.0, 0.5, 0.25, 0.0))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        rm = RoutedModel(model, sched, StaticRouter(), kv_policy="skip")
        logits, cache = rm.prefill(ids)
        assert [c.length for c in cache] == [16, 8, 12, 16]
        tok = logits.argmax(-1, keepdim=True)
        _, cache2 = rm.decode_step(tok, torch.full((2, 1), 16), cache)
        assert [c.length for c in cache2] == [17, 9, 13, 17]
        dense_cache = RoutedModel(model, sched, StaticRouter(), kv_policy="dense").prefill(ids)[1]
        assert [c.length for c in dense_cache] == [16, 16, 16, 16]


def test_learned_router_features():
    from tokenskip.routers import RouteContext, router_features

    valid = torch.tensor([[True] * 6 + [False] * 2])
    ctx = RouteContext(layer=1, sparsity=0.3, positions=torch.arange(8).unsqueeze(0), valid=valid,
                       attn=torch.tensor([[0.5, 0.1, 0.2, 0.2, 0.05, 0.3, 0.0, 0.0]]))
    f = router_features(ctx)  # [1,8,4]
    assert f.shape == (1, 8, 4)
    assert f[0, :6, 0].tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[0, 0, 2].item() == 0.0  # the most-attended token has rank 0
    assert f[0, 2, 2].item() < f[0, 3, 2].item()  # ties broken by position
    assert f[0, :, 3].tolist() == pytest.approx([0.3] * 8)
