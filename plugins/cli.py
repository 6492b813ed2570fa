"""`tokenskip plugins ...`: build the TensorRT plugin library."""

from __future__ import annotations

import json

import click


@click.group("plugins")
def plugins() -> None:
    """TensorRT plugins (TopKGather, ScatterTokens): build the CUDA library."""


@plugins.command("build")
@click.option("--arch", default=None, metavar="LIST",
              help="Compute capabilities, e.g. 90 or 80,86,90 (default: 80,86,89,90,120 + PTX).")
@click.option("--force", is_flag=True, help="Recompile even if a cached build exists.")
@click.option("--kernels-only", is_flag=True,
              help="Only the CUDA kernels' C entry points (libtokenskip_kernels.so): no TensorRT headers needed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the path.")
def build_cmd(arch: str | None, force: bool, kernels_only: bool, as_json: bool) -> None:
    """Compile libtokenskip_plugins.so with nvcc and print its path (cached by sources + flags).

    \b
    Examples:
      tokenskip plugins build
      tokenskip plugins build --arch 90 --json
      tokenskip plugins build --arch 90 --kernels-only     # for the GPU kernel tests / benchmark
    """
    from .build import build_library, source_hash

    lib = build_library(arch=arch, force=force, verbose=not as_json, kernels_only=kernels_only)
    if as_json:
        meta_file = lib.parent / "build.json"
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        click.echo(json.dumps({"library": str(lib), "source_hash": source_hash(), "archs": meta.get("archs"),
                               "nvcc": meta.get("nvcc"), "tensorrt_include": meta.get("tensorrt_include")}))
    else:
        click.echo(str(lib))


@plugins.command("bench", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_cmd(args: tuple[str, ...]) -> None:
    """GPU benchmark of the kernels (CUDA graphs + events): prints a table, --json writes the raw results.

    \b
    Examples:
      tokenskip plugins bench --json bench.json
      tokenskip plugins bench --batch 1 --hidden 4096 --seq 32768 --reps 50
      tokenskip plugins bench --help
    """
    from .bench_kernels import main

    raise SystemExit(main(list(args)))
