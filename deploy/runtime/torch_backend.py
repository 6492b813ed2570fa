"""Backends behind one small interface, so generation and benchmarks are written once.

    prefill(ids [B,S] int64, mask [B,S] int64) -> (logits [B,V] float32 torch CPU, cache)
    decode(token [B,1] int64, position [B,1] int64, cache) -> (logits [B,V], cache)
    check_length(prompt_tokens, new_tokens)   # one-line UserError naming the limit; announces the
                                              # generation's length so caches are sized once
    cache_nbytes(cache) -> int                # bytes the cache holds for the batch

The cache is whatever the backend needs (a list of LayerKV for PyTorch, a preallocated
`kv_cache.KVCache` written in place for ONNX Runtime and TensorRT); the loop never looks inside.
Heavy optional runtimes (onnxruntime, tensorrt) are imported only when their backend is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tokenskip.errors import UserError
from tokenskip.kv_buffer import decode_cache

from .kv_cache import check_limit
from .ort_backend import OrtBackend, import_ort, ort_session  # noqa: F401  (re-exported: one definition)


class TorchBackend:
    """The PyTorch RoutedModel: prefill routes, decode runs every block (or threshold-skips)."""

    name = "torch"

    def __init__(self, routed, threshold_skip: bool = False) -> None:
        self.routed = routed
        self.threshold_skip = threshold_skip
        self.device = next(routed.model.parameters()).device
        self.max_length = getattr(routed.model.config, "max_position_embeddings", None)
        self.stats: dict = {}
        self.new_tokens: int | None = None  # KV room per prefill, set by reserve() (tokenskip.kv_buffer)
        if threshold_skip:
            from tokenskip.routers import LearnedRouter

            if not isinstance(routed.router, LearnedRouter):
                raise UserError("--threshold-skip needs a learned router (--routers DIR written by `tokenskip train`)")
            self.stats = {"decode_tokens": 0, "routed_block_visits": 0, "skipped_blocks": 0}

    def check_length(self, prompt: int, new: int) -> None:
        check_limit("model", prompt, new, self.max_length)

    @staticmethod
    def cache_nbytes(cache) -> int:
        """Bytes of K/V (+ positions, validity) the per-layer caches hold for the batch."""
        return sum(t.nbytes for kv in cache if kv is not None for t in (kv.key, kv.value, kv.pos, kv.valid))

    def reserve(self, new_tokens: int) -> None:
        """Tokens the next prefills' KV caches preallocate room for (the generation loop says)."""
        self.new_tokens = new_tokens

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor):
        if self.threshold_skip and ids.shape[0] != 1:
            raise UserError(f"--threshold-skip decodes one prompt at a time, got a batch of {ids.shape[0]}")
        logits, cache = self.routed.prefill(ids.to(self.device), mask.to(self.device), padded=not bool(mask.all()))
        return logits.float(), decode_cache(self.routed, cache, self.new_tokens, graphs=not self.threshold_skip)

    @torch.no_grad()
    def decode(self, token: Tensor, position: Tensor, cache):
        token, position = token.to(self.device), position.to(self.device)
        if not self.threshold_skip:
            logits, cache = self.routed.decode_step(token, position, cache)
            return logits.float(), cache
        from .threshold_skip import threshold_decode_step

        logits, cache, skipped = threshold_decode_step(self.routed, token, position, cache)
        routed_blocks = sum(self.routed.layer_is_routed(i) for i in range(len(self.routed.layers)))
        self.stats["decode_tokens"] += 1
        self.stats["routed_block_visits"] += routed_blocks
        self.stats["skipped_blocks"] += len(skipped)
        return logits.float(), cache


def load_trt_backend(engine_dir: str | Path):
    """TensorRT runtime, imported only here (it needs a GPU and the tensorrt package)."""
    from .trt_backend import TrtBackend

    return TrtBackend(engine_dir)
