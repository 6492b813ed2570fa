"""KL (N windows/domain) and long prompts (n/task/length) for the select router on its flat and a searched schedule.
usage: THREADS=2 .venv/bin/python scripts/experiments/select_schedule_eval.py SEL_DIR SCHED.json N_WIN N_EX LENGTHS"""
import json, os, sys, time
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
sel_dir, sched_file, nwin, nex = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lengths = [int(v) for v in sys.argv[5].split(",")]
lm = load_model("smollm2-135m")
sel, _ = build_routed(lm.model, routers_dir=sel_dir)
S = sel.schedule.overall()
static, _ = build_routed(lm.model, router="static", sparsity=round(S, 4))
searched = RoutedModel(lm.model, Schedule.from_json(json.load(open(sched_file))), sel.router, kv_policy=sel.kv_policy)
ms = [("static (uniform)", static), ("select flat", sel), ("select searched", searched)]
if nwin:
    for dom in ("eval", "news"):
        t0 = time.time()
        ids = load_windows(lm.tokenizer, dom, 512, nwin, 0)
        rows = {r.method: r for r in evaluate_methods(ms, ids, 64, 4, False, 0)}
        print(dom, {k: round(r.kl, 4) for k, r in rows.items()},
              "searched-static", ci_diff(compare(rows["select searched"], rows["static (uniform)"])),
              "searched-flat", ci_diff(compare(rows["select searched"], rows["select flat"])),
              "flat-static", ci_diff(compare(rows["select flat"], rows["static (uniform)"])), f"{time.time()-t0:.0f}s", flush=True)
if nex:
    exs = make_examples(lm.tokenizer, ["needle", "article_qa"], lengths, nex, 0)
    dense, _ = build_routed(lm.model, router="dense")
    score_and_report([("dense", dense), ms[1], ms[2]], exs)
