"""`tokenskip fit`: FTP's alternating workflow as one call (paper section 4.3, method.md section 4).

1. search the schedule with the static router      -> DIR/search-static/schedule.json
2. train the learned router on it                  -> DIR/router-1/
3. re-search the schedule with the trained router  -> DIR/search-learned/schedule.json
   (the first schedule is in the initial population, so this never does worse on calibration)
4. a short final training on the new schedule, starting from the router of step 2 (no guide
   loss: the router has already left the static target behind)
                                                   -> DIR/routers/ (the result)
5. the one-selection router for long prompts (train/select.py, its own schedule shape, trained on
   the evidence spans of train-split long-prompt examples)
                                                   -> DIR/select/ (unless --no-select)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tokenskip.errors import UserError
from tokenskip.fileio import write_json_atomic
from tokenskip.precision import dtype_name, model_device, model_dtype
from tokenskip.schedule import Schedule, check_sparsity

from .distributed import SINGLE, Dist
from .search import SearchSettings, search_schedule
from .trainer import TrainSettings, train_router


@dataclass(frozen=True)
class Budget:
    seq_len: int
    cont_len: int
    calib_windows: int
    train_windows: int
    population: int
    generations: int
    steps: int
    batch_size: int
    re_population: int
    re_generations: int
    final_steps: int
    lr: float = 3e-3
    validate_every: int = 0  # the router that calibrates best ships (step 0, the start, included)
    sink_candidates: tuple[float, ...] = (0.0,)


# What the measurements behind docs/training.md section 7 chose:
# - calibration windows as long as the evaluation's prompts (a schedule searched on 128-token windows
#   lost to the uniform one on 512-token held-out windows), drawn across many articles;
# - the learned router starts as the static router, with extra attention sinks when they calibrate
#   better, and the router that calibrates best (deployment function) is the one that ships;
# - the centred soft top-k straight-through surrogate, over gates and keys.
# "small" is the pipeline's (minutes on 2 CPU cores for smollm2-135m); "default" is what docs report.
SINKS = (0.0, 0.005, 0.01, 0.02)
BUDGETS = {
    "tiny": Budget(seq_len=32, cont_len=8, calib_windows=2, train_windows=4, population=4, generations=1, steps=4,
                   batch_size=2, re_population=3, re_generations=1, final_steps=2, validate_every=2,
                   sink_candidates=(0.0, 0.05)),
    "small": Budget(seq_len=256, cont_len=32, calib_windows=8, train_windows=32, population=8, generations=2,
                    steps=20, batch_size=2, re_population=6, re_generations=1, final_steps=10, validate_every=10,
                    sink_candidates=SINKS),
    "default": Budget(seq_len=512, cont_len=64, calib_windows=8, train_windows=64, population=10, generations=4,
                      steps=60, batch_size=2, re_population=6, re_generations=2, final_steps=20, validate_every=15,
                      sink_candidates=SINKS),
}


@dataclass(frozen=True)
class FitSettings:
    """What a fit is, besides the model and sparsity (fit.json records it): the budget by name
    (BUDGETS), `batch_size` replacing its global training batch when given, the seed, the KV
    policy, and text files replacing the built-in calibration / training windows."""

    budget: str = "small"
    seed: int = 0
    kv_policy: str = "skip"
    calib_text: str | None = None
    train_text: str | None = None
    batch_size: int | None = None
    select: bool = True  # also train the one-selection router (kind `select`) into DIR/select

    def resolve(self, world: int) -> Budget:
        """The budget this fit runs, checked (one-line errors naming the flag) before any work."""
        if self.budget not in BUDGETS:
            raise UserError(f"--budget {self.budget}: choose from {', '.join(BUDGETS)}")
        b = BUDGETS[self.budget]
        if self.batch_size is not None:
            if self.batch_size < 1:
                raise UserError(f"--batch-size {self.batch_size}: must be >= 1")
            b = replace(b, batch_size=self.batch_size)
        if b.batch_size < world:  # fail before the search, not after it
            raise UserError(f"--batch-size {b.batch_size}: the global batch must hold at least one window per "
                            f"process ({world} processes); pass --batch-size {world} or more")
        return b


def run_fit(model_name: str, sparsity: float, out_dir: str | Path, settings: FitSettings = FitSettings(), *,
            lm=None, device: str = "cpu", dtype: str = "fp32", dist: Dist | None = None, progress: bool = True,
            log=print, resume: bool = True) -> Path:
    """search -> train -> re-search -> train. Returns the final routers folder (DIR/routers).

    `settings` say what is fitted (FitSettings); the rest how it runs. The model is `lm`, or loaded
    once in `dtype` on `device` (or `dist.device`: one GPU per process when launched by torchrun /
    accelerate); `dist` splits every stage over the processes and only rank 0 writes. Every
    process returns the same routers. `resume` reuses the stages a previous run finished."""
    from tokenskip.models import load_model

    from .common import windows

    dist = dist or SINGLE
    if not dist.is_main:
        log, progress = (lambda _msg: None), False

    check_sparsity(sparsity)
    b = settings.resolve(dist.world)
    seed, kv_policy = settings.seed, settings.kv_policy
    out = Path(out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    lm = lm or load_model(model_name, dtype=dtype, device=dist.device if dist.active else device)
    model = lm.model
    select = settings.select and _select_fits(model.config.num_hidden_layers, sparsity, log)
    calib = windows(lm.tokenizer, "calib", settings.calib_text, b.seq_len, b.calib_windows, seed)
    train_ids = windows(lm.tokenizer, "train", settings.train_text, b.seq_len, b.train_windows, seed)
    times = {}

    # 1. search with the static router
    from tokenskip.routers import StaticRouter

    s1 = SearchSettings(target=sparsity, population=b.population, generations=b.generations, seed=seed)
    r1 = dist.run_on_main(lambda: _done_search(out / "search-static" / "schedule.json", s1, model_name, kv_policy)
                          if resume else None)
    if r1 is None:
        r1 = search_schedule(model, StaticRouter(), calib, b.cont_len, s1, kv_policy, router_name="static",
                             progress=progress, extra_meta={"model": model_name}, dist=dist)
        if dist.is_main:
            write_json_atomic(out / "search-static" / "schedule.json", r1.schedule.to_json())
    times["search_static"] = time.time() - t0
    log(f"fit: static search done, fitness {r1.fitness:.4f} ({times['search_static']:.0f}s)")

    # 2. train the router
    ts = TrainSettings(steps=b.steps, lr=b.lr, batch_size=b.batch_size, seq_len=b.seq_len, cont_len=b.cont_len,
                       windows=b.train_windows, seed=seed, kv_policy=kv_policy, calib_windows=b.calib_windows,
                       validate_every=b.validate_every, sink_candidates=b.sink_candidates, ste_temperature=1.0,
                       ste_keys=kv_policy == "skip")
    router1 = train_router(model, r1.schedule, train_ids, calib, ts, out / "router-1", model_name=model_name,
                           progress=progress, resume=resume, dist=dist)
    times["train"] = time.time() - t0
    log(f"fit: router trained ({times['train']:.0f}s)")

    # 3. re-search with the trained router
    s2 = replace(s1, population=b.re_population, generations=b.re_generations, seed=seed + 1)
    r2 = dist.run_on_main(lambda: _done_search(out / "search-learned" / "schedule.json", s2, model_name, kv_policy)
                          if resume else None)
    if r2 is None:
        r2 = search_schedule(model, router1, calib, b.cont_len, s2, kv_policy, seeds=[r1.schedule],
                             router_name="learned", progress=progress,
                             extra_meta={"model": model_name, "router_from": str(out / "router-1")}, dist=dist)
        if dist.is_main:
            write_json_atomic(out / "search-learned" / "schedule.json", r2.schedule.to_json())
    times["search_learned"] = time.time() - t0
    log(f"fit: re-search with the learned router done, fitness {r2.fitness:.4f} ({times['search_learned']:.0f}s)")

    # 4. short final training on the new schedule
    final_dir = out / "routers"
    tf = replace(ts, steps=b.final_steps, lr=b.lr / 3, guide_weight=0.0, warmup=min(ts.warmup, b.final_steps),
                 validate_every=min(b.validate_every, b.final_steps))
    train_router(model, r2.schedule, train_ids, calib, tf, final_dir, model_name=model_name, init_router=router1,
                 progress=progress, resume=resume, dist=dist)
    times["final_train"] = time.time() - t0

    # 5. the learned one-selection router (long prompts): its own schedule shape, trained on the
    # evidence spans of train-split long-prompt examples (train/select.py); seconds to minutes
    if select:
        if dist.is_main:
            _fit_select(lm, model_name, sparsity, settings, out / "select", progress, log, resume)
        dist.barrier()
        times["select"] = time.time() - t0
    if dist.is_main:
        write_json_atomic(out / "fit.json", {"model": model_name, "sparsity": sparsity, "budget": asdict(b),
                                             "budget_name": settings.budget, "seed": seed, "kv_policy": kv_policy,
                                             "fitness": {"static_search": r1.fitness, "learned_search": r2.fitness},
                                             "seconds": {k: round(v, 1) for k, v in times.items()},
                                             "routers": str(final_dir),
                                             "select": str(out / "select") if select else None,
                                             "dtype": dtype_name(model_dtype(model)),
                                             "device": str(model_device(model)), "processes": dist.world})
    dist.barrier()
    log(f"fit: done in {time.time() - t0:.0f}s; routers in {final_dir}")
    return final_dir


def _select_fits(num_layers: int, sparsity: float, log) -> bool:
    """Whether the select router's schedule shape holds `sparsity` (its routed blocks carry the whole
    budget); said before any work when it does not, and the rest of the fit goes on without it."""
    from .select import candidate_layers

    try:
        candidate_layers(num_layers, sparsity)
    except UserError as e:
        log(f"fit: no select router at this sparsity ({e}); fitting the learned router only")
        return False
    return True


def _fit_select(lm, model_name: str, sparsity: float, settings: FitSettings, out: Path, progress: bool, log,
                resume: bool) -> None:
    from .select import done_before, settings_for, train_select

    sel = settings_for(settings.budget, sparsity, settings.seed, settings.kv_policy)
    if resume and done_before(out, sel, model_name):
        log(f"fit: reusing {out} (same model and settings)")
        return
    if settings.calib_text or settings.train_text:
        log("fit: the select router trains on long-prompt examples built from the built-in train split "
            "(--calib-text/--train-text feed the learned router only)")
    train_select(lm, out, sel, progress=progress, log=log)


def _done_search(path: Path, settings: SearchSettings, model_name: str, kv_policy: str):
    """A search this fit already finished (same settings): reuse it, so a rerun resumes."""
    from .search import SearchResult

    if not path.is_file():
        return None
    sched = Schedule.load(path)
    m = sched.meta
    if m.get("settings") != asdict(settings) or m.get("model") != model_name or m.get("kv_policy") != kv_policy:
        return None
    return SearchResult(schedule=sched, fitness=float(m.get("fitness", float("nan"))), history=m.get("history", []),
                        uniform_fitness=float(m.get("uniform_fitness", float("nan"))))


def static_schedule_of(fit_dir: str | Path) -> Schedule:
    return Schedule.load(Path(fit_dir) / "search-static" / "schedule.json")
