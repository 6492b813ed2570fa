"""What running a TensorRT engine takes besides the backend's logic: the device and its stream,
execution contexts (one per profile, sharing one activation buffer), aligned buffers, checked
calls, and TensorRT-RTX's runtime cache. Used by trt_backend.py; no TensorRT import here.

- TensorRT requires every I/O address to be 256-byte aligned (IExecutionContext::setTensorAddress:
  "The pointer must have at least 256-byte alignment") and returns False otherwise. torch's CUDA
  allocator starts blocks on 512 bytes, its CPU allocator only on 64, and a view into a buffer
  (the KV cache's next slot, `base + n * row_bytes`) is aligned only when the row happens to be:
  `aligned_empty` allocates aligned, `realign` re-homes a misaligned buffer, and an output whose
  destination is misaligned is written to an aligned staging buffer and copied in after the run.
- Every TensorRT call that reports failure through its return value (set_optimization_profile_async,
  set_input_shape, set_tensor_address, infer_shapes, execute_async_v3, set_runtime_cache) is
  checked here, and a failure names the tensor and its shape.
- TensorRT-RTX compiles its kernels for the GPU when an engine first runs a shape; its runtime
  cache (IRuntimeConfig.set_runtime_cache) keeps them, and `RuntimeCache` persists it next to the
  engine (or in the user cache when the engine folder is read-only), written atomically.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from tokenskip.fileio import cache_dir, write_bytes_atomic

ALIGNMENT = 256  # bytes, every TensorRT I/O address


def address(t: Tensor) -> int:
    return t.data_ptr()


def is_aligned(t: Tensor) -> bool:
    return t.data_ptr() % ALIGNMENT == 0


def aligned_empty(shape, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised contiguous tensor whose data starts on a 256-byte boundary."""
    shape = tuple(int(d) for d in shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    skip = (-raw.data_ptr()) % ALIGNMENT
    return raw[skip:skip + nbytes].view(dtype).view(shape)


def realign(t: Tensor) -> Tensor:
    """t itself when aligned, else an aligned copy (one copy; CUDA allocations never need it)."""
    if is_aligned(t):
        return t
    out = aligned_empty(t.shape, t.dtype, t.device)
    out.copy_(t)
    return out


def copy_all(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """dst.copy_(src) for every pair, batched into multi-tensor launches on the current stream."""
    if pairs:
        dsts, srcs = zip(*pairs)
        torch._foreach_copy_(list(dsts), list(srcs))


# ------------------------------------------------------------------------------------ contexts
class CudaDevice:
    """Where the runtime's buffers live, and the one stream every copy and execution goes on."""

    def __init__(self) -> None:
        self.torch = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream()
        self.name = torch.cuda.get_device_name(self.torch)

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream

    def on_stream(self):
        return torch.cuda.stream(self.stream)

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src, non_blocking=True)  # issued on the current stream: ours, inside on_stream()


def create_contexts(trt, engine, profiles: int, device, runtime_cache: RuntimeCache | None):
    """One execution context per profile sharing one activation buffer (TensorRT 10's user-managed
    allocation; they never run at once), or TensorRT's own allocation where that API is missing.
    TensorRT-RTX contexts get the runtime cache through an IRuntimeConfig. -> (contexts, buffer)"""
    strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
    user_managed = strategy is not None and hasattr(engine, "get_device_memory_size_for_profile_v2")
    strategy = strategy if user_managed else None

    def create():
        if runtime_cache is not None:
            ctx = engine.create_execution_context(runtime_cache.config(strategy))
        else:
            ctx = engine.create_execution_context(strategy) if user_managed else engine.create_execution_context()
        if ctx is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        return ctx

    contexts = [create() for _ in range(profiles)]
    if not user_managed:
        return contexts, None
    size = max(int(engine.get_device_memory_size_for_profile_v2(p)) for p in range(profiles))
    scratch = aligned_empty((max(size, 1),), torch.uint8, device.torch)
    for ctx in contexts:
        ctx.set_device_memory(scratch.data_ptr(), size)
    return contexts, scratch


# ------------------------------------------------------------------------------------ checked calls
def select_profile(ctx, index: int, name: str, stream: int) -> None:
    if not ctx.set_optimization_profile_async(index, stream):
        raise RuntimeError(f"TensorRT refused optimisation profile {index} ({name}) for an execution context")


def set_input(ctx, name: str, t: Tensor, profile: str) -> None:
    shape = tuple(t.shape)
    if not ctx.set_input_shape(name, shape):
        raise RuntimeError(f"TensorRT refused input {name} of shape {shape} in the {profile} profile "
                           "(see the TensorRT log above)")
    bind(ctx, name, t)


def bind(ctx, name: str, t: Tensor) -> None:
    ptr = address(t)
    if not ctx.set_tensor_address(name, ptr):
        why = f", not {ALIGNMENT}-byte aligned" if ptr % ALIGNMENT else ""
        raise RuntimeError(f"TensorRT refused the address of {name} (shape {tuple(t.shape)}, {t.dtype}, "
                           f"address {ptr:#x}{why})")


def check_shapes(ctx, phase: str) -> None:
    """infer_shapes(): every input shape and shape-tensor address is set (names what is missing)."""
    missing = list(ctx.infer_shapes())
    if missing:
        raise RuntimeError(f"TensorRT cannot infer the {phase} output shapes: {', '.join(missing)} not specified")


def execute(ctx, stream: int, phase: str, shapes: dict[str, tuple]) -> None:
    if not ctx.execute_async_v3(stream):
        given = ", ".join(f"{n} {s}" for n, s in shapes.items() if not n.startswith("past.")) or "none"
        raise RuntimeError(f"TensorRT execute_async_v3 failed in the {phase} step ({given}); see the TensorRT log")


# ------------------------------------------------------------------------------------ TensorRT-RTX
def runtime_cache_path(engine_dir: Path, gpu: str) -> Path:
    """`runtime-<gpu>.cache` in the engine folder, or (read-only folder) in the user cache under a
    key of the folder's path and engine.json; per GPU model, since the kernels are."""
    tag = "".join(c if c.isalnum() else "-" for c in gpu).strip("-").lower() or "gpu"
    name = f"runtime-{tag}.cache"
    if os.access(engine_dir, os.W_OK):
        return engine_dir / name
    key = hashlib.sha256(str(engine_dir.resolve()).encode() + (engine_dir / "engine.json").read_bytes())
    return cache_dir() / "trt-runtime" / key.hexdigest()[:20] / name


class RuntimeCache:
    """One TensorRT-RTX runtime cache shared by the engine's execution contexts, loaded from and
    saved to `path`. A cache from another driver/GPU/TensorRT-RTX is refused by `deserialize`
    (returns False): that is expected after an upgrade, so it is reported and replaced, not fatal."""

    def __init__(self, engine, path: Path) -> None:
        self.engine, self.path = engine, path
        self.cache = engine.create_runtime_config().create_runtime_cache()
        self.loaded = False
        if path.is_file():
            self.loaded = bool(self.cache.deserialize(path.read_bytes()))
            if not self.loaded:
                print(f"tokenskip: {path} was written by another GPU, driver or TensorRT-RTX; TensorRT-RTX "
                      "recompiles its kernels and the file is replaced", file=sys.stderr)

    def config(self, strategy):
        """A fresh IRuntimeConfig with this cache and the allocation strategy (None: TensorRT's)."""
        config = self.engine.create_runtime_config()
        if strategy is not None:
            config.set_execution_context_allocation_strategy(strategy)
        if not config.set_runtime_cache(self.cache):
            raise RuntimeError(f"TensorRT-RTX refused its runtime cache ({self.path})")
        return config

    def save(self) -> None:
        write_bytes_atomic(self.path, bytes(self.cache.serialize()))
