"""Screen: route blocks 2..SEL-2 by recency (the select router's tilt, no table yet), block SEL-1 dense fills
the table, blocks SEL..27 select. usage: .venv/bin/python scripts/experiments/select_pre_routing.py SEL_DIR N_WIN N_EX LENGTHS r1:r2,r1:r2"""
import os, sys, time
import torch
from tokenskip.config import build_routed
from tokenskip.evaluate import compare, evaluate_methods
from tokenskip.models import load_model
from tokenskip.routed import RoutedModel
from tokenskip.schedule import Schedule
from tokenskip.train.longctx_tasks import make_examples
from tokenskip.windows import load_windows

from longctx_screen import ci_diff, score_and_report

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
sel_dir, nwin, nex = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lengths = [int(v) for v in sys.argv[4].split(",")]
pairs = [tuple(float(x) for x in p.split(":")) for p in sys.argv[5].split(",")]
lm = load_model("smollm2-135m")
sel, _ = build_routed(lm.model, routers_dir=sel_dir)
S = sel.schedule.overall()
first = sel.schedule.first_routed  # 8
Schedule.window_runs = lambda self, layer, refresh: refresh or layer == first - 1
static, _ = build_routed(lm.model, router="static", sparsity=round(S, 4))
ms = [("static (uniform)", static), ("select flat", sel)]
n = 30
for r1, r2 in pairs:
    sp = [0.0] * n
    for l in range(2, first - 1):
        sp[l] = r1
    for l in range(first, n - 2):
        sp[l] = r2
    print(f"pre {r1}:{r2} mean {sum(sp)/n:.4f}")
    ms.append((f"pre {r1}:{r2}", RoutedModel(lm.model, Schedule(tuple(sp)), sel.router, kv_policy=sel.kv_policy)))
if nex:
    exs = make_examples(lm.tokenizer, ["needle", "article_qa"], lengths, nex, 0)
    score_and_report(ms[1:], exs)
if nwin:
    for dom in ("eval", "news"):
        t0 = time.time()
        ids = load_windows(lm.tokenizer, dom, 512, nwin, 0)
        rows = {r.method: r for r in evaluate_methods(ms, ids, 64, 4, False, 0)}
        print(dom, {k: round(r.kl, 4) for k, r in rows.items()}, flush=True)
        for k in rows:
            if k not in ("static (uniform)", "dense"):
                print("  ", k, "- static", ci_diff(compare(rows[k], rows["static (uniform)"])), flush=True)
        print(f"{time.time()-t0:.0f}s")
