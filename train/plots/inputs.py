"""Read and check the JSON the figures are drawn from, with one-line errors naming the file.

Inputs (nothing here recomputes a number; it only reads what the commands wrote):
- quality reports: `tokenskip report --json/--out`, the pipeline's quality.json, the report's
  quality-L*-c*.json in a fit folder, or a {"sweep": [report, ...]} file of several sparsities;
- schedules: fit folders' search-static/ and search-learned/ schedule.json;
- `tokenskip bench --json/--out` files;
- `tokenskip explain --json` files.
"""

from __future__ import annotations

import math
from pathlib import Path

from tokenskip.errors import UserError
from tokenskip.fileio import read_json

EXPLAIN_FORMAT = "tokenskip-explain"
BENCH_FIELDS = ("backend", "seq", "batch", "sparsity", "speedup", "ideal")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _interval(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v) and v[0] <= v[1]


# ------------------------------------------------------------------------------------ quality
def check_row(row, where: str, i: int) -> dict:
    """A quality row: method, flops, kl, ppl_ratio (numbers); optional [lo, hi] CIs."""
    if not isinstance(row, dict) or not isinstance(row.get("method"), str):
        raise UserError(f"{where}: row {i} is not an object with a 'method' name")
    for key in ("flops", "kl", "ppl_ratio"):
        if not _number(row.get(key)):
            raise UserError(f"{where}: row {i} ({row['method']}) has no numeric '{key}'")
    for key in ("kl_ci", "ppl_ratio_ci"):
        if row.get(key) is not None and not _interval(row[key]):
            raise UserError(f"{where}: row {i} ({row['method']}) has '{key}' {row[key]!r}, expected [lo, hi]")
    return row


def quality_reports(obj, where: str) -> list[dict]:
    """A report, a {"sweep": [...]} of reports, a {"rows": [...]} table or a list of any of them
    -> reports, each {"model", "sparsity", "settings", "rows", "where"} with checked rows."""
    if isinstance(obj, list):
        return [r for i, o in enumerate(obj) for r in quality_reports(o, f"{where}[{i}]")]
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a quality report (expected a JSON object with 'rows')")
    if isinstance(obj.get("sweep"), list):
        if not obj["sweep"]:
            raise UserError(f"{where}: 'sweep' is empty")
        return [r for i, o in enumerate(obj["sweep"]) for r in quality_reports(o, f"{where} sweep[{i}]")]
    rows = obj.get("rows")
    if rows is None and isinstance(obj.get("results"), list):
        from ..report import rows_from_results  # the table's own view of the results

        try:
            rows = rows_from_results(obj)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: 'results' are not `tokenskip eval` results") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{where}: not a quality report (expected a non-empty 'rows', 'results' or 'sweep' list)")
    rows = [check_row(r, where, i) for i, r in enumerate(rows)]
    settings = obj.get("settings") if isinstance(obj.get("settings"), dict) else {}
    return [{"model": obj.get("model"), "sparsity": obj.get("sparsity"), "settings": settings, "rows": rows,
             "where": where}]


def is_quality(obj) -> bool:
    if isinstance(obj, dict) and isinstance(obj.get("sweep"), list):
        return True
    rows = obj.get("rows") if isinstance(obj, dict) else None
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        return "kl" in rows[0] and "method" in rows[0]
    return isinstance(obj, dict) and isinstance(obj.get("results"), list) and "model" in obj


def load_quality(path: str | Path) -> list[dict]:
    """Reports from a file, or from every quality JSON in a folder."""
    path = Path(path)
    if path.is_dir():
        found = [f for f in sorted(path.glob("*.json")) if is_quality(read_json(f))]
        if not found:
            raise UserError(f"{path}: holds no quality report JSON (`tokenskip report --out`, quality.json)")
        return [r for f in found for r in quality_reports(read_json(f), str(f))]
    return quality_reports(read_json(path, "quality report"), str(path))


