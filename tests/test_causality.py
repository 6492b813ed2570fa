"""Evaluation computes what deployment computes (issue 11).

- Routed prefill of the prompt + teacher-forced decode of the continuation through the KV cache is
  the deployment function. Training's fast one-pass form (the continuation force-kept as a tail)
  must equal it, for every router kind (the learned router included) and both kv policies.
- Nothing that routes the prompt may read the continuation.
- The windowed attention-score feature equals a brute-force softmax over the full matrix.
- Decoding n tokens in one call equals n single decode steps.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tokenskip.block import attention_allowed, window_attention_scores
from tokenskip.evaluate import continuation_logprobs
from tokenskip.routed import RoutedModel
from tokenskip.routers import HybridRouter, LearnedRouter, RandomRouter, StaticRouter
from tokenskip.schedule import Schedule

ROUTERS = {"static": StaticRouter, "random": lambda: RandomRouter(3), "learned": LearnedRouter, "hybrid": HybridRouter,
           "hybrid-frozen": lambda: HybridRouter(window=8, refresh=False)}


@pytest.fixture(scope="module")
def model64(tiny_llama):
    model, _ = tiny_llama
    return copy.deepcopy(model).to(torch.float64)


def _learned(dtype) -> LearnedRouter:
    """A learned router with random weights and non-trivial feature statistics, so every feature
    (position, attention, rank, sparsity) moves the scores."""
    torch.manual_seed(7)
    r = LearnedRouter()
    with torch.no_grad():
        for p in r.parameters():
            p.normal_(0, 1.0)
        r.feature_mean.copy_(torch.tensor([0.5, 0.05, 0.5, 0.3]))
        r.feature_std.copy_(torch.tensor([0.3, 0.05, 0.3, 0.1]))
    return r.to(dtype)


def _router(kind: str, dtype):
    return _learned(dtype) if kind == "learned" else ROUTERS[kind]()


def _routed(model, kind: str, kv_policy: str, window: int = 8) -> RoutedModel:
    n = model.config.num_hidden_layers
    sched = Schedule((0.0, 0.45, 0.3, 0.0)[:n] if n == 4 else Schedule.uniform(n, 0.3).sparsity)
    return RoutedModel(model, sched, _router(kind, next(model.parameters()).dtype), kv_policy=kv_policy,
                       score_window=window)


def _one_pass(rm: RoutedModel, ids: torch.Tensor, n_cont: int, mode: str) -> torch.Tensor:
    out = rm(ids, n_tail=n_cont, num_logits=n_cont + 1, mode=mode)
    return torch.log_softmax(out.logits[:, :-1].float(), -1)  # [B,c,V]


@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
@pytest.mark.parametrize("kind", ["static", "random", "learned", "hybrid", "hybrid-frozen"])
@pytest.mark.parametrize("mode", ["gather", "mask"])
def test_one_pass_equals_prefill_then_decode(model64, kind, kv_policy, mode):
    """Training's fast form (mask mode) and the gather one-pass equal routed prefill + cached
    decode, in float64 to 1e-7 (the same function, only summation order differs)."""
    torch.manual_seed(0)
    ids = torch.randint(0, model64.config.vocab_size, (2, 40))
    rm = _routed(model64, kind, kv_policy)
    with torch.no_grad():
        deploy = continuation_logprobs(rm, ids, 9)
        fast = _one_pass(rm, ids, 9, mode)
    assert (deploy - fast).abs().max().item() <= 1e-7


@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
@pytest.mark.parametrize("kind", ["static", "random", "learned", "hybrid", "hybrid-frozen"])
def test_prompt_routing_never_reads_the_continuation(tiny_llama, kind, kv_policy):
    """Change only the continuation: the prompt's keep sets and its last prediction do not move."""
    model, _ = tiny_llama
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    other = ids.clone()
    other[:, -9:] = torch.randint(0, model.config.vocab_size, (2, 9))
    rm = _routed(model, kind, kv_policy)
    with torch.no_grad():
        a = rm(ids, n_tail=9, mode="mask", trace=True, num_logits=10)
        b = rm(other, n_tail=9, mode="mask", trace=True, num_logits=10)
    for ta, tb in zip(a.traces, b.traces):
        if ta.keep_mask is not None:
            assert torch.equal(ta.keep_mask[:, :-9], tb.keep_mask[:, :-9])
    torch.testing.assert_close(a.logits[:, 0], b.logits[:, 0], rtol=0, atol=1e-5)


def test_multi_token_decode_equals_single_steps(tiny_llama):
    model, _ = tiny_llama
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    rm = _routed(model, "learned", "skip")
    rm.router.float()
    with torch.no_grad():
        _, cache = rm.prefill(ids[:, :22])
        pos = torch.arange(22, 30).expand(2, -1)
        chunk, _ = rm.decode_step(ids[:, 22:], pos, cache, all_logits=True)  # [B,8,V]
        steps, c = [], cache
        for i in range(8):
            logits, c = rm.decode_step(ids[:, 22 + i:23 + i], pos[:, i:i + 1], c)
            steps.append(logits)
    torch.testing.assert_close(chunk, torch.stack(steps, 1), rtol=0, atol=1e-5)


