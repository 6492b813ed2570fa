"""Is there anything to learn? Score hand-made routers over the learned router's own features
(recency mixed with attention received) on held-out windows, paired against static.

usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/heuristics.py OUT.jsonl SPARSITY KV_POLICY WINDOWS alpha [alpha ...]
"""
import json
import sys

import torch

from tokenskip.evaluate import compare, evaluate_methods
from tokenskip.models import load_model
from tokenskip.routed import RoutedModel
from tokenskip.routers import Router, StaticRouter, router_features
from tokenskip.schedule import Schedule
from tokenskip.train.common import windows

torch.set_num_threads(1)


class Mix(Router):
    """score = normalised position + alpha * (1 - normalised attention rank) (+ beta * attention)."""
    needs_attention = True

    def __init__(self, alpha, beta=0.0):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def scores(self, ctx):
        f = router_features(ctx)  # [B,S,4]: pos, attn, rank, s
        return f[..., 0] + self.alpha * (1 - f[..., 2]) + self.beta * f[..., 1]


class Sinks(Router):
    """StreamingLLM-style: the first m positions, then recency."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def scores(self, ctx):
        pos = ctx.positions.float()
        return pos + (ctx.positions < self.m).float() * 1e6


def run(out: str, sp: float, kv: str, nwin: int, variants) -> None:
    """Score static and variants(model, schedule) -> [(name, RoutedModel)] on nwin held-out
    windows (uniform schedule at sp), each paired against static; one JSON line per variant."""
    lm = load_model("smollm2-135m")
    sched = Schedule.uniform(lm.model.config.num_hidden_layers, sp)
    ids = windows(lm.tokenizer, "eval", None, 512, nwin, seed=0)
    methods = [("static", RoutedModel(lm.model, sched, StaticRouter(), kv_policy=kv))]
    methods += variants(lm.model, sched)
    res = evaluate_methods(methods, ids, 64, batch_size=4, progress=False)  # res[0] is dense
    with open(out, "a") as f:
        for r in res[1:]:
            c = compare(r, res[1])
            rec = {"sparsity": sp, "kv": kv, "method": r.method, "kl": r.kl, "kl_ci": r.kl_ci, "ppl_ratio": r.ppl_ratio,
                   "flops": r.flops, "diff_vs_static": c["kl_diff"], "diff_ci": c["kl_diff_ci"]}
            print(json.dumps(rec), flush=True)
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    out, sp, kv, nwin = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    alphas = [float(a) for a in sys.argv[5:] if not a.startswith("sink")]
    sinks = [int(a[4:]) for a in sys.argv[5:] if a.startswith("sink")]
    run(out, sp, kv, nwin, lambda model, sched: (
        [(f"mix{a}", RoutedModel(model, sched, Mix(a), kv_policy=kv)) for a in alphas]
        + [(f"sink{m}", RoutedModel(model, sched, Sinks(m), kv_policy=kv)) for m in sinks]))
