"""CUDA graphs for the routed model: the whole prefill, and decode steps over a static cache.

At S = 1k a 7B prefill is ~30 ms of GPU work, and a routed block adds dozens of small kernels
(router, selection, gathers, scatter): eager PyTorch is then bound by the host launching them.
Routed shapes are static for a given (B, S) (k_l = keep(S) for every row, padding fills the
slots), so the whole prefill can be captured once and replayed (`GraphedPrefill`). A decode step
is static too once the cache is preallocated in static mode (tokenskip.kv_buffer: full-capacity
views, a device-side slot counter that the step advances), so `GraphedDecodeCache` captures one
step bound to its cache and RoutedModel.decode_step replays it.

What cannot be captured: anything that reads tensor values on the host (the random router, the
threshold-skip step). `emulate=True` runs the same plumbing without CUDA (the function is called
where a graph would replay, its outputs copied into the captured ones): the CPU tests use it.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

from .block import LayerKV
from .kv_buffer import DEFAULT_NEW_TOKENS, KVBuffer, preallocate, stores

ENV = "TOKENSKIP_CUDA_GRAPHS"  # "0": never capture (generation then decodes eagerly)
GRAPH_MIN_TOKENS = 16  # a decode capture costs about three steps: worth it from this many tokens


def graphs_enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


class Graph:
    """fn (no arguments: it reads static input tensors) captured once; replay() reruns it and
    returns the tuple of tensors the capture returned, overwritten in place.

    reset() undoes the side effects of the warm-up runs (and of the capture's host code) on state
    the function mutates, such as a cache's write position."""

    def __init__(self, fn: Callable[[], tuple[Tensor, ...]], *, warmup: int = 2, emulate: bool = False,
                 reset: Callable[[], None] = lambda: None) -> None:
        self.fn, self.emulate = fn, emulate
        if emulate:
            for _ in range(warmup):
                fn()
                reset()
            self.outputs = fn()
            reset()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS handles, compiles)
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()
        reset()  # the capture ran only host code; restore what it advanced on the host

    def replay(self) -> tuple[Tensor, ...]:
        if self.emulate:
            for dst, src in zip(self.outputs, self.fn()):
                dst.copy_(src)
        else:
            self.graph.replay()
        return self.outputs


def _flatten(logits: Tensor, cache: list[LayerKV | None]) -> tuple[Tensor, ...]:
    flat = [logits]
    for kv in cache:
        if kv is not None:
            flat += [kv.key, kv.value, kv.pos, kv.valid]
    return tuple(flat)


class GraphedPrefill:
    """RoutedModel.prefill for one (batch, seq) as one CUDA graph.

    padded=False captures the unpadded fast path (causal kernels): every call must then be
    unpadded (checked when the mask is on the CPU). padded=True captures the general path, right
    for any mask. The returned logits and cache live in the graph's memory and are overwritten by
    the next call: copy what you keep."""

    def __init__(self, routed, batch: int, seq: int, *, padded: bool, warmup: int = 2, emulate: bool = False) -> None:
        device = next(routed.model.parameters()).device
        self.padded = padded
        self.ids = torch.zeros(batch, seq, dtype=torch.int64, device=device)  # [B,S] static inputs
        self.mask = torch.ones(batch, seq, dtype=torch.int64, device=device)
        removed = routed.removed_layers
        self.layout = [li not in removed for li in range(len(routed.layers))]

        def fn():
            logits, cache = routed.prefill(self.ids, self.mask, padded=padded)
            return _flatten(logits, cache)

        with torch.no_grad():
            self.graph = Graph(fn, warmup=warmup, emulate=emulate)

    def __call__(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, list[LayerKV | None]]:
        if ids.shape != self.ids.shape:
            raise ValueError(f"this graph was captured for ids {tuple(self.ids.shape)}, got {tuple(ids.shape)}")
        if not self.padded and not mask.is_cuda and not bool(mask.all()):
            raise ValueError("this graph was captured for unpadded rows (padded=False), but the mask has padding")
        self.ids.copy_(ids)
        self.mask.copy_(mask)
        out = self.graph.replay()
        cache, i = [], 1
        for present in self.layout:
            if present:
                cache.append(LayerKV(*out[i:i + 4]))
                i += 4
            else:
                cache.append(None)
        return out[0], cache


