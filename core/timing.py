"""The one benchmarking toolkit: one percentile, one timer, one alternation loop.

Every tokenskip benchmark (`tokenskip bench`, the GPU benchmark, `bench-serve`, `bench-export`,
the plugin kernels) times with these, so "median", "p90" and "alternating after warm-up" mean the
same thing in every table (docs/benchmarks.md, Speed).

Why alternate: the machines are shared and noisy. Timing all of A, then all of B lets a slow
minute (another job, a thermal step, a page-cache flush) land on one side only, and the ratio
A / B then measures the machine, not the method. Running A and B in turn, with the order rotating
every round (A B, B A, A B, ...), spreads any drift over both sides alike, so the ratio of their
medians is a side-by-side measurement even when absolute times wander. Warm-up rounds come first
and are never recorded: first calls pay for lazy allocation, kernel autotuning, graph capture and
cold caches, which are not what a benchmark means to measure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Call = Callable[[], object]
TimerFn = Callable[[Call], float]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, q in 0-100, by linear interpolation between the closest ranks.

    This is numpy's default (`np.percentile(values, q)`, method "linear"): sorted values
    v[0..n-1] sit at ranks 0..n-1 and the percentile is read at rank (n - 1) * q / 100,
    interpolated between its two neighbours. So percentile(v, 50) is the usual median (the mean
    of the two middle values for an even count) and p90 of 8 samples lies 30% of the way from the
    7th to the 8th smallest. No values give nan (e.g. no inter-token gaps when one token was
    generated): a table shows "nan" rather than a made-up number."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be in 0-100, got {q}")
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    """percentile(values, 50)."""
    return percentile(values, 50)


def stopwatch() -> Callable[[], float]:
    """Start a clock: the returned function gives the seconds since this call (time.perf_counter).
    For stage times and event stamps (first token, end of a request) rather than one call."""
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


class Timer:
    """Seconds one call takes. Two clocks, one interface (`timer(fn) -> seconds`):

    - wall clock (time.perf_counter), with `sync` called before and after the call when given
      (`torch.cuda.synchronize` on a GPU: CUDA launches return at once, so without draining the
      device the clock would time the launch, not the work);
    - `cuda_events=True`: a CUDA event recorded on the current stream before and after, and their
      elapsed time. This is GPU time between two marks with no host round trip in it, which is
      what microsecond kernels need (a synchronize costs about as much as they do).
    """

    def __init__(self, sync: Callable[[], None] | None = None, cuda_events: bool = False) -> None:
        if sync is not None and cuda_events:
            raise ValueError("Timer: give sync or cuda_events, not both (events need no host sync)")
        self.sync = sync
        self.cuda_events = cuda_events

    @classmethod
    def for_device(cls, device: str) -> Timer:
        """CUDA events on a CUDA device, the plain wall clock elsewhere."""
        return cls(cuda_events=str(device).startswith("cuda"))

    def measure(self, fn: Call) -> tuple[object, float]:
        """(fn's result, seconds it took)."""
        if self.cuda_events:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1e3
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        out = fn()
        if self.sync is not None:
            self.sync()
        return out, time.perf_counter() - t0

    def __call__(self, fn: Call) -> float:
        return self.measure(fn)[1]


def self_timed(fn: Call) -> float:
    """A timer for sides that time themselves: fn does untimed setup (a prefill, a graph capture),
    times the part that matters and returns its seconds."""
    return float(fn())


def round_order(names: Sequence[str], r: int) -> list[str]:
    """The order of round r: names rotated left by r (A B C, B C A, C A B, A B C, ...). Over any
    len(names) consecutive rounds every side runs in every position once; for two sides this is
    A B, B A, A B, ... (ABBA)."""
    k = r % len(names)
    return list(names[k:]) + list(names[:k])


@dataclass(frozen=True)
class Summary:
    """Summary of one side's samples (seconds)."""

    n: int
    median: float
    p90: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(n=len(values), median=median(values), p90=percentile(values, 90),
                   mean=float(np.mean(values)) if len(values) else float("nan"))


@dataclass
class Alternation:
    """Per-side samples (seconds, in the order they were taken) of one `alternate` run."""

    samples: dict[str, list[float]]

    def summary(self) -> dict[str, Summary]:
        return {n: Summary.of(v) for n, v in self.samples.items()}

    def median(self, name: str) -> float:
        return median(self.samples[name])

    def p90(self, name: str) -> float:
        return percentile(self.samples[name], 90)


def alternate(fns: dict[str, Call], repeats: int, warmup: int, timer: TimerFn | None = None) -> Alternation:
    """Time every side `repeats` times, alternating, after `warmup` untimed rounds.

    Each warm-up round calls every side once (not recorded). Then round r = 0..repeats-1 times
    every side once, in `round_order(names, r)`: the rotation puts each side first, second, ...
    equally often, so drift on a shared machine hits all sides alike (module docstring).
    `timer(fn) -> seconds` defaults to the plain wall clock; pass `Timer(torch.cuda.synchronize)`
    or `Timer.for_device(...)` on a GPU, or `self_timed` for sides that time themselves."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"alternate: repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not fns:
        raise ValueError("alternate: no sides to time")
    timer = timer or Timer()
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in round_order(names, r):
            samples[n].append(timer(fns[n]))
    return Alternation(samples)
