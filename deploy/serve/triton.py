"""A Triton Inference Server model repository for an export (`tokenskip triton-repo`).

One model, `<name>`, for the export's ONE graph (docs/export.md), which serves prefill and decode:
inputs input_ids, attention_mask, position_ids and past.{l}.key/value/pos/valid (sequence-major,
length 0 for a prefill); outputs logits, new.{l}.* (the cache rows the call adds) and index.{l}.
- ONNX Runtime backend (default): the export's model.onnx + model.onnx.data in version 1. The
  tokenskip custom ops carry ONNX function bodies, so ONNX Runtime - the runtime inside Triton's
  onnxruntime backend - runs them with standard ops.
- TensorRT backend (`--engine DIR`): the engine as model.plan, the plugin library copied under
  plugins/; tritonserver must load it (`--backend-config=tensorrt,plugins=<repo>/plugins/<lib>`).
  An engine built with `--profiles phases` has two optimisation profiles; the instance group
  lists both. Triton's TensorRT backend links full TensorRT, so TensorRT-RTX engines do not load.

The model is stateless (max_batch_size 0, every dim as the graph declares it, -1 where dynamic):
the client runs the generation loop and appends each call's `new.*` rows to the `past.*` it sends
next, as deploy/runtime/ort_backend.py OrtBackend does in process. Shapes and dtypes come from the export
sidecar (export.json, read by tokenskip.export.sidecar.read_export), the same description the
runtimes read.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from tokenskip.errors import UserError

TRITON_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "float32": "TYPE_FP32",
                "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int8": "TYPE_INT8"}


def _tensor(name: str, spec: dict) -> str:
    dtype = TRITON_TYPES.get(spec["dtype"])
    if dtype is None:
        raise UserError(f"export.json: tensor {name} has dtype {spec['dtype']}, which Triton cannot serve")
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec["shape"])
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'


def config_pbtxt(model: str, graph: dict, *, backend: str, filename: str, kind: str, profiles: int = 1) -> str:
    """Triton's model configuration (protobuf text format) for the export's graph."""
    head = (f'name: "{model}"\n' + ('backend: "onnxruntime"\n' if backend == "onnxruntime"
                                   else 'platform: "tensorrt_plan"\n')
            + f'default_model_filename: "{filename}"\nmax_batch_size: 0\n')
    inputs = ",\n".join(_tensor(n, graph["inputs"][n]) for n in graph.get("input_order") or graph["inputs"])
    outputs = ",\n".join(_tensor(n, graph["outputs"][n]) for n in graph.get("output_order") or graph["outputs"])
    listed = ", ".join(f'"{p}"' for p in range(profiles))
    profile = f"\n    profile: [ {listed} ]" if profiles > 1 else ""
    return (head + f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            + f"instance_group [\n  {{\n    count: 1\n    kind: {kind}{profile}\n  }}\n]\n")


def _engine(engine_dir: Path, export_dir: Path) -> tuple[Path, Path | None, int]:
    """(engine file, plugin library or None, profile count) of a `tokenskip build` folder, checked
    to be full TensorRT and built from this export."""
    from tokenskip.fileio import read_json

    from ..runtime.trt_backend import ENGINE_SIDECAR, read_engine_dir

    sidecar = engine_dir / ENGINE_SIDECAR
    raw = read_json(sidecar, "engine sidecar") if sidecar.is_file() else {}
    if isinstance(raw, dict) and raw.get("backend") not in (None, "tensorrt"):
        raise UserError(f"--engine {engine_dir}: built with {raw.get('backend')}; Triton's TensorRT backend "
                        "loads engines of full TensorRT only (rebuild with `tokenskip build --backend tensorrt`)")
    meta, files = read_engine_dir(engine_dir)
    source = meta.get("export_dir")
    if isinstance(source, str) and Path(source).is_dir() and Path(source).resolve() != export_dir.resolve():
        raise UserError(f"--engine {engine_dir} was built from the export {source}, not {export_dir}: give that "
                        "export (its export.json describes the engine's inputs and outputs)")
    plugin = engine_dir / meta["plugin_library"] if meta.get("plugin_library") else None
    if plugin is not None and not plugin.is_file():
        raise UserError(f"--engine {engine_dir}: the plugin library {plugin.name} is missing (named in {ENGINE_SIDECAR})")
    return files["model"], plugin, len(meta["engines"]["model"]["profiles"])


def write_triton_repo(export_dir: str | Path, out_dir: str | Path, *, engine_dir: str | Path | None = None,
                      name: str | None = None, kind: str = "KIND_GPU", force: bool = False) -> dict:
    """Write the repository into out_dir (atomically: a temporary folder renamed into place)."""
    from tokenskip.deploy.engine.build import _place
    from tokenskip.export.exporter import _move_into_place
    from tokenskip.export.sidecar import read_export

    export_dir, out = Path(export_dir), Path(out_dir)
    meta = read_export(export_dir, "EXPORT_DIR")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: not empty (pass --force to replace it)")
    name = name or re.sub(r"[^A-Za-z0-9_]", "_", export_dir.resolve().name)
    engine, plugin, profiles = (None, None, 1) if engine_dir is None else _engine(Path(engine_dir), export_dir)
    graph = meta["graphs"]["model"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.triton-", dir=out.parent))
    try:
        version = tmp / name / "1"
        version.mkdir(parents=True)
        if engine is None:
            filename, backend = graph["file"], "onnxruntime"
            _place(export_dir / graph["file"], version / graph["file"])
            if graph.get("data"):  # external weights, referenced by this name (read_export checked it exists)
                _place(export_dir / graph["data"], version / graph["data"])
        else:
            filename, backend = "model.plan", "tensorrt"
            _place(engine, version / filename)
        (tmp / name / "config.pbtxt").write_text(
            config_pbtxt(name, graph, backend=backend, filename=filename, kind=kind, profiles=profiles),
            encoding="utf-8")
        if plugin is not None:
            (tmp / "plugins").mkdir()
            _place(plugin, tmp / "plugins" / plugin.name)
        _move_into_place(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"repository": str(out), "model": name, "backend": backend, "profiles": profiles,
            "plugin_library": f"plugins/{plugin.name}" if plugin else None}
