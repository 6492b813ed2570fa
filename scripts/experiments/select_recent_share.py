"""Screen the select router's recent share: KL (N windows/domain) vs static and long prompts n/task/length.
usage: THREADS=2 .venv/bin/python scripts/experiments/select_recent_share.py SEL_DIR N_WIN N_EX LENGTHS R1,R2,..."""
import copy, os, sys, time
import torch
from tokenskip.config import build_routed
from tokenskip.evaluate import compare, evaluate_methods
from tokenskip.models import load_model
from tokenskip.routed import RoutedModel
from tokenskip.train.longctx_tasks import make_examples
from tokenskip.windows import load_windows

from longctx_screen import ci_diff, score_and_report

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
sel_dir, nwin, nex = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lengths = [int(v) for v in sys.argv[4].split(",")]
recents = [float(v) for v in sys.argv[5].split(",")]
lm = load_model("smollm2-135m")
sel, _ = build_routed(lm.model, routers_dir=sel_dir)
S = sel.schedule.overall()
static, _ = build_routed(lm.model, router="static", sparsity=round(S, 4))
ms = [("static (uniform)", static)]
for r in recents:
    router = copy.deepcopy(sel.router)
    router.recent = r
    ms.append((f"select r{r}", RoutedModel(lm.model, sel.schedule, router, kv_policy=sel.kv_policy)))
if nwin:
    for dom in ("eval", "news"):
        t0 = time.time()
        ids = load_windows(lm.tokenizer, dom, 512, nwin, 0)
        rows = {r.method: r for r in evaluate_methods(ms, ids, 64, 4, False, 0)}
        print(dom, {k: round(r.kl, 4) for k, r in rows.items()}, flush=True)
        for k in rows:
            if k != "static (uniform)":
                print("  ", k, "- static", ci_diff(compare(rows[k], rows["static (uniform)"])), flush=True)
        print(f"{time.time()-t0:.0f}s")
if nex:
    exs = make_examples(lm.tokenizer, ["needle", "article_qa"], lengths, nex, 0)
    score_and_report(ms[1:], exs)
