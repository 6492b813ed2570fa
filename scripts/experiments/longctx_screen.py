"""Issue 20 screen (docs/training.md 8.5): schedule shape x training-free router on the long-prompt
tasks, a router told where the evidence is (is selection the whole problem?), and the continuation
KL of the candidates. smollm2-135m, 512-token prompts, seed 0, overall sparsity S at the same mean.

usage:
  .venv/bin/python scripts/experiments/longctx_screen.py routers N TASKS S [LENGTH] [NAME ...]   # e.g. 24 needle,article_qa 0.3 gem-E15 static-U
  .venv/bin/python scripts/experiments/longctx_screen.py evidence N TASKS S
  .venv/bin/python scripts/experiments/longctx_screen.py kl WINDOWS S
NAME: static-U, hybrid-U, static-E<k>, hybrid-E<k>, gem-E<k> (one selection layer, block k-1),
gem-E<k>-mean, gem-E<k>-r25 (recency share 0.25), gem-E<k>-w32 (32 window rows), gem-E<k>-p10.3
(pooled attention reaching 10 tokens back and 3 ahead); E<k> = blocks
0..k-1 dense, the blocks after routed alike, the last two dense (Schedule.select_after).
"""
import sys
import time

import torch

from tokenskip.config import build_routed
from tokenskip.evaluate import evaluate_methods
from tokenskip.models import load_model
from tokenskip.routers import StaticRouter
from tokenskip.schedule import Schedule
from tokenskip.train.longctx import depth_bin, score_examples
from tokenskip.train.longctx_tasks import make_examples
from tokenskip.windows import load_windows

torch.set_num_threads(2)


def method(lm, name: str, overall: float, kv: str = "skip"):
    """A routed model from a NAME (see the module docstring)."""
    parts = name.split("-")
    kind, shape, opts = parts[0], parts[1], parts[2:]
    n = lm.model.config.num_hidden_layers
    sched = Schedule.uniform(n, overall) if shape == "U" else Schedule.select_after(n, overall, int(shape[1:]))
    router = {"gem": "hybrid"}.get(kind, kind)
    routed, _ = build_routed(lm.model, router=router, sparsity=overall, kv_policy=kv)
    routed.schedule = sched
    if kind == "gem":
        routed.router.score_refresh = False
    for o in opts:
        if o == "mean":
            routed.router.score_heads = "mean"
        elif o.startswith("r"):
            routed.router.recent = int(o[1:]) / 100
        elif o.startswith("w"):
            routed.score_window = int(o[1:])
        elif o.startswith("p"):  # p<back>.<ahead>: the reach of the pooled attention
            routed.router.reach = tuple(int(v) for v in o[1:].split("."))
    return routed


def report(name: str, exs, correct: list[int], seconds: float) -> None:
    """One line: per task (and length, when the examples have several) correct/n and the depth fifths."""
    out = []
    several = len({e.length for e in exs}) > 1
    for t, length in sorted({(e.task, e.length) for e in exs}):
        idx = [i for i, e in enumerate(exs) if e.task == t and (not several or e.length == length)]
        bins = [[correct[i] for i in idx if depth_bin(exs[i].depth) == b] for b in range(5)]
        label = f"{t}@{length}" if several else t
        out.append(f"{label} {sum(correct[i] for i in idx)}/{len(idx)} [" + " ".join(f"{sum(b)}/{len(b)}" for b in bins) + "]")
    print(name, "  ".join(out), f"{seconds:.0f}s", flush=True)


def score_and_report(methods, exs) -> None:
    """score_examples + report for each (name, routed model)."""
    for name, routed in methods:
        t0 = time.time()
        with torch.no_grad():
            correct, _ = score_examples(routed, exs)
        report(name, exs, correct, time.time() - t0)


def ci_diff(c: dict) -> str:
    """A tokenskip.evaluate.compare result as 'diff [lo, hi]'."""
    return f"{c['kl_diff']:+.4f} [{c['kl_diff_ci'][0]:+.4f}, {c['kl_diff_ci'][1]:+.4f}]"


class EvidenceRouter(StaticRouter):
    """Told the evidence span of the one example it routes (+-2 tokens): those first, then recency."""
    span = (0, 0)

    def scores(self, ctx):
        a, b = self.span
        inside = (ctx.positions >= a - 2) & (ctx.positions < b + 2)  # [B,S]
        return ctx.positions.to(torch.float32) + inside.float() * 1e6


def main() -> None:
    mode = sys.argv[1]
    lm = load_model("smollm2-135m")
    if mode == "kl":
        nwin, overall = int(sys.argv[2]), float(sys.argv[3])
        names = ["static-U", "hybrid-U", "gem-E15", "gem-E18", "static-E15"]
        ms = [(nm, method(lm, nm, overall)) for nm in names]
        for dom in ("eval", "news"):
            ids = load_windows(lm.tokenizer, dom, 576, nwin, 0)
            for r in evaluate_methods(ms, ids, 64, 4, False, 0):
                print(dom, r.method, f"KL {r.kl:.4f} {r.kl_ci} ppl_ratio {r.ppl_ratio:.3f} flops {r.flops:.3f}", flush=True)
        return
    n, tasks, overall = int(sys.argv[2]), sys.argv[3].split(","), float(sys.argv[4])
    length = int(sys.argv[5]) if mode == "routers" and sys.argv[5].isdigit() else 512
    exs = make_examples(lm.tokenizer, tasks, [length], n, 0)
    if mode == "routers":
        names = ["dense", *[a for a in sys.argv[5:] if not a.isdigit()]]
        for nm in names:
            t0 = time.time()
            routed = build_routed(lm.model, router="dense")[0] if nm == "dense" else method(lm, nm, overall)
            with torch.no_grad():
                correct, _ = score_examples(routed, exs)
            report(nm, exs, correct, time.time() - t0)
    elif mode == "evidence":
        for shape in ("U", "E8"):
            for kv in ("skip", "dense"):
                routed = method(lm, f"static-{shape}", overall, kv)
                routed.router = EvidenceRouter()
                t0, correct = time.time(), []
                for ex in exs:
                    routed.router.span = ex.evidence
                    with torch.no_grad():
                        correct += score_examples(routed, [ex])[0]
                report(f"evidence-{shape} kv={kv}", exs, correct, time.time() - t0)


if __name__ == "__main__":
    main()
