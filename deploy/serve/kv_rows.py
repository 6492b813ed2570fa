"""Row surgery on a backend's KV cache: keep some rows, or stack caches of different lengths.

The generation loop treats the cache as opaque. Serving needs two more operations: drop the rows
of finished sequences (so a batch does not keep decoding them), and join newly prefilled
sequences to a running batch between decode steps (continuous batching). Both work because every
tokenskip cache carries per-row validity: a block attends to a cached key only where `valid` is
True and `pos <= the query's position` (core/block.py attention_allowed), so keys may sit in any
order and invalid filler entries are inert. Stacking two caches of lengths T1 < T2 therefore
left-pads the shorter one with invalid entries.

Two cache layouts are understood, both [B,...] first:
- PyTorch (TorchBackend): a list with one core.block.LayerKV per block (None for a removed block);
- ONNX Runtime (OrtBackend): a dict of numpy arrays named past.{l}.key/value/pos/valid.
A backend with another layout can provide `select_rows(cache, rows)` and `concat_rows(caches)`
methods itself; without either, `cache_ops(backend)` returns None and the scheduler falls back to
dynamic batching (finished rows decode padding until their batch ends).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from tokenskip.block import LayerKV

FIELDS = ("key", "value", "pos", "valid")  # key/value [B,nkv,T,d]; pos/valid [B,T]


class CacheOps:
    """select(cache, rows) -> cache with those rows; concat(caches) -> one cache, rows in order."""

    def __init__(self, select: Callable, concat: Callable, name: str) -> None:
        self.select, self.concat, self.name = select, concat, name


# ------------------------------------------------------------------------------------ PyTorch
def _trim_torch(kv: LayerKV) -> LayerKV:
    """Drop leading key columns no row can attend to (invalid in every row)."""
    used = kv.valid.any(0).nonzero()
    start = int(used[0]) if used.numel() else kv.length
    if start == 0:
        return kv
    return LayerKV(kv.key[:, :, start:], kv.value[:, :, start:], kv.pos[:, start:], kv.valid[:, start:])


def _select_torch(cache: list, rows: Sequence[int]) -> list:
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=_device(cache))
    return [None if kv is None else _trim_torch(LayerKV(kv.key.index_select(0, idx), kv.value.index_select(0, idx),
                                                       kv.pos.index_select(0, idx), kv.valid.index_select(0, idx)))
            for kv in cache]


def _left_pad_torch(kv: LayerKV, length: int) -> LayerKV:
    extra = length - kv.length
    if extra == 0:
        return kv
    b, n, _, d = kv.key.shape
    zk = kv.key.new_zeros(b, n, extra, d)  # [B,nkv,extra,d] inert: valid False
    return LayerKV(torch.cat([zk, kv.key], 2), torch.cat([zk, kv.value], 2),
                   torch.cat([kv.pos.new_zeros(b, extra), kv.pos], 1), torch.cat([kv.valid.new_zeros(b, extra), kv.valid], 1))


def _concat_torch(caches: Sequence[list]) -> list:
    out = []
    for layer in zip(*caches):
        if layer[0] is None:
            out.append(None)
            continue
        length = max(kv.length for kv in layer)
        padded = [_left_pad_torch(kv, length) for kv in layer]
        out.append(LayerKV(*(torch.cat([getattr(kv, f) for kv in padded], 0) for f in FIELDS)))
    return out


def _device(cache: list):
    return next(kv.key.device for kv in cache if kv is not None)


# ------------------------------------------------------------------------------- ONNX Runtime
def _layers(cache: dict) -> list[str]:
    """'past.{l}' prefixes of a named cache, in layer order."""
    return sorted({n.rsplit(".", 1)[0] for n in cache}, key=lambda p: int(p.split(".")[1]))


def _select_numpy(cache: dict, rows: Sequence[int]) -> dict:
    idx = np.asarray(list(rows), dtype=np.int64)
    out = {}
    for layer in _layers(cache):
        valid = cache[f"{layer}.valid"][idx]  # [b,T]
        used = np.flatnonzero(valid.any(0))
        start = int(used[0]) if used.size else valid.shape[1]
        for f in FIELDS:
            arr = cache[f"{layer}.{f}"][idx]
            out[f"{layer}.{f}"] = np.ascontiguousarray(arr[:, :, start:] if arr.ndim == 4 else arr[:, start:])
    return out


def _concat_numpy(caches: Sequence[dict]) -> dict:
    out = {}
    for layer in _layers(caches[0]):
        length = max(c[f"{layer}.valid"].shape[1] for c in caches)
        for f in FIELDS:
            parts = []
            for c in caches:
                arr = c[f"{layer}.{f}"]
                extra = length - arr.shape[-2 if arr.ndim == 4 else -1]
                if extra:
                    width = [(0, 0)] * arr.ndim
                    width[2 if arr.ndim == 4 else 1] = (extra, 0)
                    arr = np.pad(arr, width)  # zeros: key/value 0, pos 0, valid False
                parts.append(arr)
            out[f"{layer}.{f}"] = np.ascontiguousarray(np.concatenate(parts, 0))
    return out


def _is_torch_cache(cache) -> bool:
    return isinstance(cache, list) and any(isinstance(kv, LayerKV) for kv in cache) and all(
        kv is None or isinstance(kv, LayerKV) for kv in cache)


def _is_numpy_cache(cache) -> bool:
    return (isinstance(cache, dict) and bool(cache) and all(isinstance(v, np.ndarray) for v in cache.values())
            and all(n.startswith("past.") and n.rsplit(".", 1)[1] in FIELDS for n in cache))


def cache_ops(backend, sample_cache) -> CacheOps | None:
    """The row operations for this backend's cache layout, or None when it is not understood."""
    if callable(getattr(backend, "select_rows", None)) and callable(getattr(backend, "concat_rows", None)):
        return CacheOps(backend.select_rows, backend.concat_rows, f"{getattr(backend, 'name', 'backend')} (own)")
    if _is_torch_cache(sample_cache):
        return CacheOps(_select_torch, _concat_torch, "torch LayerKV")
    if _is_numpy_cache(sample_cache):
        return CacheOps(_select_numpy, _concat_numpy, "named numpy past.*")
    return None


def cache_nbytes(cache) -> int:
    """Bytes a cache really holds (padding included): the backend's own count when it has one."""
    if _is_torch_cache(cache):
        return sum(getattr(kv, f).nbytes for kv in cache if kv is not None for f in FIELDS)
    if _is_numpy_cache(cache):
        return sum(int(v.nbytes) for v in cache.values())
    return 0
