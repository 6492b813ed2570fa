"""The hybrid router (recency share + question-attention retrieval, issue 20).

Checked: its ranking (recent share first, then pooled attention, the sink excluded from the
pooling), the max-over-heads score window against a brute-force softmax, that with
score_refresh=False only the dense blocks before the first routed block compute the window,
that it routes by content yet one pass = prefill + decode, and that it exports to ONNX with the
same logits as PyTorch.
"""

from __future__ import annotations

import pytest
import torch

from tokenskip.block import attention_allowed, window_attention_scores
from tokenskip.routed import RoutedModel
from tokenskip.routers import HybridRouter, RouteContext, StaticRouter, make_router
from tokenskip.schedule import Schedule

from conftest import export_tiny


def _ctx(attn: list[float], sparsity: float) -> RouteContext:
    n = len(attn)
    return RouteContext(layer=1, sparsity=sparsity, positions=torch.arange(n).unsqueeze(0),
                        valid=torch.ones(1, n, dtype=torch.bool), attn=torch.tensor([attn]))


def test_ranks_recent_share_then_pooled_attention():
    # 10 tokens, sparsity 0.6: budget share 0.4, recent 0.5 of it -> positions >= 0.8 * 9 (8, 9)
    attn = [0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0]
    r = HybridRouter(window=4, heads="max", reach=(1, 1), recent=0.5)
    order = r.scores(_ctx(attn, 0.6)).argsort(descending=True, stable=True)[0].tolist()
    assert order[:2] == [9, 8]  # the recent share, newest first
    assert order[2:5] == [7, 6, 5]  # token 6 and its pooled neighbours, newest first on ties
    # the sink's 0.9 is not spread to token 1 (it is forced by the routed model anyway)
    assert order[-5:] == [4, 3, 2, 1, 0]


def test_no_pool_no_recency_is_attention_order():
    attn = [0.0, 0.1, 0.5, 0.2, 0.0, 0.3]
    r = HybridRouter(window=4, heads="max", reach=(0, 0), recent=0.0)
    order = r.scores(_ctx(attn, 0.5)).argsort(descending=True)[0].tolist()
    assert order == [2, 5, 3, 1, 4, 0]


def test_bad_settings_are_refused():
    for kw in (dict(heads="sum"), dict(reach=(-1, 2)), dict(recent=1.5)):
        with pytest.raises(ValueError):
            HybridRouter(**kw)


@pytest.mark.parametrize("heads", ["mean", "max"])
def test_window_scores_match_brute_force(heads):
    torch.manual_seed(0)
    b, nh, nkv, s, d, w = 2, 4, 2, 12, 8, 3
    q, k = torch.randn(b, nh, s, d, dtype=torch.float64), torch.randn(b, nkv, s, d, dtype=torch.float64)
    pos = torch.arange(s).expand(b, -1)
    allowed = attention_allowed(pos, pos, torch.ones(b, s, dtype=torch.bool))
    score, seen = window_attention_scores(q, k, allowed, torch.ones(b, s, dtype=torch.bool), w, 0.5, heads)
    kk = k.repeat_interleave(nh // nkv, dim=1)  # [B,nh,S,d]
    logits = (q @ kk.transpose(2, 3) * 0.5).masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, -1)[:, :, -w:]  # [B,nh,w,S] the last w rows
    per_head = probs.sum(2) / allowed[:, -w:].sum(1).clamp(min=1).unsqueeze(1)  # [B,nh,S]
    want = per_head.amax(1) if heads == "max" else per_head.mean(1)
    torch.testing.assert_close(score, want.to(score.dtype))
    assert seen.all()


def test_one_selection_layer_only_dense_blocks_before_routing(tiny_llama):
    model, _ = tiny_llama
    sched = Schedule((0.0, 0.5, 0.5, 0.0))
    frozen = RoutedModel(model, sched, HybridRouter(window=8, refresh=False))
    fresh = RoutedModel(model, sched, HybridRouter(window=8, refresh=True))
    assert [frozen._score_window(li) for li in range(4)] == [8, 0, 0, 0]
    assert [fresh._score_window(li) for li in range(4)] == [8, 8, 8, 8]
    assert frozen.score_window == 8  # the router's own window wins over the routed model's default
    assert RoutedModel(model, sched, StaticRouter())._score_window(0) == 0


