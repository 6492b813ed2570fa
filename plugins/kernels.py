"""Call the plugin library's C kernel entry points on torch CUDA tensors (no TensorRT needed).

Used by the GPU tests and the kernel benchmark: it lets the very kernels the TensorRT plugins run
be checked against `tokenskip.ops_reference` and timed against PyTorch. Calls are asynchronous on
torch's current CUDA stream. The `*_into` functions take preallocated outputs and workspace and
allocate nothing (the benchmark times them with CUDA events around the kernels only).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_INDEX = {"int32": "i32", "int64": "i64"}
ALGOS = {"auto": 0, "single": 1, "multi": 2}  # TopKGather selection paths
_c_int, _c_ptr, _c_size, _c_i64 = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64


@functools.lru_cache(maxsize=None)
def load(lib: str | os.PathLike) -> ctypes.CDLL:
    """dlopen the plugin library and declare the entry point signatures."""
    handle = ctypes.CDLL(str(Path(lib).resolve()))
    for dt in _DTYPES.values():
        for it in _INDEX.values():
            fn = getattr(handle, f"tokenskip_topk_gather_{dt}_{it}")
            fn.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int, _c_int, _c_int, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr,
                           _c_ptr, _c_ptr]
            fn.restype = _c_int
            fn = getattr(handle, f"tokenskip_scatter_tokens_{dt}_{it}")
            fn.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int, _c_int, _c_int, _c_int, _c_ptr, _c_ptr, _c_ptr]
            fn.restype = _c_int
            fn = getattr(handle, f"tokenskip_scatter_tokens_inplace_{dt}_{it}")
            fn.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int, _c_int, _c_int, _c_int, _c_ptr]
            fn.restype = _c_int
    for it in _INDEX.values():
        fn = getattr(handle, f"tokenskip_topk_select_{it}")
        fn.argtypes = [_c_ptr, _c_ptr, _c_int, _c_int, _c_i64, _c_i64, _c_i64, _c_int, _c_ptr, _c_ptr, _c_ptr]
        fn.restype = _c_int
    handle.tokenskip_topk_gather_workspace_size.argtypes = [_c_int, _c_int]
    handle.tokenskip_topk_gather_workspace_size.restype = _c_size
    handle.tokenskip_topk_select_uses_multi_block.argtypes = [_c_int, _c_int]
    handle.tokenskip_topk_select_uses_multi_block.restype = _c_int
    handle.tokenskip_scatter_tokens_workspace_size.argtypes = [_c_int] * 4
    handle.tokenskip_scatter_tokens_workspace_size.restype = _c_size
    handle.tokenskip_keep_count.argtypes = [_c_i64] * 4
    handle.tokenskip_keep_count.restype = _c_i64
    return handle


def _suffix(tensor, index_dtype) -> tuple[str, str]:
    dt = str(tensor.dtype).removeprefix("torch.")
    it = str(index_dtype).removeprefix("torch.")
    if dt not in _DTYPES or it not in _INDEX:
        raise TypeError(f"unsupported dtypes {tensor.dtype} / {index_dtype}")
    return _DTYPES[dt], _INDEX[it]


def _check(tensors, names) -> None:
    for t, n in zip(tensors, names):
        if t is not None and (not t.is_cuda or not t.is_contiguous()):
            raise ValueError(f"{n} must be a contiguous CUDA tensor")


def _ptr(t) -> int | None:
    return None if t is None else t.data_ptr()


def _stream() -> int:
    import torch

    return torch.cuda.current_stream().cuda_stream


def _raise(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed with cudaError {code}")


def _valid(valid):
    import torch

    if valid is not None and valid.dtype != torch.bool:
        raise TypeError(f"valid must be torch.bool, got {valid.dtype}")
    return valid


def keep_count(lib, n: int, keep: tuple[int, int, int]) -> int:
    return int(load(lib).tokenskip_keep_count(n, *keep))


def topk_workspace(lib, B: int, S: int):
    import torch

    size = load(lib).tokenskip_topk_gather_workspace_size(B, S)
    return torch.empty(max(int(size), 1), dtype=torch.uint8, device="cuda")


def scatter_workspace(lib, B: int, S: int, H: int, k: int):
    import torch

    size = load(lib).tokenskip_scatter_tokens_workspace_size(B, S, H, k)
    return torch.empty(max(int(size), 1), dtype=torch.uint8, device="cuda")


def uses_multi_block(lib, B: int, S: int) -> bool:
    return bool(load(lib).tokenskip_topk_select_uses_multi_block(B, S))


def topk_gather_into(lib, hidden, scores, valid, keep, kept, index, ws) -> None:
    """TopKGather into preallocated kept [B,k,H] / index [B,k]; keep = (keep_num, keep_den, min_keep)."""
    B, S, H = hidden.shape
    dt, it = _suffix(hidden, index.dtype)
    code = getattr(load(lib), f"tokenskip_topk_gather_{dt}_{it}")(
        hidden.data_ptr(), scores.data_ptr(), _ptr(valid), B, S, H, *keep, kept.data_ptr(), index.data_ptr(),
        ws.data_ptr(), _stream())
    _raise(code, "topk_gather")


def topk_gather(lib, hidden, scores, keep, valid=None, index_dtype=None):
    """hidden [B,S,H] (fp32/fp16/bf16), scores [B,S] fp32, valid [B,S] bool or None
    -> kept [B,k,H], index [B,k] ascending, k = keep(S) (docs/ops.md)."""
    import torch

    index_dtype = index_dtype or torch.int64
    _check((hidden, scores, _valid(valid)), ("hidden", "scores", "valid"))
    B, S, H = hidden.shape
    k = keep_count(lib, S, keep)
    kept = torch.empty((B, k, H), dtype=hidden.dtype, device=hidden.device)
    index = torch.empty((B, k), dtype=index_dtype, device=hidden.device)
    topk_gather_into(lib, hidden, scores, valid, keep, kept, index, topk_workspace(lib, B, S))
    return kept, index


def topk_select_into(lib, scores, valid, keep, index, ws, algo: str = "auto") -> None:
    """Selection only into a preallocated index [B,k]; algo: auto, single or multi (block path)."""
    B, S = scores.shape
    it = _INDEX[str(index.dtype).removeprefix("torch.")]
    code = getattr(load(lib), f"tokenskip_topk_select_{it}")(
        scores.data_ptr(), _ptr(valid), B, S, *keep, ALGOS[algo], index.data_ptr(), ws.data_ptr(), _stream())
    _raise(code, "topk_select")


def topk_select(lib, scores, keep, valid=None, algo: str = "auto", index_dtype=None):
    """scores [B,S] fp32 (+ valid [B,S] bool) -> index [B,k] ascending (selection kernels only)."""
    import torch

    index_dtype = index_dtype or torch.int64
    _check((scores, _valid(valid)), ("scores", "valid"))
    B, S = scores.shape
    index = torch.empty((B, keep_count(lib, S, keep)), dtype=index_dtype, device=scores.device)
    topk_select_into(lib, scores, valid, keep, index, topk_workspace(lib, B, S), algo)
    return index


def scatter_tokens_into(lib, hidden, delta, index, out, ws) -> None:
    """ScatterTokens into a preallocated out [B,S,H] (out may be hidden: the in-place kernel)."""
    B, S, H = hidden.shape
    dt, it = _suffix(hidden, index.dtype)
    code = getattr(load(lib), f"tokenskip_scatter_tokens_{dt}_{it}")(
        hidden.data_ptr(), delta.data_ptr(), index.data_ptr(), B, S, H, delta.shape[1], out.data_ptr(),
        ws.data_ptr(), _stream())
    _raise(code, "scatter_tokens")


def scatter_tokens(lib, hidden, delta, index, out=None, ws=None):
    """hidden [B,S,H] + delta [B,k,H] at index [B,k] -> out [B,S,H] (new tensor unless given)."""
    import torch

    _check((hidden, delta, index), ("hidden", "delta", "index"))
    B, S, H = hidden.shape
    out = torch.empty_like(hidden) if out is None else out
    ws = scatter_workspace(lib, B, S, H, delta.shape[1]) if ws is None else ws
    scatter_tokens_into(lib, hidden, delta, index, out, ws)
    return out


def scatter_tokens_inplace(lib, hidden, delta, index) -> None:
    """hidden[b, index[b, j]] += delta[b, j] in place (the kernel an aliased TensorRT build runs)."""
    _check((hidden, delta, index), ("hidden", "delta", "index"))
    B, S, H = hidden.shape
    dt, it = _suffix(hidden, index.dtype)
    code = getattr(load(lib), f"tokenskip_scatter_tokens_inplace_{dt}_{it}")(
        hidden.data_ptr(), delta.data_ptr(), index.data_ptr(), B, S, H, delta.shape[1], _stream())
    _raise(code, "scatter_tokens_inplace")
