"""Issue 20 (docs/training.md 8.5), usage: .venv/bin/python scripts/experiments/longctx_split.py N SPARSITY S_A[,S_A...]
0.4 budget split: blocks 2..13 routed by recency at s_a, block 14 dense (the selection layer: its
question attention fills the table once), blocks 15..27 routed by that table (gemfilter rule) at
s_b, mean 0.4. Does a stale (un-run) evidence token still get found at block 14?"""
import sys, time, torch
from tokenskip.models import load_model
from tokenskip.config import build_routed
from tokenskip.routed import RoutedModel
from tokenskip.schedule import Schedule
from tokenskip.train.longctx import score_examples, depth_bin
from tokenskip.train.longctx_tasks import make_examples
torch.set_num_threads(2)
SEL = 15
orig = RoutedModel._score_window
def window(self, li):
    if getattr(self.router, "select_at", None) is not None:
        return self.score_window if li == self.router.select_at - 1 else 0
    return orig(self, li)
RoutedModel._score_window = window
lm = load_model("smollm2-135m")
n = int(sys.argv[1]); overall = float(sys.argv[2])
exs = make_examples(lm.tokenizer, ["needle", "article_qa"], [512], n, 0)
for s_a in [float(x) for x in sys.argv[3].split(",")]:
    # blocks 2..SEL-2 at s_a (SEL-3 blocks... 2..13 = 12 blocks), block SEL-1 dense, SEL..27 at s_b
    early = list(range(2, SEL - 1)); late = list(range(SEL, 28))
    s_b = (overall * 30 - s_a * len(early)) / len(late)
    sp = [0.0] * 30
    for l in early: sp[l] = s_a
    for l in late: sp[l] = s_b
    routed, _ = build_routed(lm.model, router="gemfilter", sparsity=0.3)
    routed.schedule = Schedule(tuple(sp))
    routed.router.select_at = SEL
    t0 = time.time()
    with torch.no_grad():
        correct, _ = score_examples(routed, exs)
    out = []
    for t in ("needle", "article_qa"):
        idx = [i for i, e in enumerate(exs) if e.task == t]
        bins = [[correct[i] for i in idx if depth_bin(exs[i].depth) == b] for b in range(5)]
        out.append(f"{t} {sum(correct[i] for i in idx)}/{len(idx)} [" + " ".join(f"{sum(b)}/{len(b)}" for b in bins) + "]")
    print(f"overall {overall} s_a {s_a:.2f} s_b {s_b:.2f} (overall {Schedule(tuple(sp)).overall():.3f}):", "  ".join(out), f"{time.time()-t0:.0f}s", flush=True)
