"""`tokenskip pipeline`: the whole job, end to end, on one model (default: the built-in smollm2-135m).

Stages (each prints what it did; artefacts go to --out):
  1. quality: dense vs the static router at a few sparsities and the random router, scored on the
     continuation after a routed prompt (the table of benchmarks.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from .errors import UserError
from .evaluate import dense_reference, dense_result, evaluate
from .evaluate_cli import format_table, load_windows
from .models import DEFAULT_MODEL


def _stage(title: str) -> None:
    click.secho(f"\n== {title}", bold=True)


def quality_stage(lm, sparsities, seq_len, cont_len, windows, batch_size, seed) -> list:
    from .config import build_routed

    ids = load_windows(lm.tokenizer, None, seq_len, windows)
    click.echo(f"{ids.shape[0]} held-out windows of {seq_len} tokens; the last {cont_len} are scored")
    base, _ = build_routed(lm.model, router="dense", model_name=lm.name)
    dense = dense_reference(base, ids, cont_len, batch_size)
    results = [dense_result(dense, seq_len, cont_len)]
    for s in sparsities:
        for kind in ("static", "random"):
            routed, _ = build_routed(lm.model, router=kind, sparsity=s, seed=seed, model_name=lm.name)
            r = evaluate(routed, ids, cont_len, dense, f"{kind} uniform @{s:g}", batch_size)
            results.append(r)
    return results


@click.command("pipeline")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in name, local Hugging Face folder, or Hub id.")
@click.option("--out", "out_dir", type=click.Path(), default="tokenskip-out", show_default=True,
              help="Folder for every artefact of the run.")
@click.option("--sparsities", default="0.22,0.3,0.4", show_default=True, help="Overall sparsities to compare.")
@click.option("--seq-len", default=512, show_default=True)
@click.option("--cont-len", default=64, show_default=True)
@click.option("--windows", default=8, show_default=True, help="Held-out windows for the quality table.")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--seed", default=0, show_default=True)
def pipeline(model, out_dir, sparsities, seq_len, cont_len, windows, batch_size, seed):
    """Run the whole job end to end and print the tables.

    \b
    Examples:
      tokenskip pipeline
      tokenskip pipeline --model ./my-llama --sparsities 0.3 --out out/run1
    """
    from .fileio import write_json_atomic
    from .models import load_model
    from .schedule import check_sparsity

    try:
        values = [check_sparsity(float(x)) for x in sparsities.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--sparsities {sparsities}: expected comma-separated numbers in [0, 1)") from None
    if not values:
        raise UserError("--sparsities: give at least one value")
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _stage(f"model: {model}")
    lm = load_model(model)
    _stage("quality: continuation after a routed prompt")
    results = quality_stage(lm, values, seq_len, cont_len, windows, batch_size, seed)
    table = format_table(results)
    click.echo(table)
    write_json_atomic(out / "quality.json", {"model": model, "results": [r.to_json() for r in results]})
    click.echo(f"\npipeline finished in {time.time() - t0:.0f}s; artefacts in {out}")
