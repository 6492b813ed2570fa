"""Call the plugin library's C kernel entry points on torch CUDA tensors (no TensorRT needed).

Used by the GPU tests and the kernel benchmark: it lets the very kernels the TensorRT plugins run
be checked against `tokenskip.ops_reference` and timed against PyTorch. Calls are asynchronous on
torch's current CUDA stream.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_INDEX = {"int32": "i32", "int64": "i64"}
_c_int, _c_ptr, _c_size = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t


@functools.lru_cache(maxsize=None)
def load(lib: str | os.PathLike) -> ctypes.CDLL:
    """dlopen the plugin library and declare the entry point signatures."""
    handle = ctypes.CDLL(str(Path(lib).resolve()))
    for dt in _DTYPES.values():
        for it in _INDEX.values():
            fn = getattr(handle, f"tokenskip_topk_gather_{dt}_{it}")
            fn.argtypes = [_c_ptr, _c_ptr, _c_int, _c_int, _c_int, _c_int, _c_ptr, _c_ptr, _c_ptr, _c_ptr]
            fn.restype = _c_int
            fn = getattr(handle, f"tokenskip_scatter_tokens_{dt}_{it}")
            fn.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int, _c_int, _c_int, _c_int, _c_ptr, _c_ptr, _c_ptr]
            fn.restype = _c_int
    for it in _INDEX.values():
        fn = getattr(handle, f"tokenskip_topk_select_{it}")
        fn.argtypes = [_c_ptr, _c_int, _c_int, _c_int, _c_ptr, _c_ptr, _c_ptr]
        fn.restype = _c_int
    for name in ("tokenskip_topk_gather_workspace_size", "tokenskip_scatter_tokens_workspace_size"):
        getattr(handle, name).argtypes = [_c_int] * 4
        getattr(handle, name).restype = _c_size
    handle.tokenskip_keep_count.argtypes = [ctypes.c_int64] * 4
    handle.tokenskip_keep_count.restype = ctypes.c_int64
    return handle


def _suffix(tensor, index_dtype) -> tuple[str, str]:
    dt = str(tensor.dtype).removeprefix("torch.")
    it = str(index_dtype).removeprefix("torch.")
    if dt not in _DTYPES or it not in _INDEX:
        raise TypeError(f"unsupported dtypes {tensor.dtype} / {index_dtype}")
    return _DTYPES[dt], _INDEX[it]


def _check(tensors, names) -> None:
    for t, n in zip(tensors, names):
        if not t.is_cuda or not t.is_contiguous():
            raise ValueError(f"{n} must be a contiguous CUDA tensor")


def _stream() -> int:
    import torch

    return torch.cuda.current_stream().cuda_stream


def _raise(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed with cudaError {code}")


def workspace(lib, name: str, B: int, S: int, H: int, k: int):
    import torch

    size = getattr(load(lib), f"tokenskip_{name}_workspace_size")(B, S, H, k)
    return torch.empty(max(int(size), 1), dtype=torch.uint8, device="cuda")


def topk_gather(lib, hidden, scores, k: int, index_dtype=None):
    """hidden [B,S,H] (fp32/fp16/bf16), scores [B,S] fp32 -> kept [B,k,H], index [B,k] ascending."""
    import torch

    index_dtype = index_dtype or torch.int64
    _check((hidden, scores), ("hidden", "scores"))
    B, S, H = hidden.shape
    kept = torch.empty((B, k, H), dtype=hidden.dtype, device=hidden.device)
    index = torch.empty((B, k), dtype=index_dtype, device=hidden.device)
    ws = workspace(lib, "topk_gather", B, S, H, k)
    dt, it = _suffix(hidden, index_dtype)
    code = getattr(load(lib), f"tokenskip_topk_gather_{dt}_{it}")(
        hidden.data_ptr(), scores.data_ptr(), B, S, H, k, kept.data_ptr(), index.data_ptr(), ws.data_ptr(), _stream())
    _raise(code, "topk_gather")
    return kept, index


def topk_select(lib, scores, k: int, index_dtype=None):
    """scores [B,S] fp32 -> index [B,k] ascending (selection kernel only)."""
    import torch

    index_dtype = index_dtype or torch.int64
    _check((scores,), ("scores",))
    B, S = scores.shape
    index = torch.empty((B, k), dtype=index_dtype, device=scores.device)
    it = _INDEX[str(index_dtype).removeprefix("torch.")]
    code = getattr(load(lib), f"tokenskip_topk_select_{it}")(scores.data_ptr(), B, S, k, index.data_ptr(), None,
                                                             _stream())
    _raise(code, "topk_select")
    return index


def scatter_tokens(lib, hidden, delta, index, out=None, ws=None):
    """hidden [B,S,H] + delta [B,k,H] at index [B,k] -> out [B,S,H] (new tensor unless given)."""
    import torch

    _check((hidden, delta, index), ("hidden", "delta", "index"))
    B, S, H = hidden.shape
    k = delta.shape[1]
    out = torch.empty_like(hidden) if out is None else out
    ws = workspace(lib, "scatter_tokens", B, S, H, k) if ws is None else ws
    dt, it = _suffix(hidden, index.dtype)
    code = getattr(load(lib), f"tokenskip_scatter_tokens_{dt}_{it}")(
        hidden.data_ptr(), delta.data_ptr(), index.data_ptr(), B, S, H, k, out.data_ptr(), ws.data_ptr(), _stream())
    _raise(code, "scatter_tokens")
    return out
