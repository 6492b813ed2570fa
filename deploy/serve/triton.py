"""A Triton Inference Server model repository for an export (`tokenskip triton-repo`).

Two models per export, the two graphs tokenskip runs: `<name>_prefill` (input_ids, attention_mask
-> logits, present.*) and `<name>_decode` (input_ids, position_ids, past.* -> logits, present.*).
- ONNX Runtime backend (default): the export's own .onnx files (+ external data) in version 1.
  The tokenskip custom ops carry ONNX function bodies, so ONNX Runtime - the runtime inside
  Triton's onnxruntime backend - runs them with standard ops.
- TensorRT backend (`--engine DIR`): the engines as model.plan, the plugin library copied under
  plugins/; tritonserver must load it (`--backend-config=tensorrt,plugins=<repo>/plugins/<lib>`).
  Triton's TensorRT backend links full TensorRT, so engines built with TensorRT-RTX do not load.

Both models are stateless (max_batch_size 0, every dim as the graph declares it, -1 where
dynamic): the client runs the generation loop and carries the cache from `present.*` to `past.*`
between calls, as deploy/backends.py OrtBackend does in process. Shapes and dtypes come from the
export sidecar (export.json), the same description the runtimes read.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from tokenskip.errors import UserError

TRITON_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "float32": "TYPE_FP32",
                "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int8": "TYPE_INT8"}
PARTS = ("prefill", "decode")


def _tensor(name: str, spec: dict) -> str:
    dtype = TRITON_TYPES.get(spec["dtype"])
    if dtype is None:
        raise UserError(f"export.json: tensor {name} has dtype {spec['dtype']}, which Triton cannot serve")
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec["shape"])
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'


def config_pbtxt(model: str, graph: dict, *, backend: str, filename: str, kind: str) -> str:
    """Triton's model configuration (protobuf text format) for one graph of the export."""
    head = (f'name: "{model}"\n' + ('backend: "onnxruntime"\n' if backend == "onnxruntime"
                                   else 'platform: "tensorrt_plan"\n')
            + f'default_model_filename: "{filename}"\nmax_batch_size: 0\n')
    inputs = ",\n".join(_tensor(n, graph["inputs"][n]) for n in graph.get("input_order") or graph["inputs"])
    outputs = ",\n".join(_tensor(n, graph["outputs"][n]) for n in graph.get("output_order") or graph["outputs"])
    return (head + f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            + f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n")


def write_triton_repo(export_dir: str | Path, out_dir: str | Path, *, engine_dir: str | Path | None = None,
                      name: str | None = None, kind: str = "KIND_GPU", force: bool = False) -> dict:
    """Write the repository into out_dir (atomically: a temporary folder renamed into place)."""
    from tokenskip.deploy.backends import read_export
    from tokenskip.deploy.engine_build import _place
    from tokenskip.export.exporter import _move_into_place

    export_dir, out = Path(export_dir), Path(out_dir)
    meta = read_export(export_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: not empty (pass --force to replace it)")
    name = name or re.sub(r"[^A-Za-z0-9_]", "_", export_dir.resolve().name)
    engines: dict[str, Path] = {}
    plugin = None
    if engine_dir is not None:
        engine_dir = Path(engine_dir)
        sidecar = engine_dir / "engine.json"
        from tokenskip.fileio import read_json

        emeta = read_json(sidecar, "engine sidecar")
        if emeta.get("backend") not in (None, "tensorrt"):
            raise UserError(f"--engine {engine_dir}: built with {emeta.get('backend')}; Triton's TensorRT backend "
                            "loads engines of full TensorRT only (rebuild with `tokenskip build --backend tensorrt`)")
        for part in PARTS:
            engines[part] = engine_dir / f"{part}.engine"
            if not engines[part].is_file():
                raise UserError(f"--engine {engine_dir}: {engines[part].name} is missing")
        if emeta.get("plugin_library"):
            plugin = engine_dir / emeta["plugin_library"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.triton-", dir=out.parent))
    models = {}
    try:
        for part in PARTS:
            graph = meta["graphs"][part]
            model = f"{name}_{part}"
            version = tmp / model / "1"
            version.mkdir(parents=True)
            if engine_dir is None:
                filename, backend = graph["file"], "onnxruntime"
                _place(export_dir / graph["file"], version / graph["file"])
                data = graph.get("data")
                if data and (export_dir / data).is_file():  # external weights, referenced by this name
                    _place(export_dir / data, version / data)
            else:
                filename, backend = "model.plan", "tensorrt"
                _place(engines[part], version / filename)
            (tmp / model / "config.pbtxt").write_text(
                config_pbtxt(model, graph, backend=backend, filename=filename, kind=kind), encoding="utf-8")
            models[part] = model
        if plugin is not None:
            (tmp / "plugins").mkdir()
            _place(plugin, tmp / "plugins" / plugin.name)
        _move_into_place(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"repository": str(out), "models": models, "backend": "tensorrt" if engine_dir else "onnxruntime",
            "plugin_library": f"plugins/{plugin.name}" if plugin else None}
