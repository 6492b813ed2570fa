"""Continuation KL on N held-out windows per domain (default 256, issue 20 item 6): static (uniform),
a select router folder, and that router's own start (gemfilter's pool at the same selection block,
`SelectRouter(select_layer=...)` untrained) on the same schedule; when the folder's schedule was
searched (train-select's search_after), also the same trained router on the flat select_after
schedule. The deployment function, paired bootstrap CIs of select - static, select - start and
select - flat. With N = 16 the windows are those of
`tokenskip report --windows 16` (the same sampling).
usage: [THREADS=2] [NO_START=1] .venv/bin/python scripts/experiments/kl_windows.py S SELECT_DIR OUT.json [N]
(NO_START=1 leaves the start out: a quarter less time)"""
import json, os, sys, time
from pathlib import Path
import torch
from tokenskip.config import build_routed
from tokenskip.evaluate import compare, evaluate_methods
from tokenskip.models import load_model
from tokenskip.routed import RoutedModel
from tokenskip.routers import SelectRouter
from tokenskip.windows import load_windows

from longctx_screen import ci_diff as diff

torch.set_num_threads(int(os.environ.get("THREADS", "1")))  # 1: runs beside other work
S, sel_dir, out = float(sys.argv[1]), sys.argv[2], sys.argv[3]
N = int(sys.argv[4]) if len(sys.argv) > 4 else 256
lm = load_model("smollm2-135m")
static, _ = build_routed(lm.model, router="static", sparsity=S)
sel, _ = build_routed(lm.model, routers_dir=sel_dir)
record = json.loads((Path(sel_dir) / "select.json").read_text())
start_router = SelectRouter(select_layer=record["select_layer"])
start = RoutedModel(lm.model, sel.schedule, start_router, kv_policy=sel.kv_policy)
flat_schedule = start_router.schedule_for(lm.model.config.num_hidden_layers, S)
methods = [("static (uniform)", static), ("select", sel)] + ([] if os.environ.get("NO_START") else [("select start", start)])
if list(flat_schedule.sparsity) != list(sel.schedule.sparsity):  # searched after the selection block
    methods.append(("select flat", RoutedModel(lm.model, flat_schedule, sel.router, kv_policy=sel.kv_policy)))


res = {"sparsity": S, "select_dir": sel_dir, "select_layer": record["select_layer"], "loss": record.get("loss"),
       "windows": N, "seq_len": 512, "cont_len": 64, "domains": {}}
for dom in ("eval", "news"):
    t0 = time.time()
    ids = load_windows(lm.tokenizer, dom, 512, N, 0)
    rows = evaluate_methods(methods, ids, 64, 4, False, 0)
    by = {r.method: r for r in rows}
    c = compare(by["select"], by["static (uniform)"])
    res["domains"][dom] = {"rows": [r.to_json() for r in rows], "select_vs_static": c}
    flat = ""
    if "select start" in by:
        res["domains"][dom]["select_vs_start"] = c0 = compare(by["select"], by["select start"])
        flat = f"; select - start {diff(c0)}"
    if "select flat" in by:
        res["domains"][dom]["select_vs_flat"] = cf = compare(by["select"], by["select flat"])
        flat += f"; select - flat {diff(cf)}"
    print(dom, {r.method: (round(r.kl, 4), [round(x, 4) for x in r.kl_ci or []], round(r.flops, 3)) for r in rows},
          f"select - static {diff(c)}{flat}", f"{time.time() - t0:.0f}s", flush=True)
json.dump(res, open(out, "w"), indent=1)