def test_window_scores_equal_brute_force_softmax():
    """The window feature: mean over heads and over the last w usable rows that can see each key,
    of the softmax probability; checked against the full q x T matrix built by hand."""
    torch.manual_seed(3)
    b, nh, q, t, d, w = 2, 3, 7, 7, 5, 4
    qs, ks = torch.randn(b, nh, q, d, dtype=torch.float64), torch.randn(b, nh, t, d, dtype=torch.float64)
    pos = torch.arange(q).expand(b, -1)
    valid = torch.ones(b, q, dtype=torch.bool)
    valid[1, :2] = False  # left padding in row 1
    row_ok = valid.clone()
    row_ok[0, 6] = False  # a row that is not a window query (e.g. a scored continuation token)
    allowed = attention_allowed(pos, pos, valid)  # [B,q,T]
    score, seen = window_attention_scores(qs, ks, allowed, row_ok, w, 0.5)
    for bi in range(b):
        rows = [r for r in range(q) if row_ok[bi, r]][-w:]
        full = (qs[bi] @ ks[bi].transpose(-1, -2)) * 0.5  # [nh,q,T]
        full = full.masked_fill(~allowed[bi].unsqueeze(0), float("-inf")).softmax(-1)
        for key in range(t):
            seers = [r for r in rows if allowed[bi, r, key]]
            assert bool(seen[bi, key]) == bool(seers)
            if seers:
                want = full[:, seers, key].mean(0).mean().item()
                assert score[bi, key].item() == pytest.approx(want, abs=1e-6)


def test_window_scores_with_gqa_keys_equal_expanded_keys():
    """GQA: keys [B,nkv,T,d] shared by groups of query heads give the scores of the keys expanded to
    every head (HF's repeat_kv order: query head h reads KV head h // groups), without the copy."""
    from tokenskip.attention import expand_kv

    torch.manual_seed(4)
    b, nkv, groups, q, d, w = 2, 2, 3, 9, 4, 5
    qs = torch.randn(b, nkv * groups, q, d, dtype=torch.float64)
    ks = torch.randn(b, nkv, q, d, dtype=torch.float64)
    pos = torch.arange(q).expand(b, -1)
    valid = torch.ones(b, q, dtype=torch.bool)
    valid[0, :3] = False
    allowed = attention_allowed(pos, pos, valid)
    got, got_seen = window_attention_scores(qs, ks, allowed, valid, w, 0.5)
    want, want_seen = window_attention_scores(qs, expand_kv(ks, groups), allowed, valid, w, 0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the feature is computed in fp32
    assert torch.equal(got_seen, want_seen)
    # and not the wrong pairing (query head h with KV head h % nkv): the check can fail
    wrong = ks.repeat(1, groups, 1, 1)  # [B,nh,T,d] KV heads tiled, not repeated per group
    other, _ = window_attention_scores(qs, wrong, allowed, valid, w, 0.5)
    assert not torch.allclose(other, want)


def test_key_straight_through_keeps_the_forward_and_reaches_skipped_keys(tiny_llama):
    """run_block(k_soft=...): the output is exactly the hard-masked one, and a skipped key's soft
    weight gets a gradient (with the hard mask alone it gets none)."""
    from tokenskip.block import BlockArgs, run_block
    from tokenskip.families import LLAMA
    from tokenskip.routed import default_positions

    model, _ = tiny_llama
    layer = model.model.layers[1]
    torch.manual_seed(4)
    x = torch.randn(1, 12, model.config.hidden_size)
    valid = torch.ones(1, 12, dtype=torch.bool)
    pos = default_positions(valid)
    cs = model.model.rotary_emb(x, pos)
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[0, 3:6] = False
    soft = torch.full((1, 12), 0.7, requires_grad=True)
    hard = run_block(LLAMA, layer, x, cs, pos, valid, BlockArgs(k_active=keep)).out
    st = run_block(LLAMA, layer, x, cs, pos, valid, BlockArgs(k_active=keep, k_soft=soft)).out
    torch.testing.assert_close(st, hard, rtol=0, atol=0)
    st[0, -1].sum().backward()
    assert soft.grad[0, 3:6].abs().sum() > 0


def test_soft_topk_surrogate_keeps_the_budget():
    """The centred surrogate's gradients sum to zero over the routed tokens (a soft top-k: raising
    one score lowers the others' gates), and vanish on forced tokens and padding."""
    from tokenskip.routed import routing_scores, ste_surrogate

    torch.manual_seed(0)
    raw = torch.randn(2, 12, requires_grad=True)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False
    forced = torch.zeros(2, 12, dtype=torch.bool)
    forced[:, -1] = True
    forced[0, 0] = forced[1, 3] = True
    sel = routing_scores(raw.detach(), valid, forced)
    counts = torch.tensor([7, 5])
    soft = ste_surrogate(raw, sel, valid, counts, 1.0)
    free = valid & ~forced
    for b in range(2):
        g = torch.autograd.grad(soft[b][free[b]].sum(), raw, retain_graph=True)[0]
        assert g[b].abs().sum() < 1e-6  # the row's total soft gate does not move
    g = torch.autograd.grad(soft[0, 5], raw, retain_graph=True)[0]
    assert g[0, 5] > 0 and (g[0, free[0]] < 0).sum() >= 1  # up for itself, down for the others
