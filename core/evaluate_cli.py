"""`tokenskip eval`: continuation quality of a routed model against dense."""

from __future__ import annotations

import json

import click
import torch

from .errors import UserError
from .models import DEFAULT_MODEL
from .precision import device_options
from .quality_format import quality_markdown


def check_lengths(seq_len: int, cont_len: int) -> None:
    if seq_len < 8:
        raise UserError(f"--seq-len {seq_len}: must be at least 8")
    if not 1 <= cont_len <= seq_len // 2:
        raise UserError(f"--cont-len {cont_len}: must be in [1, {seq_len // 2}] for --seq-len {seq_len}")


def quality_options(domains: str, free_run: int):
    """--windows / --domains / --free-run of the quality table (`report`, `pipeline`): one
    definition, each command with its own defaults."""
    def wrap(f):
        f = click.option("--free-run", default=free_run, show_default=True, type=click.IntRange(min=0),
                         help="Also generate greedily from this many held-out prompts: agreement with dense and "
                              "repetition.")(f)
        f = click.option("--domains", default=domains, show_default=True,
                         help="Held-out text: eval (Wikipedia eval split) and/or news (the Lee news corpus, a "
                              "second domain).")(f)
        return click.option("--windows", default=64, show_default=True, type=click.IntRange(min=1),
                            help="Held-out windows per domain, sampled by --seed across every article "
                                 "(64 x 64 = 4096 scored tokens).")(f)
    return wrap


def _longctx_tasks(ctx, param, value: str) -> tuple[str, ...]:
    from tokenskip.train.longctx_tasks import check_tasks

    tasks = tuple(t.strip() for t in value.split(",") if t.strip())
    try:
        check_tasks(tasks, "--longctx")
    except UserError as exc:
        raise click.BadParameter(str(exc)) from None
    return tasks


def _longctx_lengths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value}: give comma-separated integers, e.g. 512,1024") from None
    from tokenskip.train.longctx_tasks import check_lengths

    try:
        check_lengths(lengths, "--longctx-lengths")  # the model's context is checked once it is loaded
    except UserError as exc:
        raise click.BadParameter(str(exc)) from None
    return tuple(sorted(set(lengths)))


def longctx_options(tasks: str, lengths: str, examples: int):
    """--longctx / --longctx-lengths / --longctx-examples / --no-longctx of the quality table
    (`report`, `pipeline`): the long-prompt tasks scored beside the continuation KL, for the same
    methods. One definition, each command with its own defaults; click checks the values (the
    model's context length is checked once the model is loaded). Use `longctx_choice` on the
    parsed values."""
    def wrap(f):
        f = click.option("--no-longctx", is_flag=True,
                         help="Skip the long-prompt tasks (the quality table then has the continuation KL only).")(f)
        f = click.option("--longctx-examples", default=examples, show_default=True, type=click.IntRange(min=1),
                         help="Long-prompt examples per task and length (>= 100 for a table to publish).")(f)
        f = click.option("--longctx-lengths", default=lengths, show_default=True, callback=_longctx_lengths,
                         help="Long-prompt lengths in tokens (comma list).")(f)
        return click.option("--longctx", default=tasks, show_default=True, callback=_longctx_tasks,
                            help="Long-prompt tasks scored for every method beside the KL (comma list of needle, "
                                 "kv_lookup, article_qa): evidence at a stated depth, question at the end; built from the "
                                 "held-out Wikipedia eval split and news corpus whatever the KL text.")(f)
    return wrap


def longctx_choice(tasks: tuple[str, ...], no_longctx: bool) -> tuple[str, ...]:
    """The long-prompt tasks to run: none with --no-longctx (an explicit --longctx beside it is a
    contradiction, not something to guess about)."""
    if not no_longctx:
        return tasks
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.get_parameter_source("longctx") == click.core.ParameterSource.COMMANDLINE:
        raise UserError("--longctx and --no-longctx: give one of them")
    return ()


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
    from .routers import ROUTER_KINDS

    f = click.option("--router", type=click.Choice([*ROUTER_KINDS, *extra_routers]),
                     default=None, help="Router kind (default: learned with --routers, else static)."
                     + (" shortgpt: ShortGPT layer removal at the FLOPs of --sparsity." if "shortgpt" in extra_routers
                        else ""))(f)
    f = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Built-in name, local Hugging Face folder, or Hub id.")(f)
    return f