class GraphedDecodeCache(list):
    """A preallocated cache (the list of KVBuffer / None that RoutedModel.decode_step takes) with a
    CUDA-graphed decode step bound to its storage (`graphed_step`). The stores switch to static
    mode: the cache is then one linear sequence (do not branch it)."""

    def __init__(self, routed, buffers: list[KVBuffer | None], *, warmup: int = 2, emulate: bool = False) -> None:
        held = stores(buffers)
        snaps = [st.snapshot() for st in held]
        for st in held:
            st.make_static()
        super().__init__([None if b is None else KVBuffer(b.store, b.store.length) for b in buffers])
        try:
            self.graphed_step = _DecodeStep(routed, self, held, warmup, emulate)
        except Exception:  # leave the buffers as they were (dynamic, warm-up writes undone)
            for st, snap in zip(held, snaps):
                st.slot = None
                st.restore(snap)
            raise

    @property
    def nbytes(self) -> int:
        return sum(st.nbytes for st in stores(self))


class _DecodeStep:
    def __init__(self, routed, cache: GraphedDecodeCache, held, warmup: int, emulate: bool) -> None:
        first = next(kv for kv in cache if kv is not None)
        bsz, device = first.key.shape[0], first.key.device
        self.cache, self.stores = cache, held
        self.token = torch.zeros(bsz, 1, dtype=torch.int64, device=device)  # [B,1] static inputs
        self.position = torch.zeros(bsz, 1, dtype=torch.int64, device=device)
        static = list(cache)  # a plain list: decode_step must not find this graph while capturing it
        snaps = [st.snapshot() for st in held]

        def reset():
            for st, snap in zip(held, snaps):
                st.restore(snap)

        def fn():
            logits, _ = routed.decode_step(self.token, self.position, static)
            return (logits,)

        with torch.no_grad():
            self.graph = Graph(fn, warmup=warmup, emulate=emulate, reset=reset)

    def accepts(self, token: Tensor, position: Tensor, all_logits: bool) -> bool:
        return (not all_logits and token.shape == self.token.shape and position.shape == self.position.shape
                and all(st.length < st.capacity for st in self.stores))

    def __call__(self, token: Tensor, position: Tensor) -> tuple[Tensor, GraphedDecodeCache]:
        self.token.copy_(token)
        self.position.copy_(position)
        before = [st.length for st in self.stores]
        (logits,) = self.graph.replay()
        for st, n in zip(self.stores, before):  # the graph advanced the device slots; the host mirror follows
            st.length = n + 1
        return logits.clone(), self.cache


_failures: list[str] = []


def capture_failed(exc: Exception) -> None:
    """A decode capture failed: decode eagerly, say so once, and stop trying in this process."""
    import warnings

    if not _failures:
        warnings.warn(f"CUDA-graph decode disabled, decoding eagerly: {type(exc).__name__}: {exc}", stacklevel=3)
    _failures.append(f"{type(exc).__name__}: {exc}")


def decode_graphs_wanted(buffers: list, new_tokens: int) -> bool:
    """Capture a decode step for this cache? On CUDA, when enabled, and when enough tokens follow."""
    held = stores(buffers)
    return (bool(held) and held[0].key.is_cuda and graphs_enabled() and not _failures and new_tokens >= GRAPH_MIN_TOKENS
            and len(held) == sum(b is not None for b in buffers))


def decode_cache(routed, cache: list[LayerKV | None], new_tokens: int | None, graphs: bool = True):
    """The cache generation decodes through: `preallocate`d buffers (tokenskip.kv_buffer) with room
    for `new_tokens` and, on CUDA when `graphs` and enough tokens follow to pay for a capture, a
    CUDA-graphed decode step bound to them (RoutedModel.decode_step replays it). new_tokens None
    (the caller did not say, e.g. a server that regroups rows between steps): the default room and
    no capture. (Here, not in kv_buffer: the buffers know nothing of graphs.)"""
    buffers = preallocate(cache, DEFAULT_NEW_TOKENS if new_tokens is None else new_tokens)
    if graphs and new_tokens is not None and decode_graphs_wanted(buffers, new_tokens):
        try:
            return GraphedDecodeCache(routed, buffers)
        except Exception as exc:  # noqa: BLE001 - eager decode is always correct
            capture_failed(exc)
    return buffers
