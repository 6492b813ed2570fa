"""Figure 2: per-block sparsity, searched (static / learned router) vs uniform, with the block
influence scores the search started from (when schedule.json records them)."""

from __future__ import annotations

from pathlib import Path

from tokenskip.errors import UserError

from .common import METHOD_COLORS, new_figure
from .inputs import fit_schedules

SERIES_COLORS = {"static": METHOD_COLORS["static (searched)"], "learned": METHOD_COLORS["learned"],
                 "uniform": METHOD_COLORS["static (uniform)"]}


def schedule_data(fit_dir: str | Path, model: str | None = None) -> dict | None:
    """The searched schedules of a fit folder and the uniform schedule at the same target; None
    when the folder holds no searched schedule."""
    from tokenskip.schedule import Schedule

    found = fit_schedules(fit_dir)
    if not found:
        return None
    first = next(iter(found.values()))
    n = len(first["sparsity"])
    for name, s in found.items():
        if len(s["sparsity"]) != n:
            raise UserError(f"{s['path']}: {len(s['sparsity'])} blocks, but {first['path']} has {n}")
        if abs(s["target"] - first["target"]) > 1e-9:
            raise UserError(f"{s['path']}: target sparsity {s['target']} differs from {first['target']} "
                            f"in {first['path']}")
    target = first["target"]
    influence = next((s["block_influence"] for s in found.values() if s["block_influence"]), None)
    model = model or next((s["model"] for s in found.values() if s.get("model")), None)
    return {"figure": "schedule", "model": model, "target": target, "blocks": n,
            "searched": {name: s["sparsity"] for name, s in found.items()},
            "achieved": {name: s["overall"] for name, s in found.items()},
            "uniform": list(Schedule.uniform(n, target).sparsity),  # what the uniform baselines run
            "block_influence": influence, "sources": [s["path"] for s in found.values()]}


def draw_schedule(data: dict):
    n = data["blocks"]
    bi = data.get("block_influence")
    fig = new_figure(max(8.0, 0.3 * n + 3), 6.5 if bi else 4.2)
    if bi:
        ax, ax_bi = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    else:
        ax, ax_bi = fig.subplots(1, 1), None
    bars = [(f"searched, {name} router (mean {data['achieved'][name]:.3f})", name, vals)
            for name, vals in data["searched"].items()]
    bars.append((f"uniform (mean {data['target']:g}, outer blocks dense)", "uniform", data["uniform"]))
    width = 0.8 / len(bars)
    blocks = list(range(n))
    for j, (label, key, vals) in enumerate(bars):
        x = [b - 0.4 + width * (j + 0.5) for b in blocks]
        ax.bar(x, vals, width=width, color=SERIES_COLORS[key], label=label)
    ax.axhline(data["target"], color="black", ls=":", lw=1)
    ax.set_ylabel("sparsity (fraction of tokens skipping the block)")
    ax.set_ylim(0, min(1.0, max(max(v) for _, _, v in bars) * 1.15 + 0.02))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    if ax_bi is not None:
        (line,) = ax_bi.plot(blocks, bi, marker="o", ms=4, color="#444444", label="block influence")
        line.set_gid("block_influence")
        ax_bi.set_ylabel("block influence\n1 - cos(h_in, h_out)")
        ax_bi.grid(True, alpha=0.3)
        ax_bi.set_xlabel("block (decoder layer index)")
    else:
        ax.set_xlabel("block (decoder layer index)")
        ax.text(0.99, 0.97, "no block_influence in schedule.json (older search)", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="dimgray")
    (ax_bi or ax).set_xticks(blocks)
    (ax_bi or ax).tick_params(axis="x", labelsize=7)
    model = data.get("model") or "model"
    fig.suptitle(f"{model}: per-block sparsity schedule at overall sparsity {data['target']:g}", fontsize=11)
    return fig
