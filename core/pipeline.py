"""`tokenskip pipeline`: the whole job, end to end, on one model (default: the built-in smollm2-135m).

Stages (artefacts go to --out; each stage reuses its artefact when it is already there, so an
interrupted run picks up where it stopped):
  1. fit: genetic sparsity search (static router) -> router training -> re-search -> short train;
     then the learned one-selection router (`train-select`: long-prompt evidence, fit/select);
  2. quality: dense, learned (searched), select, static (searched / uniform), random and ShortGPT at the
     same FLOPs, scored on the continuation after a routed prompt (quality.json), then on long
     prompts whose evidence sits at a stated depth, with the training-free attention routers
     beside them (longctx.json);
  3. export: the learned routed model and the dense model to ONNX, validated in ONNX Runtime;
  4. engine: the TensorRT plugin library (nvcc) and TensorRT engines (TensorRT-RTX builds them
     on a machine without a GPU);
  5. generate + speed: text from the exported model (the engine where a GPU can run it, else ONNX
     Runtime) and routed-vs-dense prefill speed, with the FLOP ideal beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from .errors import UserError
from .models import DEFAULT_MODEL
from .evaluate_cli import longctx_choice, longctx_options, quality_options
from .precision import device_options

STAGES = ("fit", "quality", "export", "engine", "generate", "speed")
DEFAULT_PROMPT = "The history of the Roman Empire"


def _stage(n: int, title: str) -> float:
    click.secho(f"\n== [{n}/{len(STAGES)}] {title}", bold=True)
    return time.time()


def _done(t0: float) -> None:
    click.echo(f"   ({time.time() - t0:.0f} s)")


def _invoke(ctx: click.Context, command_path: str, **kwargs) -> None:
    """Run another tokenskip command in this process (same output and errors as on the CLI)."""
    import importlib

    module, attr = command_path.split(":")
    ctx.invoke(getattr(importlib.import_module(module), attr), **kwargs)


def _figures(ctx: click.Context, out: Path, stage: str, **explain) -> None:
    """The stage's figures into OUT/figures when the `plots` extra is installed (the quality stage
    first runs `tokenskip explain` on the learned routers, whose JSON is the routing map's input)."""
    from .train.plots import pipeline_figures, plots_installed

    if not plots_installed():
        click.echo("   (figures skipped: pip install 'tokenskip[plots]' to draw them)")
        return
    if stage == "quality":
        from .deploy.quality.explain import SAMPLE_PROMPT

        _invoke(ctx, "tokenskip.deploy.quality.explain:explain", prompt=SAMPLE_PROMPT, out_file=str(out / "explain.json"),
                **explain)
    for f in pipeline_figures(out, stage):
        if f.suffix == ".png":
            click.echo(f"   figure: {f}")


def _quality_keys(model: str, sparsity: float, fit_dir: Path, q, lm) -> tuple[dict, dict]:
    """What quality.json and longctx.json were computed from (model, precision, sparsity, the fit's
    files by hash, the settings each depends on): a later run reuses a file only when its key is
    equal, so an interrupted quality stage resumes and a changed fit or flag is never served stale."""
    import json
    from dataclasses import asdict

    from .fileio import sha256_file
    from .precision import model_device
    from .train.report import training_free_kinds

    fit = {}
    for rel in ("routers/router.safetensors", "routers/tokenskip.json", "search-static/schedule.json",
                "select/router.safetensors", "select/tokenskip.json"):
        f = fit_dir / rel
        fit[rel] = sha256_file(f) if f.is_file() else None
    common = {"model": model, "sparsity": sparsity, "dtype": str(next(lm.model.parameters()).dtype),
              "device": str(model_device(lm.model)), "fit": fit}
    settings = json.loads(json.dumps(asdict(q)))  # tuples -> lists: equal to what the JSON file reads back
    long_fields = ("longctx", "longctx_lengths", "longctx_examples")
    kl = {**common, "settings": {k: v for k, v in settings.items() if k not in long_fields}}
    lc = {**common, "settings": {k: settings[k] for k in (*long_fields, "methods", "seed", "kv_policy", "batch_size")},
          "training_free": list(training_free_kinds())}
    return kl, lc


