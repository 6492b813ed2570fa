"""Long-prompt accuracy, scored through the deployment function (benchmarks.md, "Long prompts").

Each example's prompt goes through routed prefill (the answer is never part of what the router
sees), then the answer is decoded teacher-forced through the KV cache by
`tokenskip.evaluate.continuation_logprobs`, the function `generate`, `eval` and the multiple-choice
tasks use. An example is correct when every answer token is the argmax of its position: exactly
when greedy decoding reproduces the answer (tested against step-by-step greedy decoding).

Reported per method, task and prompt length: accuracy with a Wilson 95% interval (exact-ish at 0
and 1, where a bootstrap of 0/1 outcomes collapses to a point), the ratio to dense with a paired
bootstrap 95% CI (tokenskip.stats: the same example draws for the method and dense), and accuracy
by depth of the evidence in 5 bins, where a router that drops the early prompt shows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenskip import stats
from tokenskip.evaluate import continuation_logprobs
from tokenskip.flops import routed_flops_ratio
from tokenskip.precision import model_device

from .longctx_tasks import LongCtxExample

DEPTH_BINS = 5
Z95 = 1.959963984540054


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def score_examples(routed, examples: list[LongCtxExample], batch_size: int = 1, progress: bool = False,
                   desc: str = "longctx") -> tuple[list[int], list[float]]:
    """(correct 0/1, summed answer log-prob) per example. Examples with the same prompt and answer
    lengths share a batch (no padding, so each row is routed exactly as alone)."""
    device = model_device(routed.model)
    correct, logprob = [0] * len(examples), [0.0] * len(examples)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault((len(ex.prompt), len(ex.answer)), []).append(i)
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    for (_, n_ans), members in groups.items():
        for start in range(0, len(members), batch_size):
            part = members[start:start + batch_size]
            ids = torch.tensor([examples[i].prompt + examples[i].answer for i in part], device=device)  # [b,P+a]
            lp = continuation_logprobs(routed, ids, n_ans)  # [b,a,V]
            target = ids[:, -n_ans:]  # [b,a]
            hit = (lp.argmax(-1) == target).all(-1)  # [b]
            total = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)  # [b]
            for j, i in enumerate(part):
                correct[i], logprob[i] = int(hit[j]), float(total[j])
            bar.update(len(part))
    bar.close()
    return correct, logprob


def depth_bin(depth: float, bins: int = DEPTH_BINS) -> int:
    return min(int(depth * bins), bins - 1)


def _ratio_ci(method: list[int], dense: list[int], seed: int) -> list[float] | None:
    """Paired bootstrap CI of accuracy(method) / accuracy(dense) over examples."""
    if len(method) < 2:
        return None
    idx = stats.resample_indices(len(method), seed=seed)
    a, b = np.asarray(method, float)[idx].mean(1), np.asarray(dense, float)[idx].mean(1)
    ok = b > 0
    return list(stats.percentile_ci(a[ok] / b[ok])) if ok.any() else None


def summarize(examples: list[LongCtxExample], correct: dict[str, list[int]], seed: int = 0) -> list[dict]:
    """One row per (method, task, length) and per (method, task) over all lengths ("all"):
    accuracy, Wilson CI, ratio to dense with a paired bootstrap CI, and accuracy by depth bin."""
    dense = correct["dense"]
    keys = sorted({(e.task, e.length) for e in examples}, key=lambda k: (k[0], k[1]))
    keys += sorted({(e.task, "all") for e in examples})
    rows = []
    for method, got in correct.items():
        for task, length in keys:
            sel = [i for i, e in enumerate(examples) if e.task == task and length in ("all", e.length)]
            k, n = sum(got[i] for i in sel), len(sel)
            dk = sum(dense[i] for i in sel)
            by_depth = []
            for b in range(DEPTH_BINS):
                inb = [i for i in sel if depth_bin(examples[i].depth) == b]
                by_depth.append({"bin": [b / DEPTH_BINS, (b + 1) / DEPTH_BINS], "n": len(inb),
                                 "accuracy": sum(got[i] for i in inb) / len(inb) if inb else None})
            rows.append({"method": method, "task": task, "length": length, "n": n, "accuracy": k / n,
                         "accuracy_ci": list(wilson_ci(k, n)), "dense_accuracy": dk / n,
                         "ratio_to_dense": k / dk if dk else None,
                         "ratio_ci": _ratio_ci([got[i] for i in sel], [dense[i] for i in sel], seed),
                         "by_depth": by_depth})
    return rows


def method_cost(routed, examples: list[LongCtxExample]) -> dict:
    """Prefill FLOPs relative to dense (mean over the examples' prompt lengths) and sparsity."""
    if routed.router is None and not routed.removed_layers:  # dense (ShortGPT removes blocks: costed)
        return {"flops": 1.0, "sparsity": 0.0}
    window = routed.score_window if routed.router is not None and routed.router.needs_attention else 0
    lengths = [len(e.prompt) for e in examples]
    f = [routed_flops_ratio(routed, n) for n in lengths]
    s = [routed.schedule.overall(n) for n in lengths]
    return {"flops": sum(f) / len(f), "sparsity": sum(s) / len(s), "score_window": window}


def run_longctx(methods: list[tuple[str, object]], examples: list[LongCtxExample], seed: int = 0,
                batch_size: int = 1, progress: bool = True) -> dict:
    """Score every method (the first must be named "dense") on the same examples. Returns the
    JSON the CLI writes: per-example outcomes, cost per method and the summary rows."""
    if not methods or methods[0][0] != "dense":
        raise ValueError("the first method must be dense (the reference)")
    correct, logprob, cost = {}, {}, {}
    for name, routed in methods:
        correct[name], logprob[name] = score_examples(routed, examples, batch_size, progress, desc=name)
        cost[name] = method_cost(routed, examples)
    return {"methods": cost, "rows": summarize(examples, correct, seed),
            "examples": [{"task": e.task, "length": e.length, "prompt_len": len(e.prompt), "depth": e.depth,
                          "evidence": list(e.evidence), "answer_len": len(e.answer), "source": e.source}
                         for e in examples],
            "correct": correct, "answer_logprob": logprob}


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_longctx(obj: dict) -> str:
    """Markdown: accuracy [Wilson 95% CI] and ratio to dense per method, task and length; then
    accuracy by evidence depth per method and task (all lengths pooled)."""
    rows = obj["rows"]
    lines = ["| method | FLOPs vs dense | task | length | n | accuracy [95% CI] | ratio to dense [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["length"] == "all":
            continue
        ci, rc = r["accuracy_ci"], r["ratio_ci"]
        ratio = _pct(r["ratio_to_dense"]) + (f" [{rc[0]:.2f}, {rc[1]:.2f}]" if rc else "")
        lines.append(f"| {r['method']} | {obj['methods'][r['method']]['flops']:.3f} | {r['task']} | {r['length']} | "
                     f"{r['n']} | {r['accuracy']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {ratio} |")
    bins = [f"{int(100 * b / DEPTH_BINS)}-{int(100 * (b + 1) / DEPTH_BINS)}%" for b in range(DEPTH_BINS)]
    lines += ["", "Accuracy by evidence depth (all lengths; n per bin in parentheses):", "",
              "| method | task | " + " | ".join(bins) + " |", "|---|---|" + "---|" * DEPTH_BINS]
    for r in rows:
        if r["length"] != "all":
            continue
        cells = [f"{_pct(d['accuracy'])} ({d['n']})" for d in r["by_depth"]]
        lines.append(f"| {r['method']} | {r['task']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
