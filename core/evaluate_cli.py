"""`tokenskip eval`: continuation quality of a routed model against dense."""

from __future__ import annotations

import json

import click
import torch

from .errors import UserError
from .evaluate import EvalResult, dense_reference, dense_result, evaluate
from .models import DEFAULT_MODEL

TABLE_COLUMNS = ("method", "sparsity", "flops", "ppl", "ppl_ratio", "kl", "top1")


def format_table(results: list[EvalResult]) -> str:
    """A Markdown table, one row per method, FLOPs next to quality so rows compare at equal compute."""
    head = "| method | sparsity | FLOPs vs dense | cont. ppl | ppl ratio | KL to dense | top-1 agree |"
    sep = "|---|---|---|---|---|---|---|"
    rows = [f"| {r.method} | {r.sparsity:.3f} | {r.flops:.3f} | {r.ppl:.2f} | {r.ppl_ratio:.3f} | {r.kl:.4f} | "
            f"{r.top1:.3f} |" for r in results]
    return "\n".join([head, sep, *rows])


def load_windows(tokenizer, text_file: str | None, seq_len: int, windows: int, split: str = "eval") -> torch.Tensor:
    """Token windows [N,L] from a user's text file or the built-in held-out split."""
    from . import data

    texts = [data.read_text_file(text_file)] if text_file else data.load_split(split)
    return data.token_windows(tokenizer, texts, seq_len, max_windows=windows)


def check_lengths(seq_len: int, cont_len: int) -> None:
    if seq_len < 8:
        raise UserError(f"--seq-len {seq_len}: must be at least 8")
    if not 1 <= cont_len <= seq_len // 2:
        raise UserError(f"--cont-len {cont_len}: must be in [1, {seq_len // 2}] for --seq-len {seq_len}")


def model_options(f):
    """Options shared by every command that builds a routed model."""
    f = click.option("--seed", default=0, show_default=True, help="Seed (random router, sampling).")(f)
    f = click.option("--kv-policy", type=click.Choice(["skip", "dense"]), default=None,
                     help="What skipped tokens are for attention (default: the routers folder's, else skip).")(f)
    f = click.option("--routers", "routers_dir", type=click.Path(), default=None,
                     help="Folder written by `tokenskip train` (tokenskip.json + router.safetensors).")(f)
    f = click.option("--schedule", type=click.Path(), default=None, help="Per-block sparsity JSON (schedule.json).")(f)
    f = click.option("--sparsity", type=float, default=None, help="Overall sparsity, uniform schedule, in [0,1).")(f)
    f = click.option("--router", type=click.Choice(["dense", "static", "random", "learned"]), default=None,
                     help="Router kind (default: learned with --routers, else static).")(f)
    f = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Built-in name, local Hugging Face folder, or Hub id.")(f)
    return f


@click.command("eval")
@model_options
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="Plain UTF-8 text file to score instead of the built-in held-out split.")
@click.option("--seq-len", default=512, show_default=True, help="Window length L.")
@click.option("--cont-len", default=64, show_default=True, help="Scored continuation length c.")
@click.option("--windows", default=16, show_default=True, help="Number of windows.")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_cmd(model, router, sparsity, schedule, routers_dir, kv_policy, seed, text_file, seq_len, cont_len, windows,
             batch_size, as_json):
    """Score a routed model on the continuation after a routed prompt.

    Reports continuation perplexity, mean KL to dense, top-1 agreement with dense and analytic
    FLOPs relative to dense, for dense and the chosen router.

    \b
    Examples:
      tokenskip eval --router static --sparsity 0.3
      tokenskip eval --router random --sparsity 0.3 --seed 1 --json
      tokenskip eval --routers out/fit --text my_corpus.txt
    """
    from .config import build_routed
    from .models import load_model

    if sparsity is not None:
        from .schedule import check_sparsity
        check_sparsity(sparsity)
    check_lengths(seq_len, cont_len)
    if windows < 1 or batch_size < 1:
        raise UserError("--windows and --batch-size must be >= 1")
    if router is None:
        router = "learned" if routers_dir else "static"
    torch.manual_seed(seed)
    lm = load_model(model)
    routed, cfg = build_routed(lm.model, router=router, sparsity=sparsity, schedule=schedule,
                               routers_dir=routers_dir, kv_policy=kv_policy, seed=seed, model_name=model)
    ids = load_windows(lm.tokenizer, text_file, seq_len, windows)
    progress = not as_json
    dense = dense_reference(routed, ids, cont_len, batch_size, progress)
    results = [dense_result(dense, seq_len, cont_len)]
    if cfg.router != "dense":
        results.append(evaluate(routed, ids, cont_len, dense, f"{cfg.router} ({cfg.kv_policy})", batch_size,
                                progress))
    if as_json:
        click.echo(json.dumps({"model": model, "results": [r.to_json() for r in results]}, indent=2))
    else:
        click.echo(f"model {model}, {ids.shape[0]} windows of {seq_len} tokens, last {cont_len} scored")
        click.echo(format_table(results))
