"""`tokenskip build EXPORT_DIR --out ENGINE_DIR`: TensorRT engines from an export."""

from __future__ import annotations

import json

import click


@click.command("build")
@click.argument("export_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="Engine folder to write.")
@click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default=None,
              help="TensorRT flavour (default: full TensorRT if installed, else TensorRT-RTX).")
@click.option("--fp16", "precision", flag_value="fp16", default=None, help="Build in fp16.")
@click.option("--bf16", "precision", flag_value="bf16", help="Build in bf16.")
@click.option("--min-seq-len", type=int, default=1, show_default=True, help="Smallest sequence length.")
@click.option("--opt-seq-len", type=int, default=None, help="Length TensorRT tunes for (default 512, clamped).")
@click.option("--max-seq-len", type=int, default=None, help="Largest sequence length (default: the export's).")
@click.option("--max-batch", type=int, default=1, show_default=True,
              help="Largest batch size (recorded in engine.json; `tokenskip serve --engine` batches up to it).")
@click.option("--opt-batch", type=int, default=1, show_default=True, help="Batch size TensorRT tunes for.")
@click.option("--no-plugins", is_flag=True, help="Use the ONNX function bodies instead of the CUDA plugins.")
@click.option("--embed-plugins", is_flag=True, help="Embed the plugin library in the engines.")
@click.option("--plugin-lib", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="A prebuilt libtokenskip_plugins.so (default: build or reuse the cached one).")
@click.option("--compute-capability", "compute_capability", default=None,
              help="TensorRT-RTX target GPUs, e.g. 8.9 or 8.6,12.0 (default 8.0,8.6,8.9,12.0; recorded in "
                   "engine.json and checked when the engine is opened).")
@click.option("--profiles", type=click.Choice(["phases", "shared"]), default="phases", show_default=True,
              help="phases: a prefill profile (S = --opt-seq-len, empty past) and a decode profile (S = 1, past = "
                   "--opt-seq-len) in one engine; shared: one profile for both, tuned for prefill (TensorRT-RTX "
                   "stores the weights once per profile, so this halves an RTX engine).")
@click.option("--timing-cache", type=click.Path(path_type=str), default=None, help="TensorRT timing cache file.")
@click.option("--force", is_flag=True, help="Rebuild even if a cached engine matches.")
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
def build(export_dir: str, out_dir: str, backend: str | None, precision: str | None, min_seq_len: int,
          opt_seq_len: int | None, max_seq_len: int | None, max_batch: int, opt_batch: int, no_plugins: bool,
          embed_plugins: bool, plugin_lib: str | None, compute_capability: str | None, profiles: str,
          timing_cache: str | None, force: bool, as_json: bool) -> None:
    """Build TensorRT engines from EXPORT_DIR (written by `tokenskip export`).

    \b
    Examples:
      tokenskip build out/export --out out/engine
      tokenskip build out/export --out out/engine --backend tensorrt-rtx --compute-capability 8.9
      tokenskip build out/export --out out/engine --max-batch 8 --opt-batch 4 --json
      tokenskip build out/export --out out/engine --profiles shared   # one profile: an RTX engine half the size
    """
    from tokenskip.deploy.engine.build import build_engines, parse_compute_capabilities

    report = build_engines(export_dir, out_dir, backend=backend, precision=precision, min_seq_len=min_seq_len,
                           opt_seq_len=opt_seq_len, max_seq_len=max_seq_len, max_batch=max_batch, opt_batch=opt_batch,
                           plugins=not no_plugins, embed_plugins=embed_plugins, plugin_library=plugin_lib,
                           timing_cache=timing_cache, force=force, profiles=profiles,
                           compute_capabilities=parse_compute_capabilities(compute_capability))
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        for graph, r in report["reports"].items():
            state = "cached" if r["cached"] else f"built in {r['build_seconds']} s"
            click.echo(f"{graph}: {r['engine']} ({r['engine_bytes'] / 1e6:.2f} MB, {state}, "
                       f"{len(r['plugin_layers'])} plugin layers, fallback {sum(r['fallback'].values())})")
        click.echo(f"engine folder: {report['out_dir']}")