def test_routes_by_content_and_is_causal(tiny_llama):
    model, _ = tiny_llama
    sched = Schedule((0.0, 0.5, 0.5, 0.0))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    hyb = RoutedModel(model, sched, HybridRouter(window=8, recent=0.25, refresh=False))
    sta = RoutedModel(model, sched, StaticRouter())
    with torch.no_grad():
        a, s = hyb(ids, trace=True), sta(ids, trace=True)
        kept_a, kept_s = a.traces[1].index[0].tolist(), s.traces[1].index[0].tolist()
        assert kept_a != kept_s and 0 in kept_a and 39 in kept_a
        assert a.traces[1].index.tolist() == a.traces[2].index.tolist()  # one selection, same sparsity
        one = hyb(ids, n_tail=6).logits[:, 33:39]  # predictions of tokens 34..39
        first, cache = hyb.prefill(ids[:, :34])
        rest, _ = hyb.decode_step(ids[:, 34:39], torch.arange(34, 39).unsqueeze(0), cache, all_logits=True)
    assert torch.allclose(one[:, 0], first, atol=1e-4) and torch.allclose(one[:, 1:], rest, atol=1e-4)


def test_make_router_builds_it():
    r = make_router("hybrid")
    assert isinstance(r, HybridRouter) and r.needs_attention and r.score_window is not None


def test_gemfilter_selects_once_after_the_dense_half():
    """gemfilter = the hybrid rule with one selection layer; --sparsity gives its select_after
    schedule: dense through the middle, the same mean sparsity (so uniform's FLOPs), clear errors."""
    from tokenskip.errors import UserError
    from tokenskip.routers import GemFilterRouter

    r = make_router("gemfilter")
    assert isinstance(r, GemFilterRouter) and r.score_refresh is False and r.needs_attention
    s = r.schedule_for(30, 0.3)
    assert s.sparsity[:15] == (0.0,) * 15 and s.sparsity[-2:] == (0.0, 0.0)
    assert set(s.sparsity[15:28]) == {round(0.3 * 30 / 13, 4)}
    assert s.overall() == pytest.approx(0.3, abs=1e-4) and s.meta["select"] == 15
    assert GemFilterRouter(select_layer=10).schedule_for(30, 0.3).sparsity[:11] == (0.0,) * 10 + (0.5,)
    tiny = r.schedule_for(4, 0.25)  # a small model: the blocks after the selection layer all routed
    assert tiny.sparsity == (0.0, 0.0, 0.5, 0.5)
    with pytest.raises(UserError, match="at most 0.95"):
        r.schedule_for(30, 0.5)


def test_build_routed_uses_the_routers_schedule(tiny_llama):
    from tokenskip.config import build_routed

    model, _ = tiny_llama
    g, _ = build_routed(model, router="gemfilter", sparsity=0.25)
    u, _ = build_routed(model, router="hybrid", sparsity=0.25)
    assert g.schedule.sparsity == (0.0, 0.0, 0.5, 0.5) and g.schedule.meta["kind"] == "select_after"
    assert u.schedule.meta["kind"] == "uniform"


@pytest.mark.parametrize("router", ["attention", "hybrid", "gemfilter"])
def test_exports_with_pytorch_parity(tiny_llama, tmp_path, router):
    """The training-free attention routers export to ONNX and run there as in PyTorch."""
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from tokenskip.config import build_routed
    from tokenskip.deploy.runtime.validate import empty_past
    from tokenskip.export.wrappers import StepGraph
    from tokenskip.routed import default_positions

    model, path = tiny_llama
    routed, cfg = build_routed(model, router=router, sparsity=0.25)
    routed.score_window = cfg.score_window = 8
    export_tiny(model, str(path), routed, cfg, tmp_path / "exp")
    sess = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = StepGraph(routed).eval()
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    past = empty_past(graph, 1)
    inputs = (ids, mask, default_positions(mask.bool()), *past)
    got = sess.run(None, dict(zip(graph.input_names(), [t.numpy() for t in inputs])))
    with torch.no_grad():
        ref = graph(*inputs)
    assert np.abs(got[0] - ref[0].numpy()).max() <= 1e-4


def test_flops_count_the_window_where_it_runs(tiny_llama):
    from tokenskip.flops import flops_ratio

    model, _ = tiny_llama
    sched = Schedule((0.0, 0.5, 0.5, 0.0))
    plain = flops_ratio(model.config, sched, 64)
    fresh = flops_ratio(model.config, sched, 64, score_window=16)
    once = flops_ratio(model.config, sched, 64, score_window=16, score_refresh=False)
    assert plain < once < fresh
    # one selection layer = the window in block 0 only: dense + window(block 0) over dense
    from tokenskip.flops import block_flops, forward_flops
    extra = block_flops(model.config, 64, 64, 64, 16) - block_flops(model.config, 64, 64, 64)
    assert forward_flops(model.config, sched, 64, score_window=16, score_refresh=False) == pytest.approx(
        forward_flops(model.config, sched, 64) + extra)
