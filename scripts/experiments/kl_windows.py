"""Continuation KL on N held-out windows per domain (default 256, issue 20 item 6): static (uniform)
vs a select router folder, the deployment function, paired bootstrap CI of the difference. With
N = 16 the windows are those of `tokenskip report --windows 16` (the same sampling).
usage: .venv/bin/python scripts/experiments/kl_windows.py S SELECT_DIR OUT.json [N]"""
import json, sys, time
import torch
from tokenskip.config import build_routed
from tokenskip.evaluate import compare, evaluate_methods
from tokenskip.models import load_model
from tokenskip.windows import load_windows

torch.set_num_threads(1)
S, sel_dir, out = float(sys.argv[1]), sys.argv[2], sys.argv[3]
N = int(sys.argv[4]) if len(sys.argv) > 4 else 256
lm = load_model("smollm2-135m")
static, _ = build_routed(lm.model, router="static", sparsity=S)
sel, _ = build_routed(lm.model, routers_dir=sel_dir)
res = {"sparsity": S, "select_dir": sel_dir, "windows": N, "seq_len": 512, "cont_len": 64, "domains": {}}
for dom in ("eval", "news"):
    t0 = time.time()
    ids = load_windows(lm.tokenizer, dom, 512, N, 0)
    rows = evaluate_methods([("static (uniform)", static), ("select", sel)], ids, 64, 4, False, 0)
    by = {r.method: r for r in rows}
    c = compare(by["select"], by["static (uniform)"])
    res["domains"][dom] = {"rows": [r.to_json() for r in rows], "select_vs_static": c}
    print(dom, {r.method: (round(r.kl, 4), [round(x, 4) for x in r.kl_ci or []], round(r.flops, 3)) for r in rows},
          f"select - static {c['kl_diff']:+.4f} [{c['kl_diff_ci'][0]:+.4f}, {c['kl_diff_ci'][1]:+.4f}]",
          f"{time.time() - t0:.0f}s", flush=True)
json.dump(res, open(out, "w"), indent=1)
