"""`tokenskip longctx`: long-prompt accuracy (needle, kv lookup, article QA) of routers vs dense."""

from __future__ import annotations

import json

import click

from tokenskip.errors import UserError
from tokenskip.models import DEFAULT_MODEL
from tokenskip.precision import device_options

from .longctx_tasks import TASKS

from tokenskip.routers import ROUTER_KINDS, TRAINED_KINDS

ROUTERS = tuple(k for k in ROUTER_KINDS if k != "dense" and k not in TRAINED_KINDS)  # dense: the reference; trained: --routers


def _csv(value: str, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UserError(f"{flag}: give a comma-separated list")
    return items


def _ints(value: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value, flag)]
    except ValueError:
        raise UserError(f"{flag} {value}: give comma-separated integers, e.g. 512,1024") from None


@click.command("longctx")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Built-in name, local Hugging Face folder, or Hub id.")
@click.option("--methods", "routers_kinds", default="static,attention,random", show_default=True,
              help=f"Training-free router kinds to compare with dense (comma list of {', '.join(ROUTERS)}).")
@click.option("--routers", "routers_dir", type=click.Path(), multiple=True,
              help="Also a trained router folder (`tokenskip train`/`fit`/`train-select`), scored under its kind; "
                   "repeat the flag for several.")
@click.option("--sparsity", type=float, default=None, help="Overall sparsity, uniform schedule, in [0,1).")
@click.option("--schedule", type=click.Path(), default=None, help="Per-block sparsity JSON instead of --sparsity.")
@click.option("--kv-policy", type=click.Choice(["skip", "dense"]), default="skip", show_default=True)
@click.option("--tasks", default=",".join(TASKS), show_default=True, help="Comma list of long-prompt tasks.")
@click.option("--lengths", default="512,1024", show_default=True, help="Prompt lengths in tokens (comma list).")
@click.option("--examples", default=24, show_default=True, type=int,
              help="Examples per task and length (>= 100 for a table to publish).")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, help="Seed of the examples (and of the random router).")
@click.option("--out", "out_file", type=click.Path(), default=None, help="Write the results JSON here.")
@device_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the tables.")
def longctx(model, routers_kinds, routers_dir, sparsity, schedule, kv_policy, tasks, lengths, examples, batch_size,
            seed, out_file, device, dtype, as_json):
    """Long-prompt accuracy: the evidence sits at a stated depth, the question at the end. Each
    prompt is routed by prefill, the answer scored through the KV cache; correct = greedy decoding
    reproduces the answer. Dense is always scored as the reference.

    \b
    Examples:
      tokenskip longctx --sparsity 0.3
      tokenskip longctx --sparsity 0.3 --tasks needle --lengths 512,1024,2048 --examples 100 --out res.json
      tokenskip longctx --sparsity 0.3 --methods static --routers out/fit/routers --json
    """
    import torch

    from tokenskip.config import build_routed
    from tokenskip.models import load_model
    from tokenskip.schedule import check_sparsity

    from .longctx import format_longctx, run_longctx
    from .longctx_tasks import check_request, make_examples

    kinds = _csv(routers_kinds, "--methods")
    bad = [k for k in kinds if k not in ROUTERS]
    if bad:
        raise UserError(f"--methods {','.join(bad)}: choose from {', '.join(ROUTERS)}")
    if sparsity is not None:
        check_sparsity(sparsity)
    elif schedule is None and (kinds or not routers_dir):
        raise UserError("--sparsity X or --schedule FILE is needed for the router kinds in --methods")
    task_list, length_list = _csv(tasks, "--tasks"), _ints(lengths, "--lengths")
    check_request(task_list, length_list, examples)  # bad flags fail before the model loads
    torch.manual_seed(seed)
    lm = load_model(model, dtype=dtype, device=device)
    max_len = int(getattr(lm.model.config, "max_position_embeddings", 2048))
    check_request(task_list, length_list, examples, max_len)
    exs = make_examples(lm.tokenizer, task_list, length_list, examples, seed)
    dense, _ = build_routed(lm.model, router="dense", kv_policy=kv_policy, model_name=model)
    methods = [("dense", dense)]
    for kind in kinds:
        routed, _ = build_routed(lm.model, router=kind, sparsity=sparsity, schedule=schedule, kv_policy=kv_policy,
                                 seed=seed, model_name=model)
        methods.append((kind, routed))
    for folder in routers_dir:
        routed, cfg = build_routed(lm.model, routers_dir=folder, kv_policy=kv_policy, model_name=model)
        name = cfg.router if cfg.router not in dict(methods) else f"{cfg.router} ({folder})"
        methods.append((name, routed))
    obj = {"model": model, "sparsity": sparsity, "schedule": schedule, "kv_policy": kv_policy, "seed": seed,
           "tasks": task_list, "lengths": length_list, "examples_per_task_length": examples, "dtype": dtype,
           "device": str(lm.model.device)}
    obj.update(run_longctx(methods, exs, seed, batch_size, progress=not as_json))
    if out_file:
        from tokenskip.fileio import write_json_atomic

        write_json_atomic(out_file, obj)
    if as_json:
        click.echo(json.dumps(obj, indent=2))
        return
    click.echo(f"model {model}, {examples} examples per task and length, sparsity {sparsity or schedule}, "
               f"kv_policy {kv_policy}, seed {seed}")
    click.echo(format_longctx(obj))
