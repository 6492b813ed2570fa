"""The export sidecar (export.json): its file names and its ONE reader.

Every consumer (validation, the ONNX Runtime backend, the engine builder, the benchmarks) reads an
export folder through `read_export`, so a missing or malformed field is reported once, the same
way, as a one-line UserError naming the file and the field. Nothing here imports onnx: the
runtimes read exports without the export toolchain.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenskip.errors import UserError
from tokenskip.fileio import read_json

FORMAT = "tokenskip-export"
VERSION = 2  # 2: one graph (prefill + decode) with sequence-major past inputs; 1 had two graphs
SIDECAR = "export.json"
MODEL_FILE = "model.onnx"
TOKENIZER_DIR, ROUTING_DIR = "tokenizer", "routing"
GRAPHS = ("model",)
CACHE_LAYOUT = "seq-major"  # past.{l}.key [T,B,nkv,d], past.{l}.pos [T,B]
DTYPE_NAMES = ("fp32", "fp16", "bf16")


def _fail(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what} (re-export with `tokenskip export`)")


def _check_io(path: Path, graph: str, entry: dict) -> None:
    for side in ("inputs", "outputs"):
        specs = entry.get(side, {})
        if not isinstance(specs, dict):
            raise _fail(path, f"graphs.{graph}.{side} is not an object")
        for name, spec in specs.items():
            if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str)
                    and isinstance(spec.get("shape"), list)
                    and all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in spec["shape"])):
                raise _fail(path, f"graphs.{graph}.{side}.{name} needs a dtype string and a shape list")


def read_export(export_dir: str | os.PathLike, flag: str = "export folder", required: tuple[str, ...] = GRAPHS) -> dict:
    """The validated sidecar of an export folder (a dict, as written by the exporter).

    Checks the format and version, that every graph entry (at least those in `required`) names a
    file present on disk with its external data, and the types of the fields the runtimes use.
    `flag` names the option the folder came from (--onnx, EXPORT_DIR, ...) in error messages."""
    d = Path(export_dir)
    if not d.is_dir():
        raise UserError(f"{flag} {d}: no such export folder (write one with `tokenskip export --out DIR`)")
    path = d / SIDECAR
    if not path.is_file():
        raise UserError(f"{flag} {d}: {SIDECAR} not found, so this is not a `tokenskip export` folder")
    side = read_json(path, "export sidecar")
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        raise UserError(f"{path}: not a tokenskip export (format != {FORMAT!r})")
    if side.get("version") != VERSION:
        raise _fail(path, f"export version {side.get('version')!r}, this tokenskip reads {VERSION}"
                    + (" (version 1 had separate prefill/decode graphs)" if side.get("version") == 1 else ""))
    entries = side.get("graphs")
    if not isinstance(entries, dict):
        raise _fail(path, "'graphs' is not an object")
    for graph in dict.fromkeys([*required, *entries]):
        entry = entries.get(graph)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise _fail(path, f"graphs.{graph}.file is missing")
        f = d / entry["file"]
        if not f.is_file():
            raise UserError(f"{d}: {f.name} is missing (named in {SIDECAR} graphs.{graph}.file)")
        data = entry.get("data")
        if data is not None and (not isinstance(data, str) or not (d / data).is_file()):
            raise UserError(f"{d}: the weights file {data} of {f.name} is missing (named in {SIDECAR} "
                            f"graphs.{graph}.data)")
        _check_io(path, graph, entry)
    dtype = side.get("dtype", "fp32")
    if dtype not in DTYPE_NAMES:
        raise _fail(path, f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    msl = side.get("max_seq_len")
    if msl is not None and (not isinstance(msl, int) or isinstance(msl, bool) or msl < 2):
        raise _fail(path, f"max_seq_len {msl!r} is not an integer >= 2")
    for key in ("tokenizer", "routers"):
        if side.get(key) is not None and not isinstance(side[key], str):
            raise _fail(path, f"'{key}' is not a folder name")
    layers = side.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(x, dict) and isinstance(x.get("layer"), int) for x in layers):
        raise _fail(path, "'layers' is not a list of layer entries")
    cfg = side.get("config", {})
    if not isinstance(cfg, dict):
        raise _fail(path, "'config' is not an object")
    cache = side.get("cache")
    if not (isinstance(cache, dict) and cache.get("layout") == CACHE_LAYOUT and isinstance(cache.get("layers"), list)
            and all(isinstance(li, int) and not isinstance(li, bool) for li in cache["layers"])):
        raise _fail(path, f"'cache' needs layout {CACHE_LAYOUT!r} and a list of layer numbers")
    for key in ("num_key_value_heads", "head_dim", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise _fail(path, f"config.{key} is not a positive integer")
    return side


def export_max_length(side: dict) -> int | None:
    """The longest sequence (prompt + generated tokens) an export was traced for."""
    value = side.get("max_seq_len")
    return value if isinstance(value, int) and value > 0 else None
