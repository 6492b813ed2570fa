"""What every figure shares: the `plots` extra check, the look, and writing data + PNG + SVG together.

A figure is always written as three files with one stem: NAME.json (the exact numbers drawn),
NAME.png and NAME.svg. The drawing functions take only that JSON-able dict, so the picture and
the data beside it cannot disagree. Figures are plain `matplotlib.figure.Figure` objects (no
pyplot state), so tests can inspect their Axes and many figures can be drawn in one process.
"""

from __future__ import annotations

import math
from pathlib import Path

from tokenskip.errors import UserError
from tokenskip.fileio import atomic_path, write_json_atomic

# One colour per method family, the same in every figure.
METHOD_COLORS = {
    "learned": "#d62728",
    "static (searched)": "#1f77b4",
    "static (uniform)": "#17becf",
    "random": "#7f7f7f",
    "shortgpt": "#2ca02c",
    "dense": "#000000",
}
FALLBACK_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#ff7f0e")


def require_matplotlib():
    """Import matplotlib (headless) or fail with one line naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise missing_extra("drawing figures (matplotlib)") from None
    return matplotlib


def plots_installed() -> bool:
    """Whether the `plots` extra is importable (the pipeline draws its figures only then)."""
    try:
        require_matplotlib()
        import rich  # noqa: F401
    except (UserError, ImportError):
        return False
    return True


def new_figure(width: float, height: float):
    """A pyplot-free Figure (no global state, no GUI backend)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def color_for(family: str, index: int) -> str:
    for key, color in METHOD_COLORS.items():
        if family.startswith(key):
            return color
    return FALLBACK_COLORS[index % len(FALLBACK_COLORS)]


def wants_log(values: list[float], ratio: float = 20.0) -> bool:
    """Log scale when the positive values span more than `ratio` (and none is <= 0)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals or min(vals) <= 0:
        return False
    return max(vals) / min(vals) >= ratio


def check_plots_out(out_dir: str | Path) -> Path:
    """The extra is installed and the --plots folder can be one (checked before any work)."""
    require_matplotlib()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--plots {out_dir}: exists and is not a folder")
    return out


def write_figure(fig, data: dict, out_dir: str | Path, name: str) -> list[Path]:
    """NAME.json (the data drawn), NAME.png and NAME.svg in out_dir, each written atomically."""
    out = check_plots_out(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.json"]
    write_json_atomic(written[0], data)
    for ext in ("png", "svg"):
        path = out / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        written.append(path)
    return written


def missing_extra(what: str) -> UserError:
    """The one-line error for a missing `plots` extra, naming what needed it."""
    return UserError(f"{what} needs the `plots` extra: pip install 'tokenskip[plots]'")
