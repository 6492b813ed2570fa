"""What would a better router keep? First-order value of each token in each routed block under static
routing: v_i = -dKL/dgate_i (gate = the hard keep mask with an identity straight-through path),
on calibration windows. Then: how much of v does position explain, and does the attention feature
add anything? (OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/importance.py N_WINDOWS SPARSITY)
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

import tokenskip.routed as R
from tokenskip.evaluate import continuation_logprobs
from tokenskip.models import load_model
from tokenskip.routed import RoutedModel
from tokenskip.routers import Router, router_features
from tokenskip.schedule import Schedule
from tokenskip.train.common import windows

torch.set_num_threads(1)
N, SP = int(sys.argv[1]), float(sys.argv[2])
lm = load_model("smollm2-135m")
n = lm.model.config.num_hidden_layers
sched = Schedule.uniform(n, SP)
ids = windows(lm.tokenizer, "calib", None, 512, N, seed=0)
C = 64
R.ste_surrogate = lambda raw, sel, routable, counts, t: raw.float()  # identity STE: d gate / d raw = 1


class Probe(Router):
    """Static order (positions) + a zero per-block offset whose gradient is dL/dgate; records features."""
    needs_attention = True

    def __init__(self):
        super().__init__()
        self.z, self.feats = {}, {}

    def scores(self, ctx):
        z = torch.zeros(ctx.positions.shape, requires_grad=True)
        self.z[ctx.layer] = z
        self.feats[ctx.layer] = router_features(ctx).detach()
        return ctx.positions.float() + z


rows = []
dense = RoutedModel(lm.model, sched, None)
for w in range(N):
    x = ids[w:w + 1]
    ref = continuation_logprobs(dense, x, C)
    probe = Probe()
    rm = RoutedModel(lm.model, sched, probe, kv_policy="skip")
    out = rm(x, n_tail=C, mode="mask", trace=True, ste=True, num_logits=C + 1)
    lp = F.log_softmax(out.logits[:, :-1].float(), -1)
    kl = (ref.exp() * (ref - lp)).sum(-1).mean()
    kl.backward()
    for li, tr in enumerate(out.traces):
        if tr.keep_mask is None:
            continue
        v = -probe.z[li].grad[0].numpy()  # [S]
        keep = tr.keep_mask[0].numpy()
        f = probe.feats[li][0].numpy()  # [S,4]
        routable = np.arange(x.shape[1]) < x.shape[1] - C
        routable[0] = False
        routable[x.shape[1] - C - 1] = False
        for i in np.nonzero(routable)[0]:
            rows.append((w, li, i, v[i], keep[i], *f[i, :3]))
    print(f"window {w}: KL {kl.item():.4f}", flush=True)

a = np.array(rows, dtype=np.float64)  # w, layer, pos, v, keep, pos_norm, attn, rank
v, keep, posn, attn, rank = a[:, 3], a[:, 4] > 0.5, a[:, 5], a[:, 6], a[:, 7]
print(f"tokens x blocks: {len(a)}; kept {keep.mean():.3f}")
print(f"mean v kept {v[keep].mean():.3e}  skipped {v[~keep].mean():.3e}")
# oracle headroom: per (window, block), swap the m best skipped for the m worst kept while it pays
gain = 0.0
for (w, li) in {(int(r[0]), int(r[1])) for r in a}:
    m = (a[:, 0] == w) & (a[:, 1] == li)
    vk, vs = np.sort(v[m & keep]), np.sort(v[m & ~keep])[::-1]
    d = vs[:min(len(vk), len(vs))] - vk[:min(len(vk), len(vs))]
    gain += d[d > 0].sum()
print(f"first-order KL reduction available to an oracle swap, per window: {gain / N:.4f}")
# how much of v do the features explain? (rank-correlation within each block)
from scipy.stats import spearmanr
for name, feat in (("position", posn), ("attention", attn), ("-rank", -rank)):
    print(f"spearman(v, {name}) = {spearmanr(v, feat).correlation:+.3f}")
# partial: residual of v after a position-only fit (deciles), vs attention
bins = np.quantile(posn, np.linspace(0, 1, 21))
idx = np.clip(np.searchsorted(bins, posn) - 1, 0, 19)
resid = v - np.array([v[idx == b].mean() for b in range(20)])[idx]
print(f"spearman(v - E[v|position], attention) = {spearmanr(resid, attn).correlation:+.3f}")
print(f"spearman(v - E[v|position], -rank) = {spearmanr(resid, -rank).correlation:+.3f}")
np.save("/work/exp/importance.npy", a)
