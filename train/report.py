"""The quality table: every method at one sparsity, same data and seed, rows at (near) equal FLOPs.

Methods (benchmarks.md): dense, FTP learned router (searched schedule), static router (searched
schedule), static router (uniform schedule), random router (uniform schedule), ShortGPT layer
removal at matched FLOPs. Columns: achieved sparsity, analytic FLOPs vs dense, continuation
perplexity and its ratio to dense, KL(dense || method), top-1 agreement, and, with tasks, mean
multiple-choice accuracy and its retention (mean over tasks of method acc / dense acc).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tokenskip.errors import UserError

METHODS = ("learned", "static-searched", "static-uniform", "random", "shortgpt")
COLUMNS = ("method", "sparsity", "flops", "ppl", "ppl_ratio", "kl", "top1", "mc_acc", "mc_retention")


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def markdown(rows: list[dict], title: str | None = None) -> str:
    head = ("| method | sparsity | FLOPs vs dense | cont. ppl | ppl ratio | KL to dense | top-1 agree | MC acc | "
            "MC retention |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    lines = [f"**{title}**", ""] if title else []
    lines += [head, sep]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r.get('sparsity'), '.3f')} | {_fmt(r.get('flops'), '.3f')} | "
                     f"{_fmt(r.get('ppl'), '.2f')} | {_fmt(r.get('ppl_ratio'), '.3f')} | {_fmt(r.get('kl'), '.4f')} | "
                     f"{_fmt(r.get('top1'), '.3f')} | {_fmt(r.get('mc_acc'), '.3f')} | "
                     f"{_fmt(r.get('mc_retention'), '.3f')} |")
    return "\n".join(lines)


def retention(method: list[dict], dense: list[dict]) -> tuple[float, float]:
    """(mean accuracy, mean over tasks of acc/dense acc) for task results of one method."""
    d = {t["task"]: t["accuracy"] for t in dense}
    pairs = [(t["accuracy"], d.get(t["task"])) for t in method if d.get(t["task"])]
    if not pairs:
        return float("nan"), float("nan")
    return sum(a for a, _ in pairs) / len(pairs), sum(a / b for a, b in pairs) / len(pairs)


def rows_from_results(obj: dict) -> list[dict]:
    """Rows from one `tokenskip eval --out` JSON file."""
    if not isinstance(obj, dict) or not isinstance(obj.get("results"), list):
        raise ValueError("expected an object with a 'results' list")
    tasks = obj.get("tasks") or {}
    dense_tasks = tasks.get("dense")
    rows = []
    for r in obj["results"]:
        row = {k: r.get(k) for k in COLUMNS if k in r}
        row["method"] = r["method"]
        row["seq_len"], row["cont_len"], row["windows"] = r.get("seq_len"), r.get("cont_len"), r.get("windows")
        mt = tasks.get(r["method"])
        if mt and dense_tasks:
            row["mc_acc"], row["mc_retention"] = retention(mt, dense_tasks)
        rows.append(row)
    return rows


def collect(paths: list[str]) -> list[dict]:
    """Rows from eval JSON files or folders holding them (*.json with a 'results' list), dense once."""
    rows: list[dict] = []
    dense_ppl = None
    for p in paths:
        path = Path(p)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        if not path.exists():
            raise UserError(f"{p}: no such file or folder")
        found = False
        for f in files:
            try:
                obj = json.loads(f.read_text(encoding="utf-8"))
                new = rows_from_results(obj)
            except (ValueError, UnicodeDecodeError, KeyError, TypeError):
                if path.is_dir():
                    continue  # other JSON in the folder (tokenskip.json, schedule.json, ...)
                raise UserError(f"{f}: not a result file written by `tokenskip eval --out` or the quality table") from None
            found = True
            for r in new:
                if r["method"] == "dense":
                    if dense_ppl is not None and abs(dense_ppl - r["ppl"]) > 1e-6 * max(1.0, dense_ppl):
                        raise UserError(f"{f}: its dense perplexity {r['ppl']:.4f} differs from {dense_ppl:.4f}: "
                                        "results were measured on different data; compare like with like")
                    if dense_ppl is not None:
                        continue
                    dense_ppl = r["ppl"]
                rows.append(r)
        if not found:
            raise UserError(f"{p}: holds no result JSON written by `tokenskip eval --out`")
    return rows


# -- the full table at one sparsity -------------------------------------------------------------------

def quality_table(model_name: str, sparsity: float, fit_dir: str | Path, *, seq_len: int = 512, cont_len: int = 64,
                  windows: int = 16, batch_size: int = 4, seed: int = 0, kv_policy: str = "skip",
                  tasks: list[str] | None = None, task_examples: int = 50, eval_text: str | None = None,
                  calib_text: str | None = None, lm=None, progress: bool = True,
                  methods: tuple[str, ...] = METHODS) -> dict:
    """Evaluate every method at `sparsity` on the held-out split. `fit_dir` is a `tokenskip fit` output
    (routers/ for the learned router, search-static/schedule.json for the static searched schedule).

    Returns {"model", "settings", "results": [EvalResult json], "tasks": {method: [TaskResult json]},
    "rows": [table rows], "markdown": str}.
    """
    from tokenskip.config import build_routed
    from tokenskip.evaluate import dense_reference, dense_result, evaluate
    from tokenskip.evaluate_cli import load_windows
    from tokenskip.models import load_model
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import RandomRouter, StaticRouter
    from tokenskip.schedule import Schedule

    from .baselines import shortgpt_for

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(sorted(unknown))} (choose from {', '.join(METHODS)})")
    fit_dir = Path(fit_dir)
    torch.manual_seed(seed)
    lm = lm or load_model(model_name)
    model, n = lm.model, lm.model.config.num_hidden_layers
    ids = load_windows(lm.tokenizer, eval_text, seq_len, windows, split="eval")
    base = RoutedModel(model, Schedule.dense(n), None, kv_policy=kv_policy)
    dense = dense_reference(base, ids, cont_len, batch_size, progress)
    results = [dense_result(dense, seq_len, cont_len)]
    models: list[tuple[str, RoutedModel]] = []
    info = {}
    uniform = Schedule.uniform(n, sparsity)
    if "learned" in methods:
        learned, _ = build_routed(model, routers_dir=fit_dir / "routers", kv_policy=kv_policy, model_name=model_name)
        models.append(("learned (searched)", learned))
    if "static-searched" in methods:
        searched = Schedule.load(fit_dir / "search-static" / "schedule.json", n)
        models.append(("static (searched)", RoutedModel(model, searched, StaticRouter(), kv_policy=kv_policy)))
    if "static-uniform" in methods:
        models.append(("static (uniform)", RoutedModel(model, uniform, StaticRouter(), kv_policy=kv_policy)))
    if "random" in methods:
        models.append(("random (uniform)", RoutedModel(model, uniform, RandomRouter(seed), kv_policy=kv_policy)))
    if "shortgpt" in methods:
        sg, info, name = shortgpt_for(lm, sparsity, seq_len, cont_len, kv_policy, batch_size, calib_text)
        models.append((name, sg))
    for name, m in models:
        results.append(evaluate(m, ids, cont_len, dense, name, batch_size, progress))
    task_results: dict[str, list[dict]] = {}
    if tasks:
        from . import tasks as T

        loaded = T.load_tasks(tasks, task_examples, seed)
        task_results["dense"] = [r.to_json() for r in T.run_tasks(base, lm.tokenizer, loaded, False, progress)]
        for name, m in models:
            task_results[name] = [r.to_json() for r in T.run_tasks(m, lm.tokenizer, loaded, True, progress)]
    obj = {"model": model_name, "sparsity": sparsity,
           "settings": {"seq_len": seq_len, "cont_len": cont_len, "windows": int(ids.shape[0]), "seed": seed,
                        "kv_policy": kv_policy, "tasks": tasks or [], "task_examples": task_examples},
           "shortgpt": info, "results": [r.to_json() for r in results], "tasks": task_results}
    rows = rows_from_results(obj)
    obj["rows"] = rows
    obj["markdown"] = markdown(rows, f"{model_name} @ sparsity {sparsity:g}, {int(ids.shape[0])} windows of "
                                     f"{seq_len} tokens, last {cont_len} scored, kv_policy={kv_policy}")
    return obj