def _reusable(path: Path, key: dict) -> dict | None:
    """The JSON at `path` when a previous run wrote it from the same inputs (`key`), else None."""
    from .fileio import read_json

    if not path.is_file():
        return None
    try:
        obj = read_json(path, path.name)
    except UserError:
        return None
    return obj if isinstance(obj, dict) and obj.get("reuse_key") == key else None


def _quality_stage(out: Path, model: str, sparsity: float, fit_dir: Path, q, lm) -> None:
    """The KL table (quality.json), then long-prompt accuracy of the same methods (longctx.json).
    The methods are built once for both; each part is reused when a previous run finished it."""
    from dataclasses import replace

    from .fileio import write_json_atomic
    from .train.report import longctx_examples, longctx_section, quality_methods, quality_table

    kl_key, lc_key = _quality_keys(model, sparsity, fit_dir, q, lm)
    table = _reusable(out / "quality.json", kl_key)
    long = _reusable(out / "longctx.json", lc_key) if q.longctx else None
    built, examples = None, []
    if table is None or (q.longctx and long is None):
        examples = longctx_examples(lm, q)  # a --longctx-lengths beyond the model's context fails before scoring
        built = quality_methods(lm, fit_dir, sparsity, q)
    if table is None:
        table = quality_table(model, sparsity, fit_dir, replace(q, longctx=()), lm=lm, built=built)
        write_json_atomic(out / "quality.json", {**table, "reuse_key": kl_key})
    else:
        click.echo(f"(reusing {out / 'quality.json'}: same model, fit and settings)")
    click.echo(table["markdown"])
    if not q.longctx:
        return
    if long is None:
        t0 = time.time()
        base, models, _ = built
        long = longctx_section(lm, base, models, sparsity, examples, q)
        write_json_atomic(out / "longctx.json", {**long, "reuse_key": lc_key})
        click.echo(f"\n(long prompts: {time.time() - t0:.0f} s)")
    else:
        click.echo(f"\n(reusing {out / 'longctx.json'}: same model, fit and settings)")
    click.echo("\n" + long["markdown"])


def _gpu_can_run_engine() -> bool:
    return torch.cuda.is_available()


@click.command("pipeline")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in name, local Hugging Face folder, or Hub id.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("tokenskip-out"), show_default=True,
              help="Folder for every artefact of the run.")
@click.option("--sparsity", default=0.3, show_default=True, help="Overall sparsity the router is fitted for.")
@click.option("--budget", type=click.Choice(["tiny", "small", "default"]), default="small", show_default=True,
              help="Search/training budget of the fit stage (small: a few minutes on 2 CPU cores).")
