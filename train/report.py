"""The quality table: every method at one sparsity, same windows and seed, rows at (near) equal FLOPs.

Methods (benchmarks.md): dense, FTP learned router (searched schedule), static router (searched
schedule), static router (uniform schedule), random router (uniform schedule), ShortGPT layer
removal at matched FLOPs. Every number is measured as deployment computes it (tokenskip.evaluate:
routed prefill, then teacher-forced decode through the KV cache) with paired bootstrap 95% CIs over
windows, on held-out Wikipedia windows sampled across every article and on a second held-out domain
(news). Paired comparisons (learned vs static, ...) say which differences the CIs support. Free-running
greedy text (agreement with dense, repetition) and multiple-choice retention are optional.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenskip.errors import UserError
from tokenskip.quality_format import comparison_line, quality_markdown

METHODS = ("learned", "select", "static-searched", "static-uniform", "random", "shortgpt")
SELECT_NAME = "select (select_after)"  # the learned one-selection router's row (fit_dir/select, when trained)
COLUMNS = ("method", "sparsity", "flops", "ppl", "ppl_ratio", "ppl_ratio_ci", "kl", "kl_ci", "top1", "top1_ci",
           "mc_acc", "mc_retention", "mc_retention_ci")
# paired comparisons reported under every table: (a, b) where a is meant to beat b
COMPARISONS = (("learned (searched)", "static (searched)"), ("learned (searched)", "static (uniform)"),
               ("static (searched)", "static (uniform)"), ("static (uniform)", "random (uniform)"),
               (SELECT_NAME, "static (uniform)"))
DOMAINS = ("eval", "news")


LONGCTX_FLAGS = ("--longctx", "--longctx-lengths", "--longctx-examples")  # their names in report/pipeline


@dataclass(frozen=True)
class QualitySettings:
    """How the quality table measures (the same for every method, so rows compare): windows of
    `seq_len` tokens, the last `cont_len` scored, sampled by `seed` across each domain in `domains`
    ("eval": the Wikipedia eval split; "news": the Lee corpus), or from one file `eval_text`.
    `calib_text`: ShortGPT's block-influence calibration. `tasks`: multiple-choice tasks
    (`task_examples` each). `free_run` > 0: greedy generation from that many prompts
    (`free_run_tokens` new tokens each)."""

    seq_len: int = 512
    cont_len: int = 64
    windows: int = 64
    batch_size: int = 4
    seed: int = 0
    kv_policy: str = "skip"
    methods: tuple[str, ...] = METHODS
    domains: tuple[str, ...] = DOMAINS
    eval_text: str | None = None
    calib_text: str | None = None
    tasks: list[str] | None = None
    task_examples: int = 100
    free_run: int = 0
    free_run_tokens: int = 64
    longctx: tuple[str, ...] = ()
    longctx_lengths: tuple[int, ...] = (512, 1024)
    longctx_examples: int = 24

    def check(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise UserError(f"unknown method(s) {', '.join(sorted(unknown))} (choose from {', '.join(METHODS)})")
        bad = set(self.domains) - set(DOMAINS)
        if bad or not self.domains:
            raise UserError(f"--domains {','.join(self.domains)}: choose from {', '.join(DOMAINS)}")
        if self.longctx:
            from .longctx_tasks import check_request

            check_request(self.longctx, self.longctx_lengths, self.longctx_examples, flags=LONGCTX_FLAGS)


def parse_domains(text: str) -> tuple[str, ...]:
    """--domains eval,news -> ("eval", "news"), a one-line error for anything else."""
    domains = tuple(d.strip() for d in text.split(",") if d.strip())
    if not domains or set(domains) - set(DOMAINS):
        raise UserError(f"--domains {text}: choose from {', '.join(DOMAINS)}")
    return domains


def markdown(rows: list[dict], title: str | None = None) -> str:
    return quality_markdown(rows, title, tasks=any("mc_acc" in r for r in rows))


def rows_from_results(obj: dict) -> list[dict]:
    """Rows from one `tokenskip eval --out` JSON file."""
    if not isinstance(obj, dict) or not isinstance(obj.get("results"), list):
        raise ValueError("expected an object with a 'results' list")
    from .tasks import attach_retention

    rows = []
    for r in obj["results"]:
        row = {k: r.get(k) for k in COLUMNS if k in r}
        row["method"] = r["method"]
        row["seq_len"], row["cont_len"], row["windows"] = r.get("seq_len"), r.get("cont_len"), r.get("windows")
        rows.append(row)
    attach_retention(rows, obj.get("tasks") or {}, int(obj.get("seed", 0) or 0))
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

def _methods(lm, fit_dir: Path, sparsity: float, q: QualitySettings) -> tuple[list, dict]:
    from tokenskip.config import build_routed
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import RandomRouter, StaticRouter
    from tokenskip.schedule import Schedule

    from .baselines import shortgpt_for

    model, n = lm.model, lm.model.config.num_hidden_layers
    uniform = Schedule.uniform(n, sparsity)
    out, info = [], {}
    names, kv_policy = tuple(q.methods), q.kv_policy
    if "learned" in names:
        learned, _ = build_routed(model, routers_dir=fit_dir / "routers", kv_policy=kv_policy, model_name=lm.name)
        out.append(("learned (searched)", learned))
    if "select" in names and (fit_dir / "select" / "tokenskip.json").is_file():  # `train-select` / the pipeline
        sel, _ = build_routed(model, routers_dir=fit_dir / "select", kv_policy=kv_policy, model_name=lm.name)
        out.append((SELECT_NAME, sel))
    if "static-searched" in names:
        searched = Schedule.load(fit_dir / "search-static" / "schedule.json", n)
        out.append(("static (searched)", RoutedModel(model, searched, StaticRouter(), kv_policy=kv_policy)))
    if "static-uniform" in names:
        out.append(("static (uniform)", RoutedModel(model, uniform, StaticRouter(), kv_policy=kv_policy)))
    if "random" in names:
        out.append(("random (uniform)", RoutedModel(model, uniform, RandomRouter(q.seed), kv_policy=kv_policy)))
    if "shortgpt" in names:
        sg, info, name = shortgpt_for(lm, sparsity, q.seq_len, q.cont_len, kv_policy, q.batch_size, q.calib_text)
        out.append((name, sg))
    return out, info


def router_provenance(fit_dir: Path) -> str | None:
    """One paragraph on where the shipped learned router came from (its start and which validated
    training step shipped), from the fit's tokenskip.json files: a table row says how good the
    router is, this says whether training or the start made it so."""
    from tokenskip.fileio import read_json

    parts = []
    for stage, label in (("router-1", "training"), ("routers", "final training")):
        f = fit_dir / stage / "tokenskip.json"
        try:
            tr = (read_json(f, "tokenskip.json").get("extra") or {}).get("training") or {}
        except (UserError, AttributeError):
            continue
        start = tr.get("start") or {}
        if stage == "router-1" and tr.get("init") == "static" and start.get("val_kl"):
            kls = ", ".join(f"{k} -> {v:.4f}" for k, v in start["val_kl"].items())
            parts.append(f"started as the static sink + recency router with sink fraction {start.get('chosen')} "
                         f"(chosen by calibration KL among {kls})")
        best, steps, kl = tr.get("best_step"), tr.get("steps"), tr.get("best_val_kl")
        if isinstance(best, int) and best >= 0 and isinstance(kl, (int, float)):
            what = ("no step improved on its start, so the start shipped" if best == 0
                    else f"step {best} of {steps} shipped")
            parts.append(f"{label}: validated every {tr.get('validate_every')} steps, {what} "
                         f"(calibration KL {kl:.4f})")
    return ("Learned router: " + "; ".join(parts) + ".") if parts else None


def comparisons(results: list, seed: int = 0) -> list[dict]:
    """Paired bootstrap comparisons of COMPARISONS among the evaluated methods."""
    from tokenskip.evaluate import compare

    by = {r.method: r for r in results}
    return [compare(by[a], by[b], seed) for a, b in COMPARISONS if a in by and b in by]


def quality_methods(lm, fit_dir: str | Path, sparsity: float, q: QualitySettings) -> tuple:
    """(dense reference, [(name, routed model)], ShortGPT info): the table's methods, built once
    and shared by the KL table and the long-prompt section (`quality_table(built=...)`)."""
    from tokenskip.routed import RoutedModel
    from tokenskip.schedule import Schedule

    models, info = _methods(lm, Path(fit_dir), sparsity, q)
    base = RoutedModel(lm.model, Schedule.dense(lm.model.config.num_hidden_layers), None, kv_policy=q.kv_policy)
    return base, models, info


def quality_table(model_name: str, sparsity: float, fit_dir: str | Path, q: QualitySettings = QualitySettings(), *,
                  lm=None, progress: bool = True, built: tuple | None = None) -> dict:
    """Evaluate every method at `sparsity` on held-out text. `fit_dir` is a `tokenskip fit` output
    (routers/ for the learned router, search-static/schedule.json for the static searched schedule).

    `q` says how (windows, domains, tasks, free-running text: QualitySettings); `lm` is the loaded
    model (loaded here when None); `built`: its `quality_methods` when the caller built them already.
    Returns {"model", "sparsity", "settings", "shortgpt", "domains":
    {domain: {"results", "rows", "comparisons", "markdown"}}, "results"/"rows" (the first domain's),
    "free_running", "tasks", "longctx" (with q.longctx: long-prompt accuracy of the same methods plus the
    training-free router kinds, `longctx_section`), "markdown"}.
    """
    from tokenskip.evaluate import evaluate_methods
    from tokenskip.models import load_model
    from tokenskip.windows import load_windows

    q.check()
    seq_len, cont_len, batch_size, seed, kv_policy = q.seq_len, q.cont_len, q.batch_size, q.seed, q.kv_policy
    eval_text, tasks, free_run = q.eval_text, q.tasks, q.free_run
    fit_dir = Path(fit_dir)
    torch.manual_seed(seed)
    lm = lm or load_model(model_name)
    long_examples = longctx_examples(lm, q)  # before any scoring: a too-long --longctx-lengths fails fast
    base, models, info = built or quality_methods(lm, fit_dir, sparsity, q)
    title = f"{model_name} @ sparsity {sparsity:g}"
    per_domain, texts = {}, []
    sources = [("text", eval_text)] if eval_text else [(d, None) for d in q.domains]
    for domain, text_file in sources:
        ids = load_windows(lm.tokenizer, domain if not text_file else "eval", seq_len, q.windows, seed, text_file)
        results = evaluate_methods(models, ids, cont_len, batch_size, progress, seed, dense_model=base)
        comps = comparisons(results, seed)
        rows = rows_from_results({"results": [r.to_json() for r in results]})
        label = text_file or {"eval": "held-out Wikipedia", "news": "held-out news (second domain)"}[domain]
        md = markdown(rows, f"{title}, {label}: {int(ids.shape[0])} windows of {seq_len} tokens, last {cont_len} "
                            f"scored after a routed prefill, kv_policy={kv_policy}, seed {seed}")
        md += "\n\n" + "\n".join(f"- {comparison_line(c)}" for c in comps)
        per_domain[domain] = {"results": [r.to_json() for r in results], "rows": rows, "comparisons": comps,
                              "markdown": md, "windows": int(ids.shape[0])}
        texts.append(md)
    first = per_domain[sources[0][0]]
    provenance = router_provenance(fit_dir) if "learned" in q.methods else None
    if provenance:
        texts[0] += "\n\n" + provenance
    obj = {"model": model_name, "sparsity": sparsity, "seed": seed,
           "settings": {"seq_len": seq_len, "cont_len": cont_len, "windows": first["windows"], "seed": seed,
                        "kv_policy": kv_policy, "tasks": tasks or [], "task_examples": q.task_examples,
                        "domains": [d for d, _ in sources], "free_run": free_run,
                        "free_run_tokens": q.free_run_tokens, "longctx": list(q.longctx),
                        "longctx_lengths": list(q.longctx_lengths) if q.longctx else [],
                        "longctx_examples": q.longctx_examples if q.longctx else 0},
           "shortgpt": info, "domains": per_domain, "results": first["results"], "rows": first["rows"],
           "comparisons": first["comparisons"], "provenance": provenance, "tasks": {}, "free_running": [],
           "longctx": None}
    if free_run:
        from tokenskip.freerun import format_free_running, free_running

        prompts = load_windows(lm.tokenizer, sources[0][0] if not eval_text else "eval", seq_len - cont_len, free_run,
                               seed + 1, eval_text)
        fr = free_running(models, base, prompts, q.free_run_tokens, batch_size=8, progress=progress, seed=seed)
        obj["free_running"] = fr
        texts.append(f"Free-running greedy text, {free_run} prompts of {seq_len - cont_len} tokens, "
                     f"{q.free_run_tokens} new tokens each:\n\n" + format_free_running(fr))
    if tasks:
        from . import tasks as T

        loaded = T.load_tasks(tasks, q.task_examples, seed)
        task_results = {"dense": [r.to_json() for r in T.run_tasks(base, lm.tokenizer, loaded, progress, seed)]}
        for name, m in models:
            task_results[name] = [r.to_json() for r in T.run_tasks(m, lm.tokenizer, loaded, progress, seed)]
        obj["tasks"] = task_results
        T.attach_retention(obj["rows"], task_results, seed)
        texts[0] = markdown(obj["rows"], texts[0].splitlines()[0].strip("*")) + "\n\n" + \
            "\n".join(f"- {comparison_line(c)}" for c in first["comparisons"]) + \
            (f"\n\n{provenance}" if provenance else "")
        texts.append(T.format_tasks(task_results))
    if long_examples:
        obj["longctx"] = longctx_section(lm, base, models, sparsity, long_examples, q, progress)
        texts.insert(len(per_domain), obj["longctx"]["markdown"])  # right after the KL table(s)
    obj["markdown"] = "\n\n".join(texts)
    return obj


# -- long prompts beside the KL ---------------------------------------------------------------------------

def training_free_kinds() -> tuple[str, ...]:
    """Router kinds that need no training and are not already a row of the table (static, random):
    LazyLLM/GemFilter-style attention routers, the baselines a learned router must beat
    (benchmarks.md, "Long prompts"). Read from ROUTER_KINDS, so a new kind is scored too."""
    from tokenskip.routers import ROUTER_KINDS, TRAINED_KINDS

    return tuple(k for k in ROUTER_KINDS if k not in ("dense", "static", "random") and k not in TRAINED_KINDS)


def longctx_examples(lm, q: QualitySettings) -> list:
    """The long-prompt examples of `q` (empty when q.longctx is empty), checked against the
    model's context length."""
    if not q.longctx:
        return []
    from .longctx_tasks import check_request, make_examples

    max_len = int(getattr(lm.model.config, "max_position_embeddings", 2048))
    check_request(q.longctx, q.longctx_lengths, q.longctx_examples, max_len, LONGCTX_FLAGS)
    return make_examples(lm.tokenizer, list(q.longctx), list(q.longctx_lengths), q.longctx_examples, q.seed)


def longctx_section(lm, base, models: list, sparsity: float, examples: list, q: QualitySettings,
                    progress: bool = True) -> dict:
    """Long-prompt accuracy of the table's own methods (the same routed models, dense first) plus
    the training-free router kinds at `sparsity`, each on its own schedule shape (uniform; gemfilter's
    select_after: the same mean sparsity, so the FLOPs of static (uniform) up to attention's
    quadratic term; the FLOPs column says). Returns run_longctx's JSON with "markdown" (format_longctx)."""
    from tokenskip.config import build_routed

    from .longctx import format_longctx, run_longctx

    methods, skipped = [("dense", base), *models], []
    for kind in training_free_kinds():
        try:
            routed, _ = build_routed(lm.model, router=kind, sparsity=sparsity, kv_policy=q.kv_policy, seed=q.seed,
                                     model_name=lm.name)
        except UserError as exc:  # its schedule shape cannot hold the sparsity (gemfilter's at 0.5): a note, not a failure
            skipped.append(f"{kind} at sparsity {sparsity}: {str(exc).split(': ', 1)[-1]}")
            continue
        methods.append((f"{kind} ({routed.schedule.meta.get('kind', 'uniform')})", routed))
    obj = {"tasks": list(q.longctx), "lengths": list(q.longctx_lengths), "examples_per_task_length": q.longctx_examples,
           "sparsity": sparsity, "kv_policy": q.kv_policy, "seed": q.seed,
           **run_longctx(methods, examples, q.seed, q.batch_size, progress)}
    head = (f"Long prompts: {q.longctx_examples} examples per task and length ({', '.join(q.longctx)} at "
            f"{', '.join(map(str, q.longctx_lengths))} tokens), evidence at a stated depth, question at the end; "
            f"routed prefill, answer through the KV cache, correct = greedy decoding reproduces it; Wilson 95% CIs, "
            f"ratio to dense with paired bootstrap 95% CIs, kv_policy={q.kv_policy}, seed {q.seed}:")
    obj["skipped"] = skipped
    notes = "".join(f"\n\nNot scored: {line}" for line in skipped)
    obj["markdown"] = head + "\n\n" + format_longctx(obj) + notes
    return obj
