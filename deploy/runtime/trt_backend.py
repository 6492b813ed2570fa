"""TensorRT engine runtime for generation: the same prefill/decode interface as the other backends.

Written against the TensorRT 10 Python API (name-based I/O: set_input_shape, set_tensor_address,
execute_async_v3), for the flavour engine.json records (`tensorrt` or TensorRT-RTX), imported
only when an engine is opened. Device buffers are torch CUDA tensors (no pycuda needed).

One engine holds the weights once and serves prefill (S prompt tokens, empty past) and decode (one
token against the cache): with one "shared" optimisation profile, or with a "prefill" and a
"decode" profile (`tokenskip build --profiles phases`), one execution context each, sharing one
activation buffer (they never run at once). Everything is on ONE CUDA stream: input copies, cache
growth, execution and the logits copy-out are all issued on it, in order.

The KV cache is the preallocated `KVCache` (sequence-major, like the graph I/O): the past input
of each layer is bound at the cache buffer's address (only its shape changes from step to step),
and the new-row outputs at the next free slot, so the engine writes K/V in place; the logits and
the token/position inputs use buffers allocated once per cache and reused every step.

The GPU is checked against engine.json's compute capabilities before deserialising, so an engine
built for another GPU fails with one clear line instead of a TensorRT log dump.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tokenskip.errors import UserError
from tokenskip.fileio import read_json
from tokenskip.routed import default_positions

from .kv_cache import FIELDS, KVCache, PreallocatedBackend, host_logits
from ..engine.flavour import FLAVOURS

PHASES = ("prefill", "decode")
PROFILE_SETS = (["shared"], ["prefill", "decode"])  # engine.json's profiles, in engine order

ENGINE_SIDECAR = "engine.json"


def import_tensorrt(flavour: str):
    """The TensorRT module the engine was built with (engine.json's backend), never another one."""
    from ..engine import flavour as flavours

    try:
        return flavours.get_flavour(flavour).trt
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
    if meta.get("backend") not in FLAVOURS:
        raise UserError(f"{path}: 'backend' is {meta.get('backend')!r}, expected one of {', '.join(FLAVOURS)} "
                        "(rebuild with `tokenskip build`)")
    files: dict[str, Path] = {}
    for part, entry in listed.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise UserError(f"{path}: engines.{part}.file is missing (rebuild with `tokenskip build`)")
        if not (engine_dir / name).is_file():
            raise UserError(f"--engine {engine_dir}: {name} is missing (named in {ENGINE_SIDECAR})")
        files[part] = engine_dir / name
    entry = listed.get("model")
    if set(listed) != {"model"} or list(entry.get("profiles") or []) not in PROFILE_SETS:
        raise UserError(f"{path}: expected one engine 'model' with profiles 'shared' or 'prefill, decode' (built by "
                        "an older tokenskip?): re-export and rebuild with `tokenskip export` / `tokenskip build`")
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


class CudaDevice:
    """Where the runtime's buffers live, and the one stream every copy and execution goes on."""

    def __init__(self) -> None:
        self.torch = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream()

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream

    def on_stream(self):
        return torch.cuda.stream(self.stream)

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src, non_blocking=True)  # issued on the current stream: ours, inside on_stream()


def _scratch_contexts(trt, engine, profiles: int, device):
    """One execution context per profile sharing one activation buffer (TensorRT 10's user-managed
    allocation), or TensorRT's own allocation where that API is missing. -> (contexts, buffer)"""
    strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
    if strategy is None or not hasattr(engine, "get_device_memory_size_for_profile_v2"):
        return [engine.create_execution_context() for _ in range(profiles)], None
    size = max(int(engine.get_device_memory_size_for_profile_v2(p)) for p in range(profiles))
    scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=device.torch)
    contexts = []
    for _ in range(profiles):
        ctx = engine.create_execution_context(strategy)
        ctx.set_device_memory(scratch.data_ptr(), size)
        contexts.append(ctx)
    return contexts, scratch


