"""The oracle keep-set builder (tokenskip.train.oracle) on a tiny random Llama."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tokenskip.evaluate import continuation_logprobs
from tokenskip.routed import RoutedModel, block_keep_count, forced_tokens
from tokenskip.routers import StaticRouter
from tokenskip.schedule import Schedule
from tokenskip.train import oracle

pytestmark = pytest.mark.usefixtures("one_thread")
SEQ, CONT = 48, 8
SCHED = Schedule((0.0, 0.5, 0.4, 0.6))  # block 0 dense, three routed blocks of different k_l


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model = copy.deepcopy(tiny_llama[0]).double()  # float64: mask vs gather compare exactly
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(3))
    dense = RoutedModel(model, SCHED, None)
    ref = continuation_logprobs(dense, ids, CONT).double()  # [1,c,V]
    res = oracle.oracle_keep(model, SCHED, ids, ref, CONT, rounds=4)
    return model, ids, ref, res


def _deploy_kl(model, router, ids, ref):
    lp = continuation_logprobs(RoutedModel(model, SCHED, router), ids, CONT)
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


def test_keeps_exactly_k_with_forced(setup):
    model, ids, _, res = setup
    valid = torch.ones_like(ids, dtype=torch.bool)
    forced = forced_tokens(valid, CONT)[0]
    assert res.keep.shape == (4, 1, SEQ)
    assert bool(res.keep[0].all())  # the dense block keeps everything
    for li in (1, 2, 3):
        assert int(res.keep[li].sum()) == block_keep_count(SCHED, li, SEQ, CONT)
        assert bool(res.keep[li, 0][forced].all())  # sink, prompt's last token, continuation
    static = oracle.static_keep(SCHED, valid, CONT)
    assert not torch.equal(res.keep, static)  # the oracle moved away from recency


def test_kl_strictly_below_start_through_deployment(setup):
    model, ids, ref, res = setup
    assert res.kl < res.kl_start
    assert res.history[0] == res.kl_start and res.history[-1] == res.kl
    assert res.history == sorted(res.history, reverse=True) and res.swaps[0] > 0
    kl_oracle = _deploy_kl(model, oracle.OracleRouter.from_keep(res.keep, SCHED), ids, ref)
    kl_static = _deploy_kl(model, StaticRouter(), ids, ref)
    assert kl_static == pytest.approx(res.kl_start, rel=1e-6)  # the start is the static router
    assert kl_oracle == pytest.approx(res.kl, rel=1e-6)  # the search's KL is the deployment KL
    assert kl_oracle < kl_static


def test_gather_mode_reproduces_mask_mode(setup):
    model, ids, _, res = setup
    rm = RoutedModel(model, SCHED, oracle.OracleRouter.from_keep(res.keep, SCHED))
    gathered = rm(ids, n_tail=CONT, mode="gather", trace=True)
    masked = rm(ids, n_tail=CONT, mode="mask", trace=True)
    assert (gathered.logits - masked.logits).abs().max().item() <= 1e-9
    for li in (1, 2, 3):
        kept = torch.zeros(SEQ, dtype=torch.bool)
        kept[gathered.traces[li].index[0]] = True
        assert torch.equal(kept, res.keep[li, 0])
        assert torch.equal(masked.traces[li].keep_mask[0], res.keep[li, 0])


def test_ranked_swaps_pair_values_and_keep_counts():
    valid = torch.ones(1, SEQ, dtype=torch.bool)
    keep = oracle.static_keep(SCHED, valid, CONT)
    grad = -torch.linspace(1.0, 0.0, SEQ).expand(4, 1, SEQ).clone()  # value falls with position
    grad[2] *= 2  # block 2's swaps pay twice as much: they rank first
    swaps = oracle.ranked_swaps(SCHED, keep, grad, valid, CONT)
    assert [li for _, li, _, _ in swaps[:3]] == [2, 2, 2]
    assert {li for _, li, _, _ in swaps} == {1, 2, 3}  # the dense block never swaps
    assert all(g > 0 for g, *_ in swaps) and [g for g, *_ in swaps] == sorted((g for g, *_ in swaps), reverse=True)
    forced = forced_tokens(valid, CONT)[0]
    assert not any(forced[o] or forced[i] for _, _, o, i in swaps)
    _, li, out, inn = swaps[0]
    assert inn == 1 and out == int(torch.nonzero(keep[2, 0] & ~forced)[-1])  # earliest skipped in, latest kept out
    new = oracle.apply_swaps(keep, swaps[:5])
    assert torch.equal(new.sum(-1), keep.sum(-1))
    assert int((new != keep).sum()) == 10


def test_diagnostics_and_packing():
    m = np.zeros((2, 9), dtype=bool)
    m[0, [0, 1, 2, 8]] = True  # first third kept, plus the last token
    m[1, [0, 6, 7, 8]] = True  # last third kept, plus the sink
    d = oracle.diagnostics([m], [m[[1, 1]]], [1, 2])
    assert d["keep_rate_thirds"][0] == pytest.approx([1.0, 0.0, 1 / 3])
    assert d["keep_rate_thirds"][1] == pytest.approx([1 / 3, 0.0, 1.0])
    assert d["jaccard_static"] == pytest.approx([2 / 6, 1.0])
    assert d["jaccard_prev_block"] == [None, pytest.approx(2 / 6)]
    row = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1, 1], dtype=bool)
    assert np.array_equal(oracle.unpack(oracle.pack(row), 10), row)
