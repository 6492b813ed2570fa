"""Figure 4: measured routed/dense prefill speed-up against sequence length, with the FLOP ideal,
for every backend (and batch, sparsity) in `tokenskip bench --json` files."""

from __future__ import annotations

from pathlib import Path

from .common import FALLBACK_COLORS, new_figure, wants_log
from .inputs import load_bench

BACKEND_COLORS = {"torch": "#1f77b4", "ort": "#ff7f0e", "trt": "#2ca02c"}


def _machine(m: dict | None) -> str:
    if not isinstance(m, dict):
        return ""
    if m.get("cuda"):
        return str(m["cuda"])
    threads = m.get("threads", "?")
    return f"{m.get('cpus', '?')}-core CPU, {threads} thread{'' if threads == 1 else 's'}"


def speed_data(paths: list[str | Path]) -> dict:
    """Rows of bench files -> one series per (backend, batch, sparsity, router, kv_policy)."""
    groups: dict[tuple, dict] = {}
    models, machines = [], []
    for path in paths:
        obj = load_bench(path)
        models.append(obj.get("model"))
        machines.append(_machine(obj.get("machine")))
        for r in obj["rows"]:
            key = (r["backend"], r["batch"], round(float(r["sparsity"]), 4), r.get("router"), r.get("kv_policy"),
                   obj.get("model"))
            g = groups.setdefault(key, {"backend": r["backend"], "batch": r["batch"], "sparsity": key[2],
                                        "router": r.get("router"), "kv_policy": r.get("kv_policy"),
                                        "model": obj.get("model"), "source": str(path), "points": []})
            g["points"].append({"seq": r["seq"], "speedup": r["speedup"], "ideal": r["ideal"],
                                "efficiency": r.get("efficiency"), "dense_ms": r.get("dense_ms"),
                                "routed_ms": r.get("routed_ms")})
    for g in groups.values():
        g["points"].sort(key=lambda p: p["seq"])
    uniq = lambda xs: sorted({x for x in xs if x})  # noqa: E731
    return {"figure": "speed", "models": uniq(models), "machines": uniq(machines),
            "sources": [str(p) for p in paths], "series": list(groups.values())}


def series_label(s: dict, several_models: bool) -> str:
    label = f"{s['backend']}, B={s['batch']}, s={s['sparsity']:g}"
    if s.get("router"):
        label += f", {s['router']}"
    return f"{s['model']}: {label}" if several_models else label


def draw_speed(data: dict):
    fig = new_figure(8.5, 5.2)
    ax = fig.subplots(1, 1)
    several = len(data["models"]) > 1
    seqs, ys = [], [1.0]
    ideals: dict[tuple, list[tuple[dict, str]]] = {}  # one dashed line per distinct ideal curve
    colors_used: dict[str, int] = {}
    for i, s in enumerate(data["series"]):
        base = BACKEND_COLORS.get(s["backend"], FALLBACK_COLORS[i % len(FALLBACK_COLORS)])
        n = colors_used.get(base, 0)
        colors_used[base] = n + 1
        color = base if n == 0 else FALLBACK_COLORS[(i + n) % len(FALLBACK_COLORS)]
        x = [p["seq"] for p in s["points"]]
        label = series_label(s, several)
        (m,) = ax.plot(x, [p["speedup"] for p in s["points"]], marker="o", color=color, label=f"{label}: measured")
        m.set_gid(f"{label}:measured")
        key = tuple((p["seq"], round(p["ideal"], 6)) for p in s["points"])
        ideals.setdefault(key, []).append((s, color))
        seqs += x
        ys += [p["speedup"] for p in s["points"]] + [p["ideal"] for p in s["points"]]
    for key, members in ideals.items():
        # the FLOP ideal depends on the schedule and S, not the backend: backends share one line
        s, color = members[0]
        if len(members) > 1:
            color = "#444444"
        backends = ", ".join(sorted({m["backend"] for m, _ in members}))
        label = f"FLOP ideal, s={s['sparsity']:g}" + (f", {s['router']}" if s.get("router") else "") + f" ({backends})"
        (line,) = ax.plot([k[0] for k in key], [k[1] for k in key], ls="--", marker="x", color=color, label=label)
        line.set_gid(f"ideal:{label}")
    ax.axhline(1.0, color="black", ls=":", lw=1, label="dense (1x)")
    if wants_log(seqs, 4.0):
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(seqs)))
    ax.set_xticklabels([str(v) for v in sorted(set(seqs))])
    ax.set_ylim(0, max(ys) * 1.12)
    ax.set_xlabel("prompt length S (tokens)")
    ax.set_ylabel("prefill speed-up, dense time / routed time (x)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    where = "; ".join(data["machines"]) or "unknown machine"
    fig.suptitle(f"{', '.join(data['models']) or 'model'}: routed vs dense prefill speed-up ({where})\n"
                 "median of alternating runs; ideal = dense FLOPs / routed FLOPs", fontsize=10)
    return fig
