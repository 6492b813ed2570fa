"""`tokenskip search | train | fit | report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tokenskip.errors import UserError, parse_list
from tokenskip.evaluate_cli import longctx_choice, longctx_options, quality_options
from tokenskip.models import DEFAULT_MODEL
from tokenskip.precision import device_options

_model = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                      help="Built-in name, local Hugging Face folder, or Hub id.")
_kv = click.option("--kv-policy", type=click.Choice(["skip", "dense"]), default="skip", show_default=True,
                   help="What skipped tokens are for attention.")
_seed = click.option("--seed", default=0, show_default=True, help="Seed: same seed, same bytes on CPU.")
_calib_text = click.option("--calib-text", type=click.Path(), default=None,
                           help="Plain text file for calibration instead of the built-in calib split.")


def _check_out(out: str) -> Path:
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    return p


@click.command("search")
@_model
@click.option("--sparsity", type=float, required=True, help="Overall target sparsity (mean of s_l), in [0, 1).")
@click.option("--out", "out_dir", type=click.Path(), required=True, help="Folder for schedule.json.")
@click.option("--router", type=click.Choice(["static", "learned"]), default="static", show_default=True,
              help="Router used for fitness (learned needs --routers).")
@click.option("--routers", "routers_dir", type=click.Path(), default=None,
              help="Folder written by `tokenskip train` (for --router learned).")
@click.option("--population", default=16, show_default=True)
@click.option("--generations", default=10, show_default=True)
@click.option("--windows", default=8, show_default=True, help="Calibration windows for the fitness.")
@click.option("--seq-len", default=512, show_default=True, help="Window length L.")
@click.option("--cont-len", default=64, show_default=True, help="Continuation length c (scored, never routed).")
@click.option("--dense-first", default=1, show_default=True, help="Blocks at the start kept dense (not searched).")
@click.option("--dense-last", default=1, show_default=True, help="Blocks at the end kept dense (not searched).")
@click.option("--init", "init_schedule", type=click.Path(), default=None,
              help="A schedule.json to put in the initial population (e.g. the previous search's).")
@_kv
@_seed
@_calib_text
@click.option("--batch-size", default=4, show_default=True)
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print the schedule JSON instead of a summary.")
def search(model, sparsity, out_dir, router, routers_dir, population, generations, windows, seq_len, cont_len,
           dense_first, dense_last, init_schedule, kv_policy, seed, calib_text, batch_size, device, dtype, as_json):
    """Genetic search of the per-block sparsity schedule, mean sparsity = --sparsity.

    Fitness is -KL(dense || routed) on the continuation of calibration windows (never the
    evaluation split). Writes OUT/schedule.json (per-block sparsities, fitness history, settings).

    \b
    Examples:
      tokenskip search --sparsity 0.3 --out out/search
      tokenskip search --sparsity 0.3 --router learned --routers out/train --out out/search2 \\
          --init out/search/schedule.json
      tokenskip search --sparsity 0.3 --out out/search --device cuda --dtype bf16
      torchrun --nproc_per_node 8 -m tokenskip search --sparsity 0.3 --out out/search --device cuda --dtype bf16
    """
    from tokenskip.evaluate_cli import check_lengths
    from tokenskip.fileio import write_json_atomic
    from tokenskip.models import load_model
    from tokenskip.routers import StaticRouter
    from tokenskip.schedule import Schedule, check_sparsity

    from .common import deterministic, windows as split_windows
    from .distributed import init_distributed
    from .search import SearchSettings, search_schedule

    check_sparsity(sparsity)
    check_lengths(seq_len, cont_len)
    out = _check_out(out_dir)
    settings = SearchSettings(target=sparsity, population=population, generations=generations, seed=seed,
                              dense_first=dense_first, dense_last=dense_last)
    settings.check()
    if windows < 1:
        raise UserError(f"--windows {windows}: must be >= 1")
    if router == "learned" and not routers_dir:
        raise UserError("--router learned needs --routers DIR (a folder written by `tokenskip train`)")
    dist = init_distributed(device)
    deterministic(seed)
    lm = load_model(model, dtype=dtype, device=dist.device)
    n = lm.model.config.num_hidden_layers
    seeds = [Schedule.load(init_schedule, n)] if init_schedule else []
    module = StaticRouter()
    if router == "learned":
        from tokenskip.config import check_matches_model, load_routing

        cfg, module = load_routing(routers_dir)
        check_matches_model(cfg, lm.model, f"--routers {routers_dir}")
        if cfg.router != "learned":
            raise UserError(f"--routers {routers_dir}: holds a {cfg.router} router, not a learned one")
    calib = split_windows(lm.tokenizer, "calib", calib_text, seq_len, windows, seed)
    res = search_schedule(lm.model, module, calib, cont_len, settings, kv_policy, seeds=seeds, router_name=router,
                          batch_size=batch_size, progress=not as_json, dist=dist,
                          extra_meta={"model": model, "dtype": dtype,
                                      **({"routers": str(routers_dir)} if routers_dir else {})})
    obj = res.schedule.to_json()
    if not dist.is_main:
        return
    write_json_atomic(out / "schedule.json", obj)
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True))
    else:
        click.echo(f"best fitness (-KL on calibration) {res.fitness:.5f}; uniform schedule {res.uniform_fitness:.5f}")
        click.echo(f"schedule {res.schedule.describe()}")
        click.echo(f"wrote {out / 'schedule.json'}")


@click.command("train")
@_model
@click.option("--schedule", "schedule_file", type=click.Path(), required=True,
              help="Per-block sparsity JSON (from `tokenskip search`).")
@click.option("--out", "out_dir", type=click.Path(), required=True,
              help="Routers folder to write (tokenskip.json + router.safetensors; checkpoint/ inside).")
@click.option("--steps", default=200, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--cont-len", default=32, show_default=True, help="Continuation length c (distilled, never routed).")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--windows", default=64, show_default=True, help="Training windows (the data order cycles over them).")
@click.option("--checkpoint-every", default=25, show_default=True)
@click.option("--init", "init_routers", type=click.Path(), default=None,
              help="Start from this routers folder's learned router instead of a fresh one.")
@click.option("--guide-weight", default=1.0, show_default=True, help="Guide-loss weight at step 0 (decays to 0).")
@click.option("--score-window", default=64, show_default=True,
              help="Query rows of the attention-score feature the learned router reads (saved with the router).")
@click.option("--validate-every", default=0, show_default=True,
              help="Every N steps, KL to dense on the calibration windows as deployment computes it; the router "
                   "that validates best is written (0: the last one).")
@click.option("--init-router", "init_router", type=click.Choice(["static", "random"]), default="static",
              show_default=True, help="A fresh router starts as the static router (exactly) or at random.")
@click.option("--sink-candidates", default="0", show_default=True,
              help="Comma list of extra attention-sink fractions tried for the static start (with --validate-every: "
                   "the one with the lowest calibration KL starts training), e.g. 0,0.005,0.01,0.02.")
@click.option("--ste-keys/--no-ste-keys", default=False, show_default=True,
              help="kv_policy=skip: a straight-through gradient over the key mask as well.")
@click.option("--ste-temperature", default=0.0, show_default=True,
              help="0: straight-through gradient of sigmoid(logit); T > 0: of a sigmoid centred on the top-k "
                   "threshold with temperature T (docs/training.md).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from OUT/checkpoint if it exists (same options required).")
@click.option("--train-text", type=click.Path(), default=None,
              help="Plain text file to train on instead of the built-in train split.")
@_kv
@_seed
@_calib_text
@device_options
def train(model, schedule_file, out_dir, steps, lr, seq_len, cont_len, batch_size, windows, checkpoint_every,
          init_routers, guide_weight, score_window, validate_every, init_router, sink_candidates, ste_keys,
          ste_temperature, resume,
          train_text, kv_policy, seed, calib_text, device, dtype):
    """Train the shared FTP router with the LLM frozen.

    Loss = guide (BCE to the static router's masks, weight decaying to 0) + sparsity + KL to dense
    on the continuation. Checkpoints to OUT/checkpoint every --checkpoint-every steps; rerunning
    the same command resumes and ends with the same bytes as an uninterrupted run.

    Under torchrun / accelerate launch, each step's --batch-size windows are split over the
    processes and the router's gradients are summed (docs/gpu.md).

    \b
    Examples:
      tokenskip train --schedule out/search/schedule.json --out out/train --steps 200
      tokenskip train --schedule out/search/schedule.json --out out/train --device cuda --dtype bf16
      torchrun --nproc_per_node 8 -m tokenskip train --schedule out/search/schedule.json --out out/train \\
          --batch-size 16 --device cuda --dtype bf16
      tokenskip eval --routers out/train
    """
    from tokenskip.evaluate_cli import check_lengths
    from tokenskip.models import load_model
    from tokenskip.schedule import Schedule

    from .common import deterministic, windows as split_windows
    from .distributed import init_distributed
    from .trainer import TrainSettings, train_router

    check_lengths(seq_len, cont_len)
    out = _check_out(out_dir)
    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, cont_len=cont_len,
                             windows=windows, seed=seed, kv_policy=kv_policy, checkpoint_every=checkpoint_every,
                             guide_weight=guide_weight, ste_temperature=ste_temperature, validate_every=validate_every,
                             score_window=score_window, ste_keys=ste_keys, init=init_router,
                             sink_candidates=tuple(parse_list(sink_candidates, float, "--sink-candidates")))
    settings.check()
    dist = init_distributed(device)
    deterministic(seed)
    lm = load_model(model, dtype=dtype, device=dist.device)
    n = lm.model.config.num_hidden_layers
    sched = Schedule.load(schedule_file, n)
    init = None
    if init_routers:
        from tokenskip.config import check_matches_model, load_routing

        cfg, init = load_routing(init_routers)
        check_matches_model(cfg, lm.model, f"--init {init_routers}")
        if cfg.router != "learned":
            raise UserError(f"--init {init_routers}: holds a {cfg.router} router, not a learned one")
    calib = split_windows(lm.tokenizer, "calib", calib_text, seq_len, settings.calib_windows, seed)
    ids = split_windows(lm.tokenizer, "train", train_text, seq_len, windows, seed)
    try:
        train_router(lm.model, sched, ids, calib, settings, out, model_name=model, resume=resume, init_router=init,
                     dist=dist)
    except KeyboardInterrupt:
        if dist.is_main:
            click.echo(f"\ninterrupted; rerun the same command to resume from {out / 'checkpoint'}", err=True)
        sys.exit(130)
    if dist.is_main:
        click.echo(f"wrote {out / 'tokenskip.json'} and {out / 'router.safetensors'}")


@click.command("train-select")
@_model
@click.option("--sparsity", default=0.3, show_default=True,
              help="Overall sparsity; the router runs gemfilter's schedule shape (select_after) at it.")
@click.option("--out", "out_dir", type=click.Path(), required=True,
              help="Routers folder to write (tokenskip.json + router.safetensors + select.json).")
@click.option("--examples", default=24, show_default=True,
              help="Training examples per task and length (train split); validation: a third of it (calib split).")
@click.option("--lengths", default="256,512,1024", show_default=True, help="Prompt lengths of the training examples.")
@click.option("--tasks", default="needle,kv_lookup,article_qa", show_default=True,
              help="Long-prompt tasks the training examples come from.")
@click.option("--steps", default=150, show_default=True, help="Adam steps over all the examples (full batch).")
@click.option("--lr", default=0.05, show_default=True)
@click.option("--select-layer", type=int, default=None,
              help="First routed block: blocks before it run dense, the last of them is read for the selection "
                   "[default: try half the blocks and 0.27 of them (docs/training.md 8.7)]. "
                   "Earlier leaves more blocks to share --sparsity.")
@click.option("--losses", default="listwise,cut", show_default=True,
              help="Losses fitted at each depth (comma list): listwise (average label probability) and cut "
                   "(at the top-k cut); the candidate keeping the most validation answers, then the lowest "
                   "calibration KL, ships (docs/training.md 8.9).")
@click.option("--search-generations", default=5, show_default=True,
              help="Genetic search of the per-block sparsities after the selection block, with the chosen "
                   "router (0: the flat schedule ships); the searched one ships only with lower calibration KL "
                   "and as many validation answers (docs/training.md 8.11).")
@click.option("--search-population", default=12, show_default=True, help="Schedules per generation of that search.")
@click.option("--search-windows", default=12, show_default=True,
              help="Calib-split windows (of 512 tokens) the search's fitness reads.")
@_kv
@_seed
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print the fit's record (select.json) as JSON.")
def train_select_cmd(model, sparsity, out_dir, examples, lengths, tasks, steps, lr, select_layer, losses,
                     search_generations, search_population, search_windows, kv_policy, seed, device, dtype, as_json):
    """Train the learned one-selection router (kind `select`): gemfilter's schedule and attention
    table, with a learned scoring of it fitted to where the answers of long-prompt questions sit
    (the answer's tokens in the evidence and the two before them; examples built from the train
    split, the evaluation uses the eval split and the news corpus). Runs the dense part of the model
    once per example, then fits in seconds.

    \b
    Examples:
      tokenskip train-select --sparsity 0.3 --out out/select
      tokenskip train-select --sparsity 0.4 --examples 16 --search-generations 0 --out out/select-flat
      tokenskip longctx --sparsity 0.3 --methods gemfilter --routers out/select --lengths 512,1024
      tokenskip export --routers out/select --out out/export-select
    """
    from tokenskip.models import load_model

    from .select import SelectSettings, train_select

    out = _check_out(out_dir)
    settings = SelectSettings(sparsity=sparsity, examples=examples, lengths=tuple(parse_list(lengths, int, "--lengths")),
                              tasks=tuple(parse_list(tasks, str, "--tasks")), steps=steps, lr=lr, seed=seed,
                              kv_policy=kv_policy, select_layer=select_layer,
                              losses=tuple(parse_list(losses, str, "--losses")),
                              search_generations=search_generations, search_population=search_population,
                              search_windows=search_windows)
    settings.check()  # bad flags fail before the model loads (the block count is checked after)
    lm = load_model(model, dtype=dtype, device=device)
    record = train_select(lm, out, settings, progress=not as_json, log=(lambda m: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(record, indent=2))


@click.command("fit")
@_model
@click.option("--sparsity", type=float, required=True, help="Overall target sparsity, in [0, 1).")
@click.option("--out", "out_dir", type=click.Path(), required=True, help="Folder for every stage's output.")
@click.option("--budget", type=click.Choice(["tiny", "small", "default"]), default="small", show_default=True,
              help="Compute budget (small: a few minutes on 2 CPU cores for smollm2-135m).")
@_kv
@_seed
@_calib_text
@click.option("--train-text", type=click.Path(), default=None, help="Plain text file to train on.")
@click.option("--batch-size", type=int, default=None,
              help="Global training batch instead of the budget's (2); at least the number of processes.")
@click.option("--select/--no-select", default=True, show_default=True,
              help="Also train the one-selection router for long prompts (kind `select`) into OUT/select.")
@device_options
def fit(model, sparsity, out_dir, budget, kv_policy, seed, calib_text, train_text, batch_size, select, device, dtype):
    """search (static router) -> train -> re-search (learned router) -> short final train; then the
    select router (long prompts: what a question at the end needs, wherever it sits).

    Writes OUT/search-static, OUT/router-1, OUT/search-learned, the final OUT/routers and OUT/select
    (as `tokenskip train-select` at the budget's size; skipped, with a message, where its schedule
    cannot hold the sparsity).
    Under torchrun / accelerate launch every stage is split over the processes (docs/gpu.md).

    \b
    Examples:
      tokenskip fit --sparsity 0.3 --out out/fit
      tokenskip fit --sparsity 0.3 --out out/fit --device cuda --dtype bf16
      accelerate launch --multi_gpu --num_processes 8 -m tokenskip fit --sparsity 0.3 --out out/fit \\
          --batch-size 8 --device cuda --dtype bf16
      tokenskip eval --routers out/fit/routers
      tokenskip longctx --sparsity 0.3 --methods gemfilter --routers out/fit/select
    """
    from tokenskip.schedule import check_sparsity

    from .common import deterministic
    from .distributed import init_distributed
    from .fit import FitSettings, run_fit

    check_sparsity(sparsity)
    _check_out(out_dir)
    dist = init_distributed(device)
    deterministic(seed)
    settings = FitSettings(budget=budget, seed=seed, kv_policy=kv_policy, calib_text=calib_text, train_text=train_text,
                           batch_size=batch_size, select=select)
    final = run_fit(model, sparsity, out_dir, settings, log=lambda m: click.echo(m, err=True), device=device,
                    dtype=dtype, dist=dist)
    if dist.is_main:
        click.echo(str(final))


@click.command("report")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a Markdown table.")
@click.option("--out", "out_file", type=click.Path(), default=None, help="Also write the rows as JSON here.")
@click.option("--model", default=None, help="Model for `fit` folders (default: the one they were fitted on).")
@click.option("--seq-len", default=512, show_default=True)
@click.option("--cont-len", default=64, show_default=True)
@quality_options(domains="eval,news", free_run=0)
@longctx_options(tasks="needle,article_qa", lengths="512,1024", examples=24)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--tasks", default=None, help="Multiple-choice tasks for fit folders (comma list or `default`).")
@click.option("--task-examples", default=100, show_default=True)
@click.option("--text", "eval_text", type=click.Path(), default=None, help="Text file instead of the built-in domains.")
@click.option("--calib-text", type=click.Path(), default=None, help="Calibration text (ShortGPT block influence).")
@click.option("--plots", "plots_out", type=click.Path(), default=None,
              help="Also draw the figures (PNG + SVG + the JSON drawn) into this folder (extra `plots`).")
@click.option("--plot-json", "plot_json", type=click.Path(), multiple=True,
              help="More JSON for --plots: `tokenskip bench --out` / `tokenskip explain --out` files, sweeps.")
@_seed
@device_options
def report(paths, as_json, out_file, model, seq_len, cont_len, windows, domains, free_run, longctx, longctx_lengths,
           longctx_examples, no_longctx, batch_size, tasks, task_examples, eval_text, calib_text, plots_out, plot_json,
           seed, device, dtype):
    """Markdown table comparing methods at equal FLOPs.

    PATHS are result files written by `tokenskip eval --out FILE` (or folders of them), or folders
    written by `tokenskip fit`: those are evaluated here against every baseline (dense, learned,
    static searched/uniform, random, ShortGPT at matched FLOPs) on held-out text, as deployment
    computes it (routed prefill, then decode through the KV cache), with paired bootstrap 95% CIs
    and the paired comparisons (learned vs static, ...) that the CIs support; then long-prompt
    accuracy (--longctx tasks: evidence at a stated depth, question at the end) of the same methods
    and the training-free attention routers, by task, length and evidence depth.

    \b
    Examples:
      tokenskip eval --routers out/fit/routers --out res/learned.json
      tokenskip eval --router shortgpt --sparsity 0.3 --out res/shortgpt.json
      tokenskip report res/learned.json res/shortgpt.json
      tokenskip report out/fit --tasks default --free-run 32
      tokenskip report out/fit --domains news --windows 128
      tokenskip report out/fit --longctx needle --longctx-lengths 512,1024,2048 --longctx-examples 100
      tokenskip report out/fit --no-longctx
      tokenskip report out/fit --plots figs --plot-json bench.json --plot-json explain.json
    """
    from tokenskip.fileio import read_json, write_json_atomic

    from .report import QualitySettings, collect, markdown, parse_domains, quality_table

    domain_list = parse_domains(domains)
    long_tasks = longctx_choice(longctx, no_longctx)
    if plots_out:
        from .plots import check_plots_out

        check_plots_out(plots_out)  # before any evaluation: a missing extra or bad folder fails fast
    tables, all_rows, long_rows, reports = [], [], [], []
    result_paths = []
    loaded: dict[str, object] = {}  # each model once, in --dtype on --device

    def lm_for(name: str):
        from tokenskip.models import load_model

        if name not in loaded:
            loaded[name] = load_model(name, dtype=dtype, device=device)
        return loaded[name]

    for p in paths:
        path = Path(p)
        if (path / "fit.json").is_file():
            meta = read_json(path / "fit.json", "fit summary")
            task_list = None
            if tasks:
                from .tasks import parse_tasks

                task_list = parse_tasks(tasks)
            name = model or meta["model"]
            q = QualitySettings(seq_len=seq_len, cont_len=cont_len, windows=windows, batch_size=batch_size, seed=seed,
                                kv_policy=meta.get("kv_policy", "skip"), tasks=task_list, task_examples=task_examples,
                                eval_text=eval_text, calib_text=calib_text, domains=domain_list, free_run=free_run,
                                longctx=long_tasks, longctx_lengths=longctx_lengths, longctx_examples=longctx_examples)
            obj = quality_table(name, float(meta["sparsity"]), path, q, progress=not as_json, lm=lm_for(name))
            write_json_atomic(path / f"quality-L{seq_len}-c{cont_len}.json", obj)
            tables.append(obj["markdown"])
            reports.append((str(path), obj))
            all_rows.extend({"source": str(path), **r} for r in obj["rows"])
            long_rows.extend({"source": str(path), **r} for r in (obj["longctx"] or {}).get("rows", []))
        else:
            result_paths.append(p)
    if result_paths:
        rows = collect(result_paths)
        tables.append(markdown(rows))
        all_rows.extend(rows)
    if out_file:
        write_json_atomic(out_file, {"rows": all_rows, "longctx": long_rows, "sweep": [obj for _, obj in reports]})
    if plots_out:
        from .plots import report_figures

        for f in report_figures(plots_out, reports, paths, plot_json):
            click.echo(f"wrote {f}", err=True)
    if as_json:
        click.echo(json.dumps({"rows": all_rows, "longctx": long_rows, "sweep": [obj for _, obj in reports]},
                              indent=2))
    else:
        click.echo("\n\n".join(tables))
