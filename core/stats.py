"""Paired bootstrap confidence intervals over evaluation windows.

Every method is scored on the same windows, so comparisons are paired: one bootstrap resample
draws window indices with replacement and applies them to every method at once. Windows (not
tokens) are the unit, because tokens of one window are strongly correlated. Percentile intervals,
a fixed number of resamples and a seeded generator, so a table is reproducible to the byte.
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def resample_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] window indices drawn with replacement (the same draws for every method)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_ci(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(values, idx: np.ndarray) -> tuple[float, float]:
    """CI of the mean of per-window values [N] (e.g. KL, top-1 agreement)."""
    v = np.asarray(values, dtype=np.float64)
    return percentile_ci(v[idx].mean(axis=1))


def ratio_ci(nll, dense_nll, idx: np.ndarray) -> tuple[float, float]:
    """CI of the perplexity ratio exp(mean nll - mean dense nll) from per-window mean NLLs [N]
    (windows score the same number of tokens, so the mean of window means is the token mean)."""
    a, b = np.asarray(nll, dtype=np.float64), np.asarray(dense_nll, dtype=np.float64)
    return percentile_ci(np.exp(a[idx].mean(axis=1) - b[idx].mean(axis=1)))


def diff_ci(a, b, idx: np.ndarray) -> tuple[float, float, float]:
    """(mean difference a - b, CI low, CI high) of paired per-window values."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = percentile_ci(d[idx].mean(axis=1))
    return float(d.mean()), lo, hi


def proportion_ci(correct, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Bootstrap CI of an accuracy from per-example 0/1 outcomes."""
    c = np.asarray(correct, dtype=np.float64)
    if c.size == 0:
        return math.nan, math.nan
    return mean_ci(c, resample_indices(c.size, n_boot, seed))
