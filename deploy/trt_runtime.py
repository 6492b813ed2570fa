"""TensorRT engine runtime for generation: the same prefill/decode interface as the other backends.

Written against the TensorRT >= 10 Python API (name-based I/O: set_input_shape,
set_tensor_address, execute_async_v3). `tensorrt` and `tensorrt_rtx` are both accepted; either is
imported only when an engine is opened. Device buffers are torch CUDA tensors (no pycuda needed);
one execution context per optimisation profile, all on one CUDA stream.

Engine folder (written by `tokenskip build`): prefill and decode engines plus a JSON sidecar.
The sidecar's compute capability is checked against this GPU before deserialising, so an engine
built for another GPU fails with one clear line instead of a TensorRT log dump.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tokenskip.errors import UserError
from tokenskip.fileio import read_json

from .tensorrt_backend import BACKENDS

ENGINE_SIDECAR = "engine.json"


def import_tensorrt(flavour: str):
    """The TensorRT module the engine was built with (engine.json's backend), never another one."""
    from . import tensorrt_backend

    try:
        return tensorrt_backend.get_backend(flavour).trt
    except UserError as exc:
        raise UserError(f"this engine was built with {flavour} (engine.json), which cannot be imported here: "
                        f"{exc.message}") from None


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.BOOL: torch.bool}
    for attr, tdt in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("INT8", torch.int8)):
        if hasattr(trt.DataType, attr):
            table[getattr(trt.DataType, attr)] = tdt
    return table[dt]


def read_engine_dir(engine_dir: str | Path) -> tuple[dict, dict[str, Path]]:
    """(engine.json, {graph: engine path}). engine.json is written last by `tokenskip build`: a
    folder without it is an unfinished build and is refused (its engine files are never guessed)."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise UserError(f"--engine {engine_dir}: no such folder (build one with `tokenskip build EXPORT --out DIR`)")
    path = engine_dir / ENGINE_SIDECAR
    if not path.is_file():
        raise UserError(f"--engine {engine_dir}: no {ENGINE_SIDECAR}, so the build did not finish: run "
                        "`tokenskip build EXPORT --out DIR` again")
    meta = read_json(path, "engine sidecar")
    listed = meta.get("engines") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != "tokenskip-engines" or not isinstance(listed, dict):
        raise UserError(f"{path}: not a tokenskip engine folder sidecar (rebuild with `tokenskip build`)")
    if meta.get("backend") not in BACKENDS:
        raise UserError(f"{path}: 'backend' is {meta.get('backend')!r}, expected one of {', '.join(BACKENDS)} "
                        "(rebuild with `tokenskip build`)")
    files: dict[str, Path] = {}
    for part, entry in listed.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise UserError(f"{path}: engines.{part}.file is missing (rebuild with `tokenskip build`)")
        if not (engine_dir / name).is_file():
            raise UserError(f"--engine {engine_dir}: {name} is missing (named in {ENGINE_SIDECAR})")
        files[part] = engine_dir / name
    for part in ("prefill", "decode"):
        if part not in files:
            raise UserError(f"{path}: no {part} engine listed (rebuild with `tokenskip build`)")
    return meta, files


def check_gpu(meta: dict, engine_dir: Path) -> None:
    """Refuse, in one line, a GPU the engine was not built for (engine.json's compute_capabilities)."""
    if not torch.cuda.is_available():
        raise UserError(f"--engine {engine_dir}: TensorRT engines need a CUDA GPU and none is visible")
    major, minor = torch.cuda.get_device_capability()
    here = f"{major}.{minor}"
    targets = meta.get("compute_capabilities")
    if not isinstance(targets, list) or not targets:
        raise UserError(f"--engine {engine_dir}: {ENGINE_SIDECAR} records no compute capabilities (built by an "
                        "older tokenskip): rebuild it with `tokenskip build`")
    if here not in targets:
        hint = ("TensorRT-RTX does not run on this GPU: build with --backend tensorrt on this machine"
                if meta.get("backend") == "tensorrt-rtx" else "rebuild it here with `tokenskip build`")
        raise UserError(f"--engine {engine_dir} was built for compute capability {', '.join(map(str, targets))}; "
                        f"this GPU ({torch.cuda.get_device_name()}) is {here}: {hint}")


class _Engine:
    """One deserialised engine: its contexts (one per profile) and I/O tensor names."""

    def __init__(self, trt, runtime, path: Path, stream: torch.cuda.Stream) -> None:
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path}: TensorRT could not deserialise the engine (built for another GPU or TensorRT "
                            "version, or its plugin library is not loaded): rebuild it with `tokenskip build`")
        self.stream = stream
        n = self.engine.num_io_tensors
        names = [self.engine.get_tensor_name(i) for i in range(n)]
        self.inputs = [x for x in names if self.engine.get_tensor_mode(x) == trt.TensorIOMode.INPUT]
        self.outputs = [x for x in names if x not in self.inputs]
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, stream.cuda_stream)
            self.contexts.append(ctx)

    def profile_range(self, name: str, profile: int):
        return self.engine.get_tensor_profile_shape(name, profile)  # (min, opt, max)

    def max_dim(self, name: str, axis: int) -> int:
        return max(self.profile_range(name, p)[2][axis] for p in range(len(self.contexts)))

    def _pick(self, shapes: dict[str, tuple]) -> int:
        for p in range(len(self.contexts)):
            ok = True
            for name, shape in shapes.items():
                lo, _, hi = self.profile_range(name, p)
                ok &= all(a <= s <= b for a, s, b in zip(lo, shape, hi))
            if ok:
                return p
        raise UserError(f"input shapes {shapes} fit no optimisation profile of this engine: rebuild it with larger "
                        "--max-seq-len / --max-batch")

    def run(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        trt = self.trt
        feeds = {n: feeds[n].to("cuda", _torch_dtype(trt, self.engine.get_tensor_dtype(n))).contiguous()
                 for n in self.inputs}
        ctx = self.contexts[self._pick({n: tuple(t.shape) for n, t in feeds.items()})]
        for n, t in feeds.items():
            ctx.set_input_shape(n, tuple(t.shape))
            ctx.set_tensor_address(n, t.data_ptr())
        outs = {}
        for n in self.outputs:
            shape = tuple(ctx.get_tensor_shape(n))
            outs[n] = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(n)), device="cuda")
            ctx.set_tensor_address(n, outs[n].data_ptr())
        with torch.cuda.stream(self.stream):
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return outs