class TrtBackend(PreallocatedBackend):
    """prefill/decode on one TensorRT engine with a prefill and a decode profile (module docstring)."""

    name = "trt"

    def __init__(self, engine_dir: str | Path, *, device=None) -> None:
        self.dir = Path(engine_dir)
        meta, files = read_engine_dir(self.dir)
        if device is None:
            check_gpu(meta, self.dir)
        trt = self.trt = import_tensorrt(meta["backend"])
        self.device = device = device or CudaDevice()
        logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(logger, "")
        if meta.get("plugin_library"):
            trt.get_plugin_registry().load_library(str(self.dir / meta["plugin_library"]))
        self.runtime = trt.Runtime(logger)
        path = files["model"]
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path}: TensorRT could not deserialise the engine (built for another GPU or TensorRT "
                            "version, or its plugin library is not loaded): rebuild it with `tokenskip build`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.layers = sorted(int(n.split(".")[1]) for n in self.inputs if n.startswith("past.") and n.endswith(".key"))
        want = {"input_ids", "attention_mask", "position_ids", *(f"past.{li}.{f}" for li in self.layers for f in FIELDS)}
        if set(self.inputs) != want or "logits" not in self.outputs:
            raise UserError(f"{path}: the engine's inputs/outputs are not a tokenskip export graph's: rebuild it from "
                            "a `tokenskip export` folder")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        key = tuple(self.engine.get_tensor_shape(f"past.{self.layers[0]}.key")) if self.layers else (0, 0, 1, 1)
        self.heads, self.head_dim = int(key[2]), int(key[3])
        self.vocab = int(self.engine.get_tensor_shape("logits")[1])
        self.profiles = list(meta["engines"]["model"]["profiles"])
        if self.engine.num_optimization_profiles != len(self.profiles):
            raise UserError(f"{path}: engine.json lists profiles {', '.join(self.profiles)}, the engine has "
                            f"{self.engine.num_optimization_profiles}: rebuild it with `tokenskip build`")
        with self.device.on_stream():
            contexts, self._scratch = _scratch_contexts(trt, self.engine, len(self.profiles), self.device)
            for p, ctx in enumerate(contexts):
                ctx.set_optimization_profile_async(p, self.device.handle)
            # phase -> (profile index, context): both phases share profile 0 with a shared profile
            self.contexts = {phase: (self.profiles.index(phase) if phase in self.profiles else 0,
                                     contexts[self.profiles.index(phase) if phase in self.profiles else 0])
                             for phase in PHASES}
            self._empty = torch.empty(256, dtype=torch.uint8, device=self.device.torch)  # address for 0-size inputs
        self.max_length = int(meta.get("max_seq_len") or self.engine.get_tensor_profile_shape("input_ids", 0)[2][1])
        self.limit_what = f"engine ({self.dir})"
        self.limit_hint = "shorten the prompt or rebuild with a larger --max-seq-len"
        self.stats: dict = {}

    # -- the interface (check_length, cache_nbytes: PreallocatedBackend) ---------------------------------
    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor):
        bsz, seq = ids.shape
        dev = self.device
        with dev.on_stream():
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": default_positions(mask.bool())}
            inputs = {n: self._upload(n, t) for n, t in feeds.items()}
            for li in self.layers:
                inputs.update({f"past.{li}.key": self._zeros(f"past.{li}.key", (0, bsz, self.heads, self.head_dim)),
                               f"past.{li}.value": self._zeros(f"past.{li}.value", (0, bsz, self.heads, self.head_dim)),
                               f"past.{li}.pos": self._zeros(f"past.{li}.pos", (0, bsz)),
                               f"past.{li}.valid": self._zeros(f"past.{li}.valid", (0, bsz))})
            ctx = self._set_inputs("prefill", inputs)
            shapes = {n: tuple(ctx.get_tensor_shape(n)) for n in self.outputs}
            bad = [n for n, sh in shapes.items() if any(d < 0 for d in sh)]
            if bad:
                raise UserError(f"{self.dir}: output {bad[0]} has a data-dependent shape {shapes[bad[0]]}; this runtime "
                                "needs output shapes that follow from the input shapes")
            rows = {li: shapes[f"new.{li}.key"][0] for li in self.layers}
            cache = KVCache.allocate({li: n + self.reserve for li, n in rows.items()}, bsz, self.heads, self.head_dim,
                                     self.dtypes[f"past.{self.layers[0]}.key"] if self.layers else torch.float32,
                                     dev.torch)
            outputs = {n: torch.empty(sh, dtype=self.dtypes[n], device=dev.torch)
                       for n, sh in shapes.items() if not n.startswith("new.")}
            for li in self.layers:
                outputs.update({f"new.{li}.{f}": v for f, v in cache.slot(li, rows[li]).items()})
            self._execute(ctx, outputs)
            for li in self.layers:
                cache.advance(li, rows[li])
            return host_logits(outputs["logits"]), cache

    @torch.no_grad()
    def decode(self, token: Tensor, position: Tensor, cache: KVCache):
        bsz = token.shape[0]
        dev = self.device
        with dev.on_stream():
            cache.reserve(1)
            bufs = cache.extra
            if "input_ids" not in bufs:  # allocated once per cache, reused every step
                bufs.update({n: torch.empty(bsz, 1, dtype=self.dtypes[n], device=dev.torch)
                             for n in ("input_ids", "position_ids", "attention_mask")})
                bufs["attention_mask"].fill_(1)
                bufs.update({n: torch.empty(bsz, 1, dtype=self.dtypes[n], device=dev.torch)
                             for n in self.outputs if n.startswith("index.")})
                bufs["logits"] = torch.empty(bsz, self.vocab, dtype=self.dtypes["logits"], device=dev.torch)
            dev.copy(bufs["input_ids"], token.to(self.dtypes["input_ids"]))
            dev.copy(bufs["position_ids"], position.to(self.dtypes["position_ids"]))
            inputs = {n: bufs[n] for n in ("input_ids", "attention_mask", "position_ids")}
            for li in self.layers:
                inputs.update({f"past.{li}.{f}": v for f, v in cache.past(li).items()})
            ctx = self._set_inputs("decode", inputs)
            outputs = {n: bufs[n] for n in self.outputs if not n.startswith("new.")}
            for li in self.layers:
                outputs.update({f"new.{li}.{f}": v for f, v in cache.slot(li, 1).items()})
            self._execute(ctx, outputs)
            for li in self.layers:
                cache.advance(li, 1)
            return host_logits(bufs["logits"]), cache

    # -- binding ------------------------------------------------------------------------------------
    def _upload(self, name: str, t: Tensor) -> Tensor:
        dst = torch.empty(t.shape, dtype=self.dtypes[name], device=self.device.torch)
        self.device.copy(dst, t.to(self.dtypes[name]))
        return dst

    def _zeros(self, name: str, shape: tuple) -> Tensor:
        return torch.empty(shape, dtype=self.dtypes[name], device=self.device.torch)

    def _address(self, t: Tensor) -> int:
        return t.data_ptr() if t.numel() else self._empty.data_ptr()

    def _set_inputs(self, phase: str, inputs: dict[str, Tensor]):
        """Check every input against the phase's profile, then set shapes and addresses."""
        p, ctx = self.contexts[phase]
        for n, t in inputs.items():
            lo, _, hi = self.engine.get_tensor_profile_shape(n, p)
            if not all(a <= s <= b for a, s, b in zip(lo, t.shape, hi)):
                raise UserError(f"{n} of shape {tuple(t.shape)} is outside the engine's {self.profiles[p]} profile "
                                f"[{tuple(lo)} .. {tuple(hi)}] ({self.dir}): rebuild with a larger --max-seq-len / "
                                "--max-batch")
        for n, t in inputs.items():
            ctx.set_input_shape(n, tuple(t.shape))
            ctx.set_tensor_address(n, self._address(t))
        return ctx

    def _execute(self, ctx, outputs: dict[str, Tensor]) -> None:
        for n, t in outputs.items():
            ctx.set_tensor_address(n, self._address(t))
        if not ctx.execute_async_v3(self.device.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
