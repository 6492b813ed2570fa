"""`tokenskip export` and `tokenskip validate` (mapped by tokenskip.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tokenskip.errors import UserError
from tokenskip.precision import device_options
from tokenskip.routers import ROUTER_KINDS, TRAINED_KINDS

from .exporter import DEFAULT_MAX_SEQ_LEN, DEFAULT_OPSET, OPSET_RANGE

# random's scores come from a host-side RNG; trained kinds need their folder (--routers)
EXPORTABLE = tuple(k for k in ROUTER_KINDS if k != "random" and k not in TRAINED_KINDS)


def _log(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))


@click.command("export")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="Built-in name, local Hugging Face folder or Hub id.")
@click.option("--routers", "routers_dir", type=click.Path(path_type=Path), default=None,
              help="A routers folder written by `tokenskip train` (tokenskip.json [+ router.safetensors]).")
@click.option("--router", type=click.Choice(EXPORTABLE), default=None,
              help="Without --routers: a training-free router (static = sink + recency) or the dense model.")
@click.option("--sparsity", type=float, default=None, help="Overall sparsity in [0, 1) for a --router (its own schedule shape).")
@click.option("--schedule", "schedule_file", type=click.Path(path_type=Path), default=None,
              help="Per-block sparsity schedule JSON for a --router (instead of --sparsity).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--kv-policy", type=click.Choice(["skip", "dense"]), default=None,
              help="Overrides the routers folder's kv_policy (default: skip).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help=f"ONNX opset ({OPSET_RANGE[0]}..{OPSET_RANGE[1]}).")
@device_options
@click.option("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN, show_default=True,
              help="Upper bound of the seq / past dims the graphs are traced for.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker full_check (faster for big models).")
@click.option("--optimize", is_flag=True,
              help="Also run the onnxscript optimizer's rewrite rules (minutes; the graph is always "
                   "constant-folded and deduplicated, which takes seconds).")
@click.option("--attention-chunks", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Causal query chunks of prefill attention (4: about 1.4x faster ONNX Runtime prefill at "
                   "1-2k tokens, but ~4x the trace time and a larger graph; docs/export.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar (export.json) as JSON.")
def export(model_name, routers_dir, router, sparsity, schedule_file, out_dir, kv_policy, opset, device, dtype,
           max_seq_len, force, no_check, optimize, attention_chunks, as_json):
    """Export the routed model to ONNX: one graph for prefill and decode, with tokenskip custom ops.

    The LLM is loaded once, in --dtype, on --device; the routers stay fp32. The weights are
    streamed to model.onnx.data (never a whole model in memory as protobuf).

    \b
    Examples:
      tokenskip export --router static --sparsity 0.3 --out out/export
      tokenskip export --routers out/fit --dtype fp16 --out out/export-fp16
      tokenskip export --model ./my-llama --routers out/fit --dtype bf16 --device cuda --out out/export-bf16
    """
    from tokenskip.precision import resolve_device, resolve_dtype

    from .exporter import check_opset, check_out_dir

    # cheap checks first: no model load for a command that is going to fail
    check_opset(opset)
    resolve_dtype(dtype)
    resolve_device(device)
    check_out_dir(out_dir, force)
    if max_seq_len < 2:
        raise UserError(f"--max-seq-len {max_seq_len}: must be >= 2")
    if routers_dir is not None:
        if router is not None or sparsity is not None or schedule_file is not None:
            raise UserError("--routers carries the router and schedule: drop --router/--sparsity/--schedule")
        if not Path(routers_dir).is_dir():
            raise UserError(f"--routers {routers_dir}: no such folder")
    elif router is None:
        raise UserError("choose what to export: --routers DIR, --router static --sparsity X, or --router dense")
    elif router == "dense" and (sparsity is not None or schedule_file is not None):
        raise UserError("--router dense takes no --sparsity/--schedule")
    elif router != "dense" and sparsity is None and schedule_file is None:
        raise UserError(f"--router {router} needs --sparsity X (in [0, 1)) or --schedule FILE")
    if sparsity is not None:
        from tokenskip.schedule import check_sparsity

        check_sparsity(sparsity)
    if routers_dir is not None:  # validate the folder before loading the model
        from tokenskip.config import load_routing

        load_routing(routers_dir)

    from tokenskip.config import build_routed
    from tokenskip.models import load_model

    from .exporter import export_model

    log = _log(as_json)
    log(f"loading {model_name} ({dtype}, {device})...")
    loaded = load_model(model_name, dtype=dtype, device=device)
    routed, cfg = build_routed(loaded.model, router=router or "static", sparsity=sparsity, schedule=schedule_file,
                               routers_dir=routers_dir, kv_policy=kv_policy, model_name=model_name)
    if not cfg.model:
        cfg.model = model_name
    from tokenskip import attention

    with attention.graph_chunks(attention_chunks):
        sidecar = export_model(loaded, routed, cfg, out_dir, opset=opset, dtype=dtype, max_seq_len=max_seq_len,
                               force=force, check=not no_check, optimize=optimize, log=log)
    if as_json:
        click.echo(json.dumps(sidecar, indent=2, sort_keys=True))
    else:
        routed_layers = [l["layer"] for l in sidecar["layers"] if l["routed"]]
        click.echo(f"exported {model_name} ({cfg.router} router, {len(routed_layers)}/{len(sidecar['layers'])} "
                   f"blocks routed, kv_policy={sidecar['kv_policy']}, {dtype}, opset {opset}) to {out_dir}")
        click.echo(f"  check it: tokenskip validate {out_dir}")


def _parse_batches(value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch {value}: expected comma-separated integers, e.g. 1,4") from None
    if not out or any(b < 1 for b in out):
        raise UserError(f"--batch {value}: batch sizes must be >= 1")
    return out


@click.command("validate", help="Check an ONNX export against the PyTorch routed model (ONNX Runtime, CPU).")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--atol", type=float, default=1e-3, show_default=True, help="Absolute tolerance for float outputs.")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Relative tolerance for float outputs.")
@click.option("--batch", "batch", default="1,4", show_default=True, help="Batch sizes to test (left-padded).")
@click.option("--decode-tokens", type=int, default=32, show_default=True, help="Greedy decode length (0: skip).")
@click.option("--samples", type=int, default=2, show_default=True,
              help="Random-shape cases per batch size (random ids, lengths and left padding).")
@click.option("--window", type=int, default=96, show_default=True, help="Eval-text prompt length in tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def validate(export_dir, atol, rtol, batch, decode_tokens, samples, window, seed, as_json):
    from tokenskip.deploy.runtime.validate import format_report, run_validation

    batches = _parse_batches(batch)
    if samples < 0:
        raise UserError("--samples must be >= 0")
    if window < 4:
        raise UserError("--window must be >= 4")
    report = run_validation(export_dir, atol=atol, rtol=rtol, batches=batches, decode_tokens=decode_tokens,
                            samples=samples, window=window, seed=seed, log=_log(as_json))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
    if not report["passed"]:
        if as_json:
            sys.exit(1)
        raise SystemExit(1)


@click.command("bench-export")
@click.option("--model", "model_name", default=None, help="Built-in name, local folder or Hub id (default smollm2-135m).")
@click.option("--random-llama", default=None, type=click.Choice(["1b", "tiny"]),
              help="Instead of --model: a random-weight LLaMA-shaped model built from a config (no download).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--sparsity", type=float, default=0.3, show_default=True, help="Static router, uniform schedule.")
@click.option("--routers", "routers_dir", type=click.Path(path_type=Path), default=None,
              help="Export this routers folder (written by `tokenskip fit` / `train`, e.g. the learned router) "
                   "instead of the static router.")
@click.option("--max-seq-len", type=int, default=2048, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Keep the export here (default: a temporary folder, deleted).")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker.")
@click.option("--optimize", is_flag=True, help="Also run the onnxscript optimizer's rewrite rules.")
@click.option("--threads", type=int, default=None, help="torch threads in the export process.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the JSON report here.")
def bench_export(model_name, random_llama, dtype, sparsity, routers_dir, max_seq_len, out_dir, no_check, optimize,
                 threads, seed, as_json, json_out):
    """Time an export stage by stage and measure its peak memory, in a fresh process.

    \b
    Examples:
      tokenskip bench-export                                   # smollm2-135m, fp32
      tokenskip bench-export --random-llama 1b --dtype fp16    # ~1.1B parameters, no download
      tokenskip bench-export --random-llama tiny --json
      tokenskip bench-export --routers out/pipeline/fit/routers   # the pipeline's learned-router graph
    """
    from .bench_export import format_report, run

    if model_name and random_llama:
        raise UserError("give --model or --random-llama, not both")
    if routers_dir is not None:
        if random_llama:
            raise UserError("--routers: a routers folder belongs to a real model; use it with --model, "
                            "not --random-llama")
        if not (routers_dir / "tokenskip.json").is_file():
            raise UserError(f"--routers {routers_dir}: no tokenskip.json there (a folder written by "
                            "`tokenskip fit` or `tokenskip train`)")
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity {sparsity}: must be in [0, 1)")
    if max_seq_len < 2:
        raise UserError(f"--max-seq-len {max_seq_len}: must be >= 2")
    if out_dir is not None:
        from .exporter import check_out_dir

        check_out_dir(out_dir, force=False)
    report = run(model=model_name or (None if random_llama else "smollm2-135m"), random_llama=random_llama,
                 dtype=dtype, sparsity=sparsity, routers=str(routers_dir) if routers_dir else None,
                 max_seq_len=max_seq_len, out=str(out_dir) if out_dir else None,
                 check=not no_check, optimize=optimize, threads=threads, seed=seed)
    if json_out:
        from tokenskip.fileio import write_json_atomic

        write_json_atomic(json_out, report)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
