"""Experiment: GA over the per-block schedule AFTER the selection block, with the shipped select
router fixed, fitness -KL on calib windows (disjoint from eval/news and from train-select's calib KL windows).
usage: THREADS=2 .venv/bin/python scripts/experiments/select_search_screen.py SEL_DIR OUT.json [WINDOWS POP GEN DENSE_LAST]"""
import json, os, sys, time
import torch
from tokenskip.config import build_routed
from tokenskip.models import load_model
from tokenskip.train.common import windows
from tokenskip.train.search import SearchSettings, search_schedule

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
sel_dir, out = sys.argv[1], sys.argv[2]
nwin, pop, gen, dlast = [int(v) for v in (sys.argv[3:] + ["12", "12", "5", "2"][len(sys.argv[3:]):])]
lm = load_model("smollm2-135m")
sel, _ = build_routed(lm.model, routers_dir=sel_dir)
S = sel.schedule.overall()
first = sel.schedule.first_routed
calib = windows(lm.tokenizer, "calib", None, 512, nwin, 5)
settings = SearchSettings(target=round(S, 4), population=pop, generations=gen, dense_first=first, dense_last=dlast, seed=0)
t0 = time.time()
res = search_schedule(lm.model, sel.router, calib, 64, settings, sel.kv_policy, seeds=[sel.schedule], router_name="select")
print("fitness", res.fitness, "uniform", res.uniform_fitness, f"{time.time()-t0:.0f}s")
print([round(s, 3) for s in res.schedule.sparsity])
json.dump(res.schedule.to_json(), open(out, "w"), indent=1)
