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


def format_tasks(tasks: dict) -> str:
    """Multiple-choice accuracy per task and method, with retention (method acc / dense acc)."""
    dense = {t["task"]: t["accuracy"] for t in tasks.get("dense", [])}
    head = "| method | task | accuracy | chance | retention |"
    rows = [head, "|---|---|---|---|---|"]
    for method, results in tasks.items():
        for t in results:
            ret = t["accuracy"] / dense[t["task"]] if dense.get(t["task"]) else float("nan")
            rows.append(f"| {method} | {t['task']} | {t['accuracy']:.3f} | {t['chance']:.3f} | {ret:.3f} |")
    return "\n".join(rows)


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


def model_options(f=None, *, extra_routers: tuple[str, ...] = ()):
    """Options shared by every command that builds a routed model (`extra_routers`: more --router
    choices a command handles itself, e.g. eval's shortgpt baseline)."""
    if f is None:
        return lambda g: model_options(g, extra_routers=extra_routers)
    f = click.option("--seed", default=0, show_default=True, help="Seed (random router, sampling).")(f)
    f = click.option("--kv-policy", type=click.Choice(["skip", "dense"]), default=None,
                     help="What skipped tokens are for attention (default: the routers folder's, else skip).")(f)
    f = click.option("--routers", "routers_dir", type=click.Path(), default=None,
                     help="Folder written by `tokenskip train` (tokenskip.json + router.safetensors).")(f)
    f = click.option("--schedule", type=click.Path(), default=None, help="Per-block sparsity JSON (schedule.json).")(f)
    f = click.option("--sparsity", type=float, default=None, help="Overall sparsity, uniform schedule, in [0,1).")(f)
    f = click.option("--router", type=click.Choice(["dense", "static", "random", "learned", *extra_routers]),
                     default=None, help="Router kind (default: learned with --routers, else static)."
                     + (" shortgpt: ShortGPT layer removal at the FLOPs of --sparsity." if "shortgpt" in extra_routers
                        else ""))(f)
    f = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Built-in name, local Hugging Face folder, or Hub id.")(f)
    return f


@click.command("eval")
@model_options(extra_routers=("shortgpt",))
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="Plain UTF-8 text file to score instead of the built-in held-out split.")
@click.option("--seq-len", default=512, show_default=True, help="Window length L.")
@click.option("--cont-len", default=64, show_default=True, help="Scored continuation length c.")
@click.option("--windows", default=16, show_default=True, help="Number of windows.")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--tasks", default=None,
              help="Also multiple-choice accuracy on BIG-bench JSON tasks: comma list, or `default`.")
@click.option("--task-examples", default=50, show_default=True, help="Examples per task (seeded sample).")
@click.option("--out", "out_file", type=click.Path(), default=None,
              help="Write the results JSON here (for `tokenskip report`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_cmd(model, router, sparsity, schedule, routers_dir, kv_policy, seed, text_file, seq_len, cont_len, windows,
             batch_size, tasks, task_examples, out_file, as_json):
    """Score a routed model on the continuation after a routed prompt.

    Reports continuation perplexity, mean KL to dense, top-1 agreement with dense and analytic
    FLOPs relative to dense, for dense and the chosen router.

    \b
    Examples:
      tokenskip eval --router static --sparsity 0.3
      tokenskip eval --router random --sparsity 0.3 --seed 1 --json
      tokenskip eval --routers out/fit/routers --text my_corpus.txt
      tokenskip eval --router shortgpt --sparsity 0.3 --out res/shortgpt.json
      tokenskip eval --routers out/fit/routers --tasks default
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
    if router == "shortgpt" and (sparsity is None or routers_dir or schedule):
        raise UserError("--router shortgpt needs --sparsity X (the token sparsity whose FLOPs it matches) "
                        "and no --routers/--schedule")
    task_names = None
    if tasks:
        from tokenskip.train import tasks as mc

        task_names = mc.parse_tasks(tasks)
        if task_examples < 1:
            raise UserError("--task-examples must be >= 1")
        loaded = mc.load_tasks(task_names, task_examples, seed)  # bad task names fail before any model work
    torch.manual_seed(seed)
    lm = load_model(model)
    extra = {}
    if router == "shortgpt":
        from tokenskip.train.baselines import shortgpt_for

        routed, extra, method = shortgpt_for(lm, sparsity, seq_len, cont_len, kv_policy or "skip", batch_size)
    else:
        routed, cfg = build_routed(lm.model, router=router, sparsity=sparsity, schedule=schedule,
                                   routers_dir=routers_dir, kv_policy=kv_policy, seed=seed, model_name=model)
        method = None if cfg.router == "dense" else f"{cfg.router} ({cfg.kv_policy})"
    ids = load_windows(lm.tokenizer, text_file, seq_len, windows)
    progress = not as_json
    dense = dense_reference(routed, ids, cont_len, batch_size, progress)
    results = [dense_result(dense, seq_len, cont_len)]
    if method is not None:
        results.append(evaluate(routed, ids, cont_len, dense, method, batch_size, progress))
    obj = {"model": model, "results": [r.to_json() for r in results]}
    if extra:
        obj["shortgpt"] = extra
    if task_names:
        obj["tasks"] = {"dense": [r.to_json() for r in mc.run_tasks(routed, lm.tokenizer, loaded, False, progress)]}
        if method is not None:
            obj["tasks"][method] = [r.to_json() for r in mc.run_tasks(routed, lm.tokenizer, loaded, True, progress)]
    if out_file:
        from .fileio import write_json_atomic

        write_json_atomic(out_file, obj)
    if as_json:
        click.echo(json.dumps(obj, indent=2))
    else:
        click.echo(f"model {model}, {ids.shape[0]} windows of {seq_len} tokens, last {cont_len} scored")
        click.echo(format_table(results))
        if task_names:
            click.echo(format_tasks(obj["tasks"]))
