"""Genetic search of the per-block sparsity schedule (FTP section 4, method.md section 4).

A genome is the vector s_l of per-block sparsities, held as integers in units of the schedule's
resolution (1e-4) so the mean constraint is exact: sum(units) == round(target * N * 1e4) for every
individual, enforced by a repair step after crossover and mutation. Fitness is -KL(dense || routed)
on the continuation of calibration windows (never the evaluation split), with the static router
(first search) or a trained router (re-search). The initial population holds the uniform schedule,
so the search can only improve on it (elitism keeps the best individual every generation).

Settings (our choice; the paper gives none): population 16, 10 generations, tournament of 3,
uniform crossover, Gaussian mutation sigma 0.05 on 30% of the genes, 2 elites.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenskip.errors import UserError
from tokenskip.schedule import RESOLUTION, Schedule, check_sparsity

from .distributed import SINGLE, Dist

MAX_SPARSITY = 0.95


@dataclass
class SearchSettings:
    target: float
    population: int = 16
    generations: int = 10
    seed: int = 0
    dense_first: int = 1  # blocks kept at 0 (not searched) at each end
    dense_last: int = 1
    max_sparsity: float = MAX_SPARSITY
    sigma: float = 0.05  # mutation step, in sparsity units
    mutation_rate: float = 0.3  # probability that a gene mutates
    elite: int = 2
    tournament: int = 3

    def check(self) -> None:
        check_sparsity(self.target)
        if self.population < 2:
            raise UserError(f"--population {self.population}: must be at least 2")
        if self.generations < 0:
            raise UserError(f"--generations {self.generations}: must be >= 0")
        if self.dense_first < 0 or self.dense_last < 0:
            raise UserError("--dense-first/--dense-last must be >= 0")


@dataclass
class SearchResult:
    schedule: Schedule
    fitness: float  # best fitness (-KL on calibration data)
    uniform_fitness: float = float("nan")  # the uniform schedule's, for comparison
    history: list[dict] = field(default_factory=list)  # per generation: best, mean, evaluations


class Genome:
    """Integer-unit genomes with the exact-mean repair step."""

    def __init__(self, num_layers: int, settings: SearchSettings) -> None:
        self.n = num_layers
        free = np.ones(num_layers, dtype=bool)
        first, last = settings.dense_first, settings.dense_last
        if first + last >= num_layers:
            first = last = 0
        free[:first] = False
        free[num_layers - last:] = False
        self.free = free
        self.max_units = int(round(settings.max_sparsity * RESOLUTION))
        self.total = int(round(settings.target * num_layers * RESOLUTION))  # exact sum of units
        if self.total > int(free.sum()) * self.max_units:
            raise UserError(f"--sparsity {settings.target}: needs more than {settings.max_sparsity} on each of the "
                            f"{int(free.sum())} searchable blocks; choose a lower sparsity or fewer dense blocks")

    def repair(self, x: np.ndarray) -> np.ndarray:
        """Any real vector -> the nearest-in-spirit valid genome: fixed blocks 0, each gene in
        [0, max], sum exactly `total` units (water-filling, then largest-remainder rounding)."""
        x = np.where(self.free, np.clip(np.asarray(x, dtype=np.float64), 0.0, self.max_units), 0.0)
        for _ in range(100):
            gap = self.total - x.sum()
            if abs(gap) < 1e-9:
                break
            room = (self.max_units - x) if gap > 0 else x
            open_ = self.free & (room > 1e-12)
            share = gap / open_.sum()
            x = np.where(open_, np.clip(x + share, 0.0, self.max_units), x)
        units = np.floor(x + 1e-9).astype(np.int64)
        extra = self.total - int(units.sum())
        if extra > 0:  # largest remainders first, ties by block index (deterministic)
            rem = np.where(self.free & (units < self.max_units), x - units, -1.0)
            order = np.lexsort((np.arange(self.n), -rem))
            units[order[:extra]] += 1
        elif extra < 0:
            rem = np.where(self.free & (units > 0), x - units, 2.0)
            order = np.lexsort((np.arange(self.n), rem))
            units[order[:-extra]] -= 1
        assert int(units.sum()) == self.total and units.min() >= 0 and units.max() <= self.max_units
        return units

    def to_schedule(self, units: np.ndarray, meta: dict | None = None) -> Schedule:
        return Schedule(tuple(float(u) / RESOLUTION for u in units), meta=meta or {})

    def from_schedule(self, schedule: Schedule) -> np.ndarray:
        if schedule.num_layers != self.n:
            raise UserError(f"schedule has {schedule.num_layers} blocks but the model has {self.n}")
        return np.array([round(s * RESOLUTION) for s in schedule.sparsity], dtype=np.int64)


def genetic_search(num_layers: int, fitness: Callable[[Schedule], float], settings: SearchSettings,
                   seeds: list[Schedule] | None = None, progress: bool = True) -> SearchResult:
    """Maximise `fitness` over schedules with mean sparsity settings.target.

    `seeds` go into the initial population (repaired to the exact mean); the uniform schedule over
    the searchable blocks is always there. Deterministic for a given seed and fitness.
    """
    settings.check()
    g = Genome(num_layers, settings)
    rng = np.random.default_rng(settings.seed)
    scale = RESOLUTION  # sparsity -> units
    cache: dict[tuple, float] = {}

    def key(u: np.ndarray) -> tuple:
        return tuple(int(v) for v in u)

    uniform = g.repair(np.where(g.free, g.total / g.free.sum(), 0.0))
    pop: list[np.ndarray] = [uniform]
    for s in seeds or []:
        cand = g.repair(g.from_schedule(s).astype(np.float64))
        if key(cand) not in {key(p) for p in pop}:
            pop.append(cand)
    tries = 0
    while len(pop) < settings.population and tries < 100 * settings.population:
        tries += 1
        base = pop[int(rng.integers(len(pop)))] if len(pop) > 1 else uniform
        noise = rng.normal(0.0, 2 * settings.sigma * scale, size=num_layers)
        cand = g.repair(base + noise)
        if key(cand) not in {key(p) for p in pop}:
            pop.append(cand)

    total_evals = settings.population * (settings.generations + 1)
    bar = tqdm(total=total_evals, desc=f"search @{settings.target:g}", disable=not progress, leave=False)
    best_seen = [float("-inf")]

    def score(u: np.ndarray) -> float:
        k = key(u)
        if k not in cache:
            cache[k] = float(fitness(g.to_schedule(u)))
            best_seen[0] = max(best_seen[0], cache[k])
        bar.update(1)
        bar.set_postfix(best=f"{best_seen[0]:.4f}")
        return cache[k]

    history: list[dict] = []
    fits = [score(u) for u in pop]
    for gen in range(settings.generations + 1):
        order = sorted(range(len(pop)), key=lambda i: (-fits[i], i))
        pop, fits = [pop[i] for i in order], [fits[i] for i in order]
        history.append({"generation": gen, "best": fits[0], "mean": float(np.mean(fits)), "evaluations": len(cache)})
        if gen == settings.generations:
            break
        nxt = [p.copy() for p in pop[:settings.elite]]
        seen = {key(p) for p in nxt}
        attempts = 0
        while len(nxt) < settings.population and attempts < 50 * settings.population:
            attempts += 1

            def pick() -> np.ndarray:
                idx = rng.choice(len(pop), size=min(settings.tournament, len(pop)), replace=False)
                return pop[int(min(idx))]  # population is sorted: the lowest index is the fittest

            a, b = pick(), pick()
            take = rng.random(num_layers) < 0.5
            child = np.where(take, a, b).astype(np.float64)
            mutate = rng.random(num_layers) < settings.mutation_rate
            child = child + mutate * rng.normal(0.0, settings.sigma * scale, size=num_layers)
            child = g.repair(child)
            if key(child) in seen:
                continue
            seen.add(key(child))
            nxt.append(child)
        pop = nxt
        fits = [score(u) for u in pop]
    bar.close()
    best = g.to_schedule(pop[0])
    return SearchResult(schedule=best, fitness=fits[0], history=history, uniform_fitness=cache[key(uniform)])


# -- fitness on a routed model ------------------------------------------------------------------------

def kl_fitness(model, router, calib: torch.Tensor, cont_len: int, kv_policy: str, batch_size: int = 4,
               dist: Dist | None = None):
    """fitness(schedule) = -mean KL(dense || routed) on the calibration continuation.

    The dense reference is computed once here and reused by every evaluation of the run. With
    several processes each scores its share of the windows and the per-window KLs are gathered, so
    every process gets the same fitness (a collective call: all processes evaluate the same
    schedules in the same order, which the seeded GA guarantees).
    """
    from tokenskip.evaluate import dense_reference, evaluate
    from tokenskip.routed import RoutedModel
    from tokenskip.schedule import Schedule as _S

    dist = dist or SINGLE
    base = RoutedModel(model, _S.dense(model.config.num_hidden_layers), None, kv_policy=kv_policy)
    mine = calib[dist.share(len(calib))]  # [n,L] this process's share
    dense = dense_reference(base, mine, cont_len, batch_size, progress=False) if len(mine) else None

    def fitness(schedule: Schedule) -> float:
        routed = RoutedModel(model, schedule, router, kv_policy=kv_policy)
        return -dist.window_mean(len(calib), lambda sl: evaluate(routed, calib[sl], cont_len, dense, "search",
                                                                  batch_size, progress=False).per_window["kl"])

    return fitness


def heuristic_seeds(model, calib: torch.Tensor, settings: SearchSettings, batch_size: int = 4,
                    influence: list[float] | None = None) -> list[Schedule]:
    """Structured starting points near the best-known shape (outer two blocks dense, the budget on
    the middle), so a small population explores more than one neighbourhood: gentle rising and
    falling ramps with depth, a tent peaking at 2/3 depth, and sparsity proportional to each
    block's token redundancy sqrt(1 / Block Influence) on the calibration windows (FTP's "BI
    allocation")."""
    from .baselines import block_influence

    n = model.config.num_hidden_layers
    g = Genome(n, settings)
    mid = g.free.copy()
    if n > 8:
        mid[:2] = mid[n - 2:] = False  # same dense ends as Schedule.uniform
    mid &= g.free
    if not mid.any():
        return []
    x = np.linspace(0.0, 1.0, n)
    bi = np.array(influence if influence is not None else block_influence(model, calib, batch_size))
    shapes = (1.0 + x, 2.0 - x, 1.0 + np.minimum(x / (2 / 3), (1 - x) / (1 / 3)), np.sqrt(1.0 / np.maximum(bi, 1e-6)))
    out = []
    for w in shapes:
        w = np.where(mid, w, 0.0)
        out.append(g.to_schedule(g.repair(w / w.sum() * g.total)))
    return out


