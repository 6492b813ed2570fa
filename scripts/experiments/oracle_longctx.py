"""Long-prompt headroom (issue 20 item 2 on the long-prompt tasks): a hindsight router that keeps
the evidence span (+-2 tokens) first and then the newest tokens, on the select router's schedule and
on the uniform one, paired with a `tokenskip longctx` run (same seed-0 examples: dense, static,
select; docs/training.md 8.9).
usage: .venv/bin/python scripts/experiments/oracle_longctx.py LONGCTX.json SELECT_DIR OUT.json"""
import json, sys, time
import numpy as np
import torch
from tokenskip.config import build_routed
from tokenskip.models import load_model
from tokenskip.train.longctx import depth_bin, score_examples
from tokenskip.train.longctx_tasks import make_examples
from tokenskip.stats import resample_indices, percentile_ci

from longctx_screen import EvidenceRouter  # the hindsight router of 8.2 (this folder is on sys.path)

torch.set_num_threads(2)
base = json.load(open(sys.argv[1]))
sel_dir, out = sys.argv[2], sys.argv[3]
S = base["sparsity"]
lm = load_model("smollm2-135m")
exs = make_examples(lm.tokenizer, base["tasks"], base["lengths"], base["examples_per_task_length"], base["seed"])
assert [list(e.evidence) for e in exs] == [m["evidence"] for m in base["examples"]], "not the longctx run's examples"


res = dict(base["correct"])
sel, _ = build_routed(lm.model, routers_dir=sel_dir)
for name in ["oracle (select's schedule)", "oracle (uniform)"]:
    t0 = time.time()
    routed = build_routed(lm.model, router="static", sparsity=S)[0]
    if "select" in name:
        routed.schedule = sel.schedule
    routed.router = EvidenceRouter()
    correct = []
    with torch.no_grad():
        for ex in exs:
            routed.router.span = ex.evidence
            correct += score_examples(routed, [ex])[0]
    res[name] = correct
    print(name, sum(correct), len(correct), f"{time.time() - t0:.0f}s", flush=True)
meta = base["examples"]
lines = []
for task in base["tasks"]:
    for L in base["lengths"]:
        m = np.array([e["task"] == task and e["length"] == L for e in meta])
        sub = {k: np.array(v)[m] for k, v in res.items()}
        ii = resample_indices(int(m.sum()))
        d = sub["dense"]
        lines.append(f"{task} @ {L} (n = {int(m.sum())})")
        for k, v in sub.items():
            lo, hi = percentile_ci(v[ii].mean(1) / np.maximum(d[ii].mean(1), 1e-9))
            bins = [v[[depth_bin(x["depth"]) == b for x, mm in zip(meta, m) if mm]].mean() for b in range(5)]
            lines.append(f"  {k}: {v.mean():.2f} ({v.mean() / max(d.mean(), 1e-9):.2f}x [{lo:.2f}, {hi:.2f}]) by depth " + " / ".join(f"{b:.2f}" for b in bins))
        head = sub["oracle (select's schedule)"].mean() - sub["static"].mean()
        got = sub["select"].mean() - sub["static"].mean()
        lines.append(f"  headroom over static on select's schedule {head:+.2f}; select closes {got:+.2f}"
                     + (f" ({got / head:.2f} of it)" if head > 0 else ""))
print("\n".join(lines))
json.dump({"sparsity": S, "longctx_run": sys.argv[1], "select_dir": sel_dir, "examples": meta, "correct": res,
           "summary": lines}, open(out, "w"), indent=1)
