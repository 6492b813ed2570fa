"""Lever experiments for issue 11: train router variants on one schedule, score each on the same
held-out windows with the deployment function, paired against the static router.

usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/levers.py OUT_DIR SCHEDULE(uniform:0.3|path) VARIANT [VARIANT ...]
variant syntax: name:key=value,key=value  (TrainSettings fields, plus window=W for the score window)
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from tokenskip.evaluate import compare, evaluate_methods
from tokenskip.models import load_model
from tokenskip.routed import RoutedModel
from tokenskip.routers import StaticRouter
from tokenskip.schedule import Schedule
from tokenskip.train.common import windows
from tokenskip.train.trainer import TrainSettings, train_router

torch.set_num_threads(1)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
lm = load_model("smollm2-135m")
n = lm.model.config.num_hidden_layers
spec = sys.argv[2]
sched = Schedule.uniform(n, float(spec.split(":")[1])) if spec.startswith("uniform:") else Schedule.load(spec, n)
EVAL_N = int(__import__("os").environ.get("EVAL_N", 32))
eval_ids = windows(lm.tokenizer, "eval", None, 512, EVAL_N, seed=0)

results = {}
log = open(out / "log.jsonl", "a")
for var in sys.argv[3:]:
    name, _, kv = var.partition(":")
    opts = dict(x.split("=") for x in kv.split(",") if x)
    window = int(opts.get("score_window", 64))
    kv_policy = opts.get("kv_policy", "skip")
    base = TrainSettings()
    cast = {k: (v in ("1", "true", "True")) if isinstance(getattr(base, k), bool) else type(getattr(base, k))(v)
            for k, v in opts.items()}
    st = replace(base, **cast)
    t0 = time.time()
    train_ids = windows(lm.tokenizer, "train", None, st.seq_len, st.windows, seed=st.seed)
    calib = windows(lm.tokenizer, "calib", None, st.seq_len, st.calib_windows, seed=st.seed)
    rdir = out / name
    router = train_router(lm.model, sched, train_ids, calib, st, rdir, model_name="smollm2-135m", progress=False)
    t1 = time.time()
    learned = RoutedModel(lm.model, sched, router, kv_policy=kv_policy, score_window=window)
    static = RoutedModel(lm.model, sched, StaticRouter(), kv_policy=kv_policy)
    res = evaluate_methods([(name, learned), ("static", static)], eval_ids, 64, batch_size=4, progress=False)
    c = compare(res[1], res[2])
    rec = {"name": name, "opts": opts, "window": window, "train_s": round(t1 - t0), "eval_s": round(time.time() - t1),
           "kl": res[1].kl, "kl_ci": res[1].kl_ci, "static_kl": res[2].kl, "diff": c["kl_diff"],
           "diff_ci": c["kl_diff_ci"], "ppl_ratio": res[1].ppl_ratio, "static_ppl_ratio": res[2].ppl_ratio}
    print(json.dumps(rec), flush=True)
    log.write(json.dumps(rec) + "\n")
    log.flush()
