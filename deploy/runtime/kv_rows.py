"""Row surgery on a backend's KV cache: keep some rows, or stack caches of different lengths.

The generation loop treats the cache as opaque. Serving needs two more operations: drop the rows
of finished sequences (so a batch does not keep decoding them), and join newly prefilled
sequences to a running batch between decode steps (continuous batching). Both work because every
tokenskip cache carries per-row validity: a block attends to a cached key only where `valid` is
True and `pos <= the query's position` (core/block.py attention_allowed), so keys may sit in any
order and invalid filler entries are inert. Stacking two caches of lengths T1 < T2 therefore
left-pads the shorter one with invalid entries (zero keys, pos 0, valid False); selecting rows
drops the leading entries that no kept row can attend to (the padding of rows that left).

Every operation returns a PREALLOCATED cache with room for `room` more tokens per layer (the
decode steps its rows still need), so the decode steps until the next regrouping write in place
and allocate nothing; `fit(cache, room)` gives a fresh prefill cache that room (no copy when it
has it). Two op sets live here, each handed out by its backends' `cache_ops()` (base.Backend):
- TORCH_OPS (TorchBackend): a list with one LayerKV per block (None for a removed block),
  key/value [B,nkv,T,d], pos/valid [B,T]; results are `tokenskip.kv_buffer.KVBuffer`s over new stores;
- SEQ_MAJOR_OPS (ONNX Runtime, TensorRT): `kv_cache.KVCache`, sequence-major (key/value
  [T,B,nkv,d], pos/valid [T,B]); results are new KVCaches (their per-cache output buffers are
  re-made by the backend on the next decode, for the new batch size).
A backend whose `cache_ops()` is None gets dynamic batching (finished rows decode padding until
their batch ends); a new backend with its own cache type brings its own CacheOps.

Each operation copies each kept entry once. On CUDA it ends by synchronising the current stream,
because the TensorRT runtime reads the cache on a stream of its own.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tokenskip.block import LayerKV
from tokenskip.kv_buffer import KVBuffer, KVStore

from .base import CacheOps
from .kv_cache import FIELDS, KVCache


def _torch_device(cache) -> torch.device | None:
    return next((kv.key.device for kv in cache if kv is not None), None)


def _seq_major_device(cache: KVCache) -> torch.device | None:
    return next((b["pos"].device for b in cache.buffers.values()), None)


def row_runs(rows: Sequence[int]) -> list[slice]:
    """Batch rows as runs of consecutive indices ([0, 1, 2, 5, 6] -> 0:3, 5:7): each run is a view."""
    runs: list[slice] = []
    for r in rows:
        r = int(r)
        if runs and runs[-1].stop == r:
            runs[-1] = slice(runs[-1].start, r + 1)
        else:
            runs.append(slice(r, r + 1))
    return runs


def first_used(used: Tensor) -> int:
    """used [T] bool: the first entry some row can attend to (T when none)."""
    idx = used.nonzero()
    return int(idx[0]) if idx.numel() else used.shape[0]


# ------------------------------------------------------------------------------------ PyTorch
def _cols(kv: LayerKV, rows: slice, start: int, end: int) -> LayerKV:
    """A view of batch rows `rows` and cache columns start:end."""
    return LayerKV(kv.key[rows, :, start:end], kv.value[rows, :, start:end], kv.pos[rows, start:end],
                   kv.valid[rows, start:end])


def _stack_torch(views: list[LayerKV], room: int) -> KVBuffer:
    """LayerKV views side by side along the batch, in one new store with `room` free columns: each
    right-aligned, the shorter ones left-padded (the store starts zeroed: key 0, valid False)."""
    length = max(v.length for v in views)
    first = views[0]
    batch = sum(v.key.shape[0] for v in views)
    _, heads, _, dim = first.key.shape
    empty = LayerKV(first.key.new_empty(batch, heads, 0, dim), first.value.new_empty(batch, heads, 0, dim),
                    first.pos.new_empty(batch, 0), first.valid.new_empty(batch, 0))
    store = KVStore(empty, length + room)  # [B,nkv,length+room,d], zeros
    row = 0
    for v in views:
        n, pad = v.key.shape[0], length - v.length
        store.key[row:row + n, :, pad:length] = v.key
        store.value[row:row + n, :, pad:length] = v.value
        store.pos[row:row + n, pad:length] = v.pos
        store.valid[row:row + n, pad:length] = v.valid
        row += n
    store.length = length
    return KVBuffer(store, length)


def _select_torch(cache: list, rows: Sequence[int], room: int) -> list:
    runs = row_runs(rows)
    out = []
    for kv in cache:
        if kv is None:
            out.append(None)
            continue
        used = torch.cat([kv.valid[r, :kv.length] for r in runs], 0).any(0)  # [T]
        start = first_used(used)
        out.append(_stack_torch([_cols(kv, r, start, kv.length) for r in runs], room))
    return out


def _concat_torch(caches: Sequence[list], room: int) -> list:
    out = []
    for layer in zip(*caches):
        everything = slice(None)
        out.append(None if layer[0] is None else
                   _stack_torch([_cols(kv, everything, 0, kv.length) for kv in layer], room))
    return out


def _fit_torch(cache: list, room: int) -> list:
    def roomy(kv) -> bool:  # an in-place buffer at the end of its store, with the room free
        return kv is None or (isinstance(kv, KVBuffer) and kv.store.slot is None and kv.upto == kv.store.length
                              and kv.store.capacity - kv.store.length >= room)

    return cache if all(roomy(kv) for kv in cache) else _concat_torch([cache], room)


# ------------------------------------------------------------------ ONNX Runtime / TensorRT
def _stack_seq_major(parts: dict[int, list[dict[str, Tensor]]], room: int) -> KVCache:
    """Per layer, seq-major pasts ({field: [T,b,...]}) side by side along the batch, in a new
    KVCache with `room` free rows per layer: each right-aligned, the shorter ones left-padded."""
    first = next(iter(parts.values()))
    key = first[0]["key"]  # [T,b,nkv,d]
    batch = sum(p["pos"].shape[1] for p in first)
    lengths = {li: max(p["pos"].shape[0] for p in ps) for li, ps in parts.items()}
    out = KVCache.allocate({li: n + room for li, n in lengths.items()}, batch, key.shape[2], key.shape[3],
                           key.dtype, key.device)  # pos/valid zeroed, key/value not
    for li, ps in parts.items():
        bufs, n, col = out.buffers[li], lengths[li], 0
        for p in ps:
            b, pad = p["pos"].shape[1], n - p["pos"].shape[0]
            for f in FIELDS:
                bufs[f][pad:n, col:col + b].copy_(p[f])
            if pad:  # inert filler: zero keys and values (0 x garbage could be NaN), valid False
                bufs["key"][:pad, col:col + b].zero_()
                bufs["value"][:pad, col:col + b].zero_()
            col += b
        out.length[li] = n
    return out


def _select_seq_major(cache: KVCache, rows: Sequence[int], room: int) -> KVCache:
    runs = row_runs(rows)
    parts = {}
    for li in cache.layers:
        past = cache.past(li)  # {field: [T,B,...]}
        start = first_used(torch.cat([past["valid"][:, r] for r in runs], 1).any(1))  # [T] -> first used row
        parts[li] = [{f: t[start:, r] for f, t in past.items()} for r in runs]
    return _stack_seq_major(parts, room)


def _concat_seq_major(caches: Sequence[KVCache], room: int) -> KVCache:
    return _stack_seq_major({li: [c.past(li) for c in caches] for li in caches[0].layers}, room)


def _fit_seq_major(cache: KVCache, room: int) -> KVCache:
    cache.reserve(room)  # grows (one copy) only when a layer lacks the room
    return cache


TORCH_OPS = CacheOps.synced("torch LayerKV", _select_torch, _concat_torch, _fit_torch, _torch_device)
SEQ_MAJOR_OPS = CacheOps.synced("KVCache (seq-major)", _select_seq_major, _concat_seq_major, _fit_seq_major,
                                _seq_major_device)
