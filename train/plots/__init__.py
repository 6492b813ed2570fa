"""Figures for `tokenskip report --plots OUT` and the pipeline (optional extra `plots`).

1. frontier: quality vs FLOPs for every method and sparsity (quality reports);
2. schedule: searched vs uniform per-block sparsity, with block influence (fit folders);
3. routing-map: which blocks each token of one prompt ran (`tokenskip explain --json`);
4. speed: measured speed-up and FLOP ideal vs sequence length (`tokenskip bench --json`).

Each is written as NAME.json (the exact numbers drawn) + NAME.png + NAME.svg, drawn only from the
JSON the commands wrote. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

from tokenskip.errors import UserError
from tokenskip.fileio import read_json

from .common import check_plots_out, plots_installed, write_figure
from .inputs import classify_folder, is_bench, is_explain, is_quality, load_explain, load_quality, quality_reports

__all__ = ["check_plots_out", "report_figures", "pipeline_figures", "plots_installed"]


def _fit_folders(paths) -> list[tuple[Path, str | None]]:
    """(folder holding search-*/schedule.json, its model) for fit folders and pipeline outputs."""
    out = []
    for p in map(Path, paths):
        for cand in (p, p / "fit"):
            if any((cand / f"search-{r}" / "schedule.json").is_file() for r in ("static", "learned")):
                meta = read_json(cand / "fit.json", "fit summary") if (cand / "fit.json").is_file() else {}
                out.append((cand, meta.get("model")))
                break
    return out


def _named(base: str, i: int, n: int, stem: str) -> str:
    return base if n == 1 else f"{base}-{i + 1}-{stem}"


def report_figures(out: str | Path, reports: list[tuple[str, dict]], paths=(), extra=()) -> list[Path]:
    """Draw every figure the inputs allow into `out`; returns the files written.

    reports: (where, quality report JSON) pairs the report command computed for fit folders; paths:
    its PATHS (fit folders give the schedule figure; other files and folders are read for quality,
    explain and bench JSON, as the table read them); extra:
    more JSON files (`tokenskip explain --json`, `tokenskip bench --json`, quality reports, sweeps).
    """
    check_plots_out(out)
    from .frontier import draw_frontier, frontier_data
    from .routing_map import draw_routing, routing_data
    from .schedule_fig import draw_schedule, schedule_data
    from .speed import draw_speed, speed_data

    checked = [r for where, obj in reports for r in quality_reports(obj, where)]
    explains, benches = [], []
    for p in map(Path, paths):
        if (p / "fit.json").is_file():  # a fit folder: its table came in `reports`
            continue
        if p.is_dir():
            found = classify_folder(p)
            explains += found["explain"]
            benches += found["bench"]
            checked += [r for f in found["quality"] for r in quality_reports(read_json(f), str(f))]
        elif p.is_file():  # a result file the table was made from
            checked += load_quality(p)
    for f in extra:
        obj = read_json(f, "--plot-json file")
        if is_explain(obj):
            explains.append(Path(f))
        elif is_bench(obj):
            benches.append(Path(f))
        elif is_quality(obj):
            checked += quality_reports(obj, str(f))
        else:
            raise UserError(f"--plot-json {f}: not an explain, bench or quality report JSON")
    written: list[Path] = []
    if checked:
        data = frontier_data(checked)
        written += write_figure(draw_frontier(data), data, out, "frontier")
    model = next((r["model"] for r in checked if r.get("model")), None)
    fits = _fit_folders(paths)
    for i, (folder, fit_model) in enumerate(fits):
        data = schedule_data(folder, fit_model or model)
        if data is not None:
            written += write_figure(draw_schedule(data), data, out, _named("schedule", i, len(fits), folder.name))
    for i, f in enumerate(explains):
        data = routing_data(load_explain(f), f"explain file {f}")
        written += write_figure(draw_routing(data), data, out, _named("routing-map", i, len(explains), f.stem))
    if benches:
        data = speed_data(benches)
        written += write_figure(draw_speed(data), data, out, "speed")
    return written


def pipeline_figures(out_dir: str | Path, stage: str) -> list[Path]:
    """The pipeline's figures into OUT/figures: after `quality` the frontier, the schedule and the
    routing map (quality.json, fit/, explain.json); after `speed` the speed figure (bench.json)."""
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    if stage == "quality":
        quality = out_dir / "quality.json"
        reports = [(str(quality), read_json(quality, "quality table"))] if quality.is_file() else []
        explain = [out_dir / "explain.json"] if (out_dir / "explain.json").is_file() else []
        return report_figures(figures, reports, [out_dir / "fit"], explain)
    if stage == "speed" and (out_dir / "bench.json").is_file():
        return report_figures(figures, [], [], [out_dir / "bench.json"])
    return []