@quality_options(domains="eval", free_run=8)
@longctx_options(tasks="needle,article_qa", lengths="512", examples=16)
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Prompt for the generation stage.")
@click.option("--bench-seq-len", default=1024, show_default=True, help="Prompt length of the speed stage.")
@click.option("--stages", default=",".join(STAGES), show_default=True, help="Comma-separated stages to run.")
@click.option("--seed", default=0, show_default=True)
@device_options
@click.pass_context
def pipeline(ctx, model, out_dir, sparsity, budget, windows, domains, free_run, longctx, longctx_lengths,
             longctx_examples, no_longctx, prompt, bench_seq_len, stages, seed, device, dtype):
    """Run the whole job end to end and print the quality and speed tables.

    \b
    Examples:
      tokenskip pipeline
      tokenskip pipeline --sparsity 0.4 --out out/run-04
      tokenskip pipeline --model ./my-llama --stages fit,quality
      tokenskip pipeline --model ./my-llama --stages fit,quality --device cuda --dtype bf16
      tokenskip pipeline --longctx needle,kv_lookup,article_qa --longctx-lengths 512,1024 --longctx-examples 24

    --device/--dtype apply to the fit and quality stages (the model is loaded once for both).
    """
    from .fileio import write_json_atomic
    from .models import load_model
    from .schedule import check_sparsity

    from .train.report import parse_domains

    check_sparsity(sparsity)
    domain_list = parse_domains(domains)
    long_tasks = longctx_choice(longctx, no_longctx)
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown or not chosen:
        raise UserError(f"--stages {stages}: choose from {', '.join(STAGES)}")
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fit_dir, export_dir, dense_dir = out / "fit", out / "export", out / "export-dense"
    engine_dir = out / "engine"
    started = time.time()
    click.secho(f"tokenskip pipeline: {model}, overall sparsity {sparsity}, artefacts in {out}", bold=True)
    lm = load_model(model, dtype=dtype, device=device)

    if "fit" in chosen:
        from .train.fit import FitSettings, run_fit

        t0 = _stage(1, f"fit the routers ({budget} budget): search -> train -> re-search -> train; train-select")
        routers = run_fit(model, sparsity, fit_dir, FitSettings(budget=budget, seed=seed), lm=lm)
        click.echo(f"routers: {routers}" + (f"; select router: {fit_dir / 'select'}"
                                            if (fit_dir / "select" / "tokenskip.json").is_file() else ""))
        _done(t0)
    routers_dir = fit_dir / "routers"

    if "quality" in chosen:
        from .train.report import QualitySettings

        t0 = _stage(2, "quality at equal FLOPs (continuation after a routed prompt, held-out text"
                       + ("; long prompts)" if long_tasks else ")"))
        if not (routers_dir / "tokenskip.json").is_file():
            raise UserError(f"no fitted routers in {routers_dir}: run the fit stage first")
        quality = QualitySettings(windows=windows, seed=seed, domains=domain_list, free_run=free_run,
                                  longctx=long_tasks, longctx_lengths=longctx_lengths,
                                  longctx_examples=longctx_examples)
        quality.check()
        _quality_stage(out, model, sparsity, fit_dir, quality, lm)
        _figures(ctx, out, "quality", model=model, routers_dir=str(routers_dir))
        _done(t0)

    if "export" in chosen:
        t0 = _stage(3, "export to ONNX (tokenskip custom ops with function bodies) and validate in ONNX Runtime")
        _invoke(ctx, "tokenskip.export.cli:export", model_name=model, routers_dir=routers_dir, out_dir=export_dir,
                force=True)
        _invoke(ctx, "tokenskip.export.cli:export", model_name=model, router="dense", out_dir=dense_dir, force=True)
        _invoke(ctx, "tokenskip.export.cli:validate", export_dir=export_dir, batch="1,2", decode_tokens=16,
                samples=1)
        _done(t0)

    if "engine" in chosen:
        t0 = _stage(4, "TensorRT: plugin library + engines")
        _invoke(ctx, "tokenskip.plugins.cli:build_cmd")
        _invoke(ctx, "tokenskip.deploy.engine.cli:build", export_dir=str(export_dir), out_dir=str(engine_dir),
                force=False)
        _done(t0)

    if "generate" in chosen:
        t0 = _stage(5, "generate with the routed model")
        if _gpu_can_run_engine() and (engine_dir / "engine.json").is_file():
            _invoke(ctx, "tokenskip.deploy.cli:generate", engine_dir=engine_dir, prompt=(prompt,), max_new_tokens=32)
        else:
            click.echo("(no CUDA GPU here: the TensorRT engine cannot run; generating with ONNX Runtime on the "
                       "same export)")
            _invoke(ctx, "tokenskip.deploy.cli:generate", onnx_dir=export_dir, prompt=(prompt,), max_new_tokens=32)
        _done(t0)

    if "speed" in chosen:
        t0 = _stage(6, f"speed: routed vs dense prefill, ONNX Runtime CPU, S={bench_seq_len}, batch 1")
        _invoke(ctx, "tokenskip.deploy.cli:bench", backend="ort", onnx_dir=export_dir, onnx_dense_dir=dense_dir,
                seq_lens=str(bench_seq_len), batches="1", repeats=5, warmup=1, out_file=str(out / "bench.json"))
        _figures(ctx, out, "speed")
        _done(t0)

    write_json_atomic(out / "pipeline.json", {"model": model, "sparsity": sparsity, "budget": budget,
                                              "stages": chosen, "seconds": round(time.time() - started, 1)})
    click.secho(f"\npipeline finished in {time.time() - started:.0f} s; artefacts in {out}", bold=True)