def search_schedule(model, router, calib: torch.Tensor, cont_len: int, settings: SearchSettings, kv_policy: str = "skip",
                    seeds: list[Schedule] | None = None, router_name: str = "static", batch_size: int = 4,
                    progress: bool = True, extra_meta: dict | None = None, dist: Dist | None = None) -> SearchResult:
    """Run the GA on a model; the result's schedule carries the search's settings and history.
    `dist` splits the calibration windows over processes; every process returns the same result."""
    from tokenskip.precision import model_device

    dist = dist or SINGLE
    progress = progress and dist.is_main
    calib = calib.to(model_device(model))
    router.to(device=model_device(model))  # a learned router runs beside the LLM, in fp32
    n = model.config.num_hidden_layers
    uniform_default = None
    try:  # the project's uniform baseline schedule (outer blocks dense) is a seed too
        uniform_default = Schedule.uniform(n, settings.target)
    except UserError:
        pass
    from .baselines import block_influence

    seeds = list(seeds or []) + ([uniform_default] if uniform_default is not None else [])
    mine = calib[dist.share(len(calib))]  # Block Influence per process, token-weighted mean over processes
    influence = dist.weighted_mean(block_influence(model, mine, batch_size) if len(mine) else [0.0] * n, mine.numel())
    seeds += heuristic_seeds(model, calib, settings, batch_size, influence)
    fit = kl_fitness(model, router, calib, cont_len, kv_policy, batch_size, dist)
    res = genetic_search(n, fit, settings, seeds=seeds, progress=progress)
    meta = {"kind": "searched", "target": settings.target, "router": router_name, "kv_policy": kv_policy,
            "fitness": res.fitness, "uniform_fitness": res.uniform_fitness,
            "fitness_metric": "-KL(dense||routed) on calibration continuation",
            "history": res.history, "settings": asdict(settings),
            "calibration": {"windows": int(calib.shape[0]), "seq_len": int(calib.shape[1]), "cont_len": cont_len},
            "block_influence": [round(float(b), 6) for b in influence],
            **(extra_meta or {})}
    res.schedule = Schedule(res.schedule.sparsity, meta=meta)
    return res