class TrtBackend:
    name = "trt"

    def __init__(self, engine_dir: str | Path) -> None:
        self.dir = Path(engine_dir)
        meta, files = read_engine_dir(self.dir)
        check_gpu(meta, self.dir)
        trt = import_tensorrt(meta["backend"])
        logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(logger, "")
        lib = meta.get("plugin_library")
        if lib:
            trt.get_plugin_registry().load_library(str(self.dir / lib))
        self.runtime = trt.Runtime(logger)
        self.stream = torch.cuda.Stream()
        self.engines = {part: _Engine(trt, self.runtime, path, self.stream) for part, path in files.items()}
        self.max_length = meta.get("max_length") or meta.get("max_seq_len") or \
            self.engines["prefill"].max_dim("input_ids", 1)
        self.stats: dict = {}

    def check_length(self, prompt: int, new: int) -> None:
        if prompt + new > self.max_length:
            raise UserError(f"prompt of {prompt} tokens + {new} new tokens = {prompt + new} exceeds the engine's "
                            f"maximum length {self.max_length} ({self.dir}): shorten the prompt or rebuild with a "
                            "larger --max-seq-len")

    def _split(self, outs: dict[str, Tensor]):
        logits = outs["logits"].float()
        if logits.dim() == 3:
            logits = logits[:, -1]
        cache = {"past." + n[len("present."):]: t for n, t in outs.items() if n.startswith("present.")}
        return logits.cpu(), cache

    def prefill(self, ids: Tensor, mask: Tensor):
        return self._split(self.engines["prefill"].run({"input_ids": ids, "attention_mask": mask}))

    def decode(self, token: Tensor, position: Tensor, cache):
        return self._split(self.engines["decode"].run({"input_ids": token, "position_ids": position, **cache}))
