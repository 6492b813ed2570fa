"""Score-window sweep: the recency + alpha * attention-rank router (heuristics.py's Mix) with the
attention-score feature computed over the last w prompt rows, for several w, on held-out windows,
paired against static.

usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/wsweep.py OUT.jsonl SPARSITY KV_POLICY WINDOWS alpha w [w ...]
"""
import json
import sys

import torch

from heuristics import Mix  # same folder: the recency + alpha * attention-rank router
from tokenskip.evaluate import compare, evaluate_methods
from tokenskip.models import load_model
from tokenskip.routed import RoutedModel
from tokenskip.routers import StaticRouter
from tokenskip.schedule import Schedule
from tokenskip.train.common import windows

torch.set_num_threads(1)

out, sp, kv, nwin = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
alpha = float(sys.argv[5]); ws = [int(w) for w in sys.argv[6:]]
lm = load_model("smollm2-135m")
sched = Schedule.uniform(lm.model.config.num_hidden_layers, sp)
ids = windows(lm.tokenizer, "eval", None, 512, nwin, seed=0)
methods = [("static", RoutedModel(lm.model, sched, StaticRouter(), kv_policy=kv))]
methods += [(f"mix{alpha}-w{w}", RoutedModel(lm.model, sched, Mix(alpha), kv_policy=kv, score_window=w)) for w in ws]
res = evaluate_methods(methods, ids, 64, batch_size=4, progress=False)
with open(out, "a") as f:
    for r in res[1:]:
        c = compare(r, res[1])
        rec = {"sparsity": sp, "kv": kv, "method": r.method, "kl": r.kl, "kl_ci": r.kl_ci, "ppl_ratio": r.ppl_ratio,
               "flops": r.flops, "diff_vs_static": c["kl_diff"], "diff_ci": c["kl_diff_ci"]}
        print(json.dumps(rec), flush=True)
        f.write(json.dumps(rec) + "\n")