@click.command("eval")
@model_options(extra_routers=("shortgpt",))
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="Plain UTF-8 text file to score instead of the built-in held-out text.")
@click.option("--domain", type=click.Choice(["eval", "news"]), default="eval", show_default=True,
              help="Built-in held-out text: the Wikipedia eval split, or the news corpus (a second domain).")
@click.option("--seq-len", default=512, show_default=True, help="Window length L (prompt L-c + continuation c).")
@click.option("--cont-len", default=64, show_default=True, help="Scored continuation length c.")
@click.option("--windows", default=64, show_default=True, help="Windows, sampled by --seed across every article.")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--tasks", default=None,
              help="Also multiple-choice accuracy on BIG-bench JSON tasks: comma list, or `default`.")
@click.option("--task-examples", default=100, show_default=True, help="Examples per task (seeded sample).")
@click.option("--out", "out_file", type=click.Path(), default=None,
              help="Write the results JSON here (for `tokenskip report`).")
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_cmd(model, router, sparsity, schedule, routers_dir, kv_policy, seed, text_file, domain, seq_len, cont_len,
             windows, batch_size, tasks, task_examples, device, dtype, out_file, as_json):
    """Score a routed model as deployment runs it: routed prefill of each window's prompt, then
    teacher-forced decode of its continuation through the KV cache; only the continuation is scored.

    Reports continuation perplexity, mean KL to dense and top-1 agreement with dense, each with a
    paired bootstrap 95% CI over windows, and analytic prefill FLOPs relative to dense.

    \b
    Examples:
      tokenskip eval --router static --sparsity 0.3
      tokenskip eval --router random --sparsity 0.3 --seed 1 --json
      tokenskip eval --routers out/fit/routers --domain news
      tokenskip eval --routers out/fit/routers --text my_corpus.txt
      tokenskip eval --router shortgpt --sparsity 0.3 --out res/shortgpt.json
      tokenskip eval --routers out/fit/routers --tasks default
      tokenskip eval --routers out/fit/routers --device cuda --dtype bf16
    """
    from .config import build_routed
    from .evaluate import evaluate_methods
    from .models import load_model
    from .windows import load_windows

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
    lm = load_model(model, dtype=dtype, device=device)
    extra = {}
    if router == "shortgpt":
        from tokenskip.train.baselines import shortgpt_for

        routed, extra, method = shortgpt_for(lm, sparsity, seq_len, cont_len, kv_policy or "skip", batch_size)
    else:
        routed, cfg = build_routed(lm.model, router=router, sparsity=sparsity, schedule=schedule,
                                   routers_dir=routers_dir, kv_policy=kv_policy, seed=seed, model_name=model)
        method = None if cfg.router == "dense" else f"{cfg.router} ({cfg.kv_policy})"
    ids = load_windows(lm.tokenizer, domain, seq_len, windows, seed, text_file)
    progress = not as_json
    methods = [(method, routed)] if method is not None else []
    results = evaluate_methods(methods, ids, cont_len, batch_size, progress, seed,
                               dense_model=None if methods else routed)
    source = text_file or f"built-in {domain}"
    obj = {"model": model, "text": source, "seed": seed, "dtype": dtype, "device": str(lm.model.device),
           "results": [r.to_json() for r in results]}
    if extra:
        obj["shortgpt"] = extra
    if task_names:
        from tokenskip.routed import RoutedModel

        dense_model = RoutedModel(routed.model, routed.schedule, None, kv_policy=routed.kv_policy)
        obj["tasks"] = {"dense": [r.to_json() for r in mc.run_tasks(dense_model, lm.tokenizer, loaded, progress)]}
        if method is not None:
            obj["tasks"][method] = [r.to_json() for r in mc.run_tasks(routed, lm.tokenizer, loaded, progress)]
    if out_file:
        from .fileio import write_json_atomic

        write_json_atomic(out_file, obj)
    if as_json:
        click.echo(json.dumps(obj, indent=2))
        return
    click.echo(f"model {model}, {ids.shape[0]} windows of {seq_len} tokens ({source}, seed {seed}), "
               f"last {cont_len} scored after a routed prefill")
    rows = [r.to_json() for r in results]
    if task_names:
        from tokenskip.train.tasks import attach_retention

        attach_retention(rows, obj["tasks"], seed)
    click.echo(quality_markdown(rows, tasks=bool(task_names)))
    if task_names:
        from tokenskip.train.tasks import format_tasks

        click.echo(format_tasks(obj["tasks"]))
