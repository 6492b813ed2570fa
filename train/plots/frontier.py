"""Figure 1: quality vs FLOPs frontier (KL to dense and perplexity ratio, with their CI bands).

One series per method family across every sparsity the reports hold (ShortGPT's "-9 blocks" and
"-12 blocks" rows are one series). Points, CIs and settings are copied from the quality reports'
rows; nothing is re-evaluated.
"""

from __future__ import annotations

import math
import statistics

from tokenskip.errors import UserError

from .common import color_for, new_figure, wants_log

SETTING_KEYS = ("seq_len", "cont_len", "windows", "kv_policy")


def family_of(method: str) -> str:
    """Series a row belongs to: the method name, except ShortGPT whose name carries its block count."""
    return "shortgpt" if method.startswith("shortgpt") else method


def _settings(report: dict, row: dict) -> dict:
    s = {k: report["settings"].get(k, row.get(k)) for k in SETTING_KEYS}
    return {k: v for k, v in s.items() if v is not None}


def frontier_data(reports: list[dict]) -> dict:
    """Checked reports (inputs.quality_reports) -> the numbers figure 1 draws."""
    models = sorted({r["model"] for r in reports if r.get("model")})
    if len(models) > 1:
        raise UserError(f"quality reports of different models ({', '.join(models)}): plot one model at a time")
    settings: dict | None = None
    dense_ppl, series, seen = None, {}, set()
    for rep in reports:
        for row in rep["rows"]:
            s = _settings(rep, row)
            if settings is None:
                settings = s
            elif any(k in s and k in settings and s[k] != settings[k] for k in SETTING_KEYS):
                raise UserError(f"{rep['where']}: settings {s} differ from {settings} of the other reports: "
                                "compare like with like")
            if row["method"] == "dense":
                if dense_ppl is not None and row.get("ppl") is not None and \
                        abs(dense_ppl - row["ppl"]) > 1e-6 * max(1.0, dense_ppl):
                    raise UserError(f"{rep['where']}: dense perplexity {row['ppl']:.4f} differs from {dense_ppl:.4f}: "
                                    "the reports were measured on different data")
                dense_ppl = row.get("ppl") if dense_ppl is None else dense_ppl
                continue
            target = rep.get("sparsity")
            target = float(target) if isinstance(target, (int, float)) else round(float(row.get("sparsity") or 0), 2)
            key = (row["method"], target, row["flops"], row["kl"])
            if key in seen:  # the same report given twice
                continue
            seen.add(key)
            point = {"method": row["method"], "target": target, "sparsity": row.get("sparsity"),
                     "flops": row["flops"], "kl": row["kl"], "kl_ci": row.get("kl_ci"),
                     "ppl_ratio": row["ppl_ratio"], "ppl_ratio_ci": row.get("ppl_ratio_ci"), "ppl": row.get("ppl"),
                     "source": rep["where"]}
            series.setdefault(family_of(row["method"]), []).append(point)
    if not series:
        raise UserError(f"{reports[0]['where'] if reports else 'quality reports'}: no method besides dense to plot")
    out = [{"family": fam, "label": "shortgpt (layer removal)" if fam == "shortgpt" else fam,
            "points": sorted(pts, key=lambda p: (p["flops"], p["target"]))} for fam, pts in series.items()]
    return {"figure": "frontier", "model": models[0] if models else None, "settings": settings or {},
            "dense_ppl": dense_ppl, "sources": sorted({r["where"] for r in reports}), "series": out}


def _subtitle(data: dict) -> str:
    s = data["settings"]
    parts = []
    if "windows" in s and "seq_len" in s:
        parts.append(f"{s['windows']} held-out windows of {s['seq_len']} tokens")
    if "cont_len" in s:
        parts.append(f"last {s['cont_len']} scored")
    if "kv_policy" in s:
        parts.append(f"kv_policy={s['kv_policy']}")
    has_ci = any(p.get("kl_ci") for ser in data["series"] for p in ser["points"])
    parts.append("bars/bands: 95% paired-bootstrap CI" if has_ci else "no CIs in the input")
    return ", ".join(parts)


def _panel(ax, data: dict, metric: str, log_ratio: float) -> None:
    values = []
    for i, ser in enumerate(data["series"]):
        pts = ser["points"]
        x = [p["flops"] for p in pts]
        y = [p[metric] for p in pts]
        color = color_for(ser["family"], i)
        (line,) = ax.plot(x, y, marker="o", ms=5, lw=1.5, color=color, label=ser["label"])
        line.set_gid(ser["family"])
        values += y
        ci = [p.get(f"{metric}_ci") for p in pts]
        if all(ci):
            lo, hi = [c[0] for c in ci], [c[1] for c in ci]
            bars = ax.vlines(x, lo, hi, color=color, lw=1.0)
            bars.set_gid(f"{ser['family']}:ci")
            if len(pts) > 1:
                band = ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
                band.set_gid(f"{ser['family']}:ci-band")
            values += lo + hi
    ax.axvline(1.0, color="black", ls=":", lw=1)
    if metric == "ppl_ratio":
        ax.axhline(1.0, color="black", ls=":", lw=1)
        (dense,) = ax.plot([1.0], [1.0], marker="*", ms=10, color="black", ls="", label="dense")
        dense.set_gid("dense")
        values.append(1.0)
    if wants_log(values, log_ratio):
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")  # plain numbers (not 10^x); minor ticks labelled at 2, 3 and 5 x 10^k
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""))
    ax.set_xlabel("FLOPs relative to dense (analytic, prompt blocks)")
    ax.grid(True, which="both", alpha=0.3)


def draw_frontier(data: dict):
    fig = new_figure(12, 5.2)
    ax_kl, ax_ppl = fig.subplots(1, 2)
    _panel(ax_kl, data, "kl", 10.0)
    ax_kl.set_ylabel("KL(dense ‖ method) on the continuation (nats/token)")
    ax_kl.set_title("KL to dense (lower is better)", pad=16)
    _panel(ax_ppl, data, "ppl_ratio", 3.0)
    ax_ppl.set_ylabel("continuation perplexity / dense perplexity")
    ax_ppl.set_title("perplexity ratio (lower is better)", pad=16)
    # which sparsity each column of points belongs to (above the frame, under the titles)
    targets: dict[float, list[float]] = {}
    for ser in data["series"]:
        for p in ser["points"]:
            targets.setdefault(p["target"], []).append(p["flops"])
    for ax in (ax_kl, ax_ppl):
        for t, xs in sorted(targets.items()):
            ax.text(statistics.median(xs), 1.005, f"s={t:g}", transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8, color="dimgray")
    ax_ppl.legend(loc="best", fontsize=8)
    model = data.get("model") or "model"
    fig.suptitle(f"{model}: quality vs FLOPs at overall sparsity "
                 f"{', '.join(f'{t:g}' for t in sorted(targets))}\n{_subtitle(data)}", fontsize=11)
    return fig