# ----------------------------------------------------------------------------------- schedules
def load_schedule(path: str | Path) -> dict:
    """schedule.json -> {"sparsity", "overall", "target", "block_influence" (or None), "kind", "router", "model"}."""
    from tokenskip.schedule import Schedule

    sched = Schedule.load(path)
    bi = sched.meta.get("block_influence")
    if bi is not None and (not isinstance(bi, list) or len(bi) != sched.num_layers or not all(_number(b) for b in bi)):
        raise UserError(f"schedule file {path}: 'block_influence' must be a list of {sched.num_layers} numbers")
    target = sched.meta.get("target")
    return {"path": str(path), "sparsity": list(sched.sparsity), "overall": sched.overall(),
            "target": float(target) if _number(target) else sched.overall(), "block_influence": bi,
            "kind": sched.meta.get("kind"), "router": sched.meta.get("router"), "model": sched.meta.get("model")}


def fit_schedules(folder: str | Path) -> dict[str, dict]:
    """{"static": ..., "learned": ...} for the searched schedules a fit folder holds."""
    folder = Path(folder)
    out = {}
    for router in ("static", "learned"):
        f = folder / f"search-{router}" / "schedule.json"
        if f.is_file():
            out[router] = load_schedule(f)
    return out


# ---------------------------------------------------------------------------------------- bench
def is_bench(obj) -> bool:
    rows = obj.get("rows") if isinstance(obj, dict) else None
    return isinstance(rows, list) and bool(rows) and isinstance(rows[0], dict) and "speedup" in rows[0]


def load_bench(path: str | Path) -> dict:
    obj = read_json(path, "bench file")
    if not is_bench(obj):
        raise UserError(f"bench file {path}: not written by `tokenskip bench --json/--out` (no 'rows' with 'speedup')")
    for i, row in enumerate(obj["rows"]):
        bad = [k for k in BENCH_FIELDS if k not in row or (k != "backend" and not _number(row[k]))]
        if bad:
            raise UserError(f"bench file {path}: row {i} lacks numeric {', '.join(repr(b) for b in bad)}")
    return obj


# -------------------------------------------------------------------------------------- explain
def is_explain(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == EXPLAIN_FORMAT


def check_explain(obj, where: str) -> dict:
    """An explain JSON: tokens [S], keep [L][S] of 0/1, blocks_run [S] = column sums of keep."""
    if not is_explain(obj):
        raise UserError(f"{where}: not written by `tokenskip explain --json` (format != {EXPLAIN_FORMAT!r})")
    tokens, keep, runs = obj.get("tokens"), obj.get("keep"), obj.get("blocks_run")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, dict) and "text" in t for t in tokens):
        raise UserError(f"{where}: 'tokens' must be a non-empty list of {{'id', 'text'}} objects")
    n = len(tokens)
    if not isinstance(keep, list) or not keep or not all(isinstance(k, list) and len(k) == n for k in keep):
        raise UserError(f"{where}: 'keep' must be one list of {n} 0/1 values per block")
    if any(v not in (0, 1) for k in keep for v in k):
        raise UserError(f"{where}: 'keep' holds values other than 0 and 1")
    if runs != [sum(col) for col in zip(*keep)]:
        raise UserError(f"{where}: 'blocks_run' does not equal the number of kept blocks per token")
    return obj


def load_explain(path: str | Path) -> dict:
    return check_explain(read_json(path, "explain file"), f"explain file {path}")


def classify_folder(folder: str | Path) -> dict[str, list[Path]]:
    """The JSON files in a folder that figures can use, by kind (others are ignored)."""
    found: dict[str, list[Path]] = {"quality": [], "bench": [], "explain": []}
    for f in sorted(Path(folder).glob("*.json")):
        try:
            obj = read_json(f)
        except UserError:
            continue
        if isinstance(obj, dict) and "figure" in obj:  # a figure's own data file (--plots into this folder)
            continue
        for kind, test in (("explain", is_explain), ("bench", is_bench), ("quality", is_quality)):
            if test(obj):
                found[kind].append(f)
                break
    return found
