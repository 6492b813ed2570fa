"""The flat-tensor wrapper around RoutedModel that torch.export traces: ONE graph for prefill and decode.

It adds no routing logic: it is `RoutedModel.forward(last_only=True, return_cache=True, trace=True,
past=...)` with the per-layer caches flattened into named tensors (ONNX graphs have flat inputs
and outputs). Prefill is a call with an empty past (length 0) and S prompt tokens; decode is a
call with S = 1 (then k = S = 1 in every routed block: nothing is skipped) against the cache.

Caches are sequence-major, `[T, B, nkv, d]` for keys/values and `[T, B]` for positions/validity,
so any prefix of a preallocated runtime buffer is one contiguous block: the runtime feeds
`buffer[:n]` as the past without a copy, and a decode step's new row `buffer[n]` is contiguous
too, so the graph's output can be written straight into the cache (docs/export.md).
"""

from __future__ import annotations

from torch import Tensor, nn

from tokenskip.block import LayerKV
from tokenskip.routed import RoutedModel

CACHE_FIELDS = ("key", "value", "pos", "valid")


def cache_names(prefix: str, layers: list[int]) -> list[str]:
    return [f"{prefix}.{li}.{f}" for li in layers for f in CACHE_FIELDS]


def to_seq_major(kv: LayerKV) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[B,nkv,T,d] / [B,T] -> [T,B,nkv,d] / [T,B] (the cache layout of the graph's I/O)."""
    return kv.key.permute(2, 0, 1, 3), kv.value.permute(2, 0, 1, 3), kv.pos.t(), kv.valid.t()


def from_seq_major(key: Tensor, value: Tensor, pos: Tensor, valid: Tensor) -> LayerKV:
    """The inverse of to_seq_major: the LayerKV run_block attends over."""
    return LayerKV(key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), pos.t(), valid.t())


class StepGraph(nn.Module):
    """(input_ids [B,S], attention_mask [B,S], position_ids [B,S], past.*) ->
    logits [B,V], new.* (the cache rows this call adds), index.* (routed layers: kept positions)."""

    def __init__(self, routed: RoutedModel) -> None:
        super().__init__()
        self.routed = routed
        self.layers = [li for li in range(len(routed.layers)) if li not in routed.removed_layers]
        self.routed_layers = [li for li in self.layers if routed.layer_is_routed(li)]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *cache_names("past", self.layers)]

    def output_names(self) -> list[str]:
        return ["logits", *cache_names("new", self.layers), *[f"index.{li}" for li in self.routed_layers]]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor):
        cache: list[LayerKV | None] = [None] * len(self.routed.layers)
        for i, li in enumerate(self.layers):
            cache[li] = from_seq_major(*past[4 * i: 4 * i + 4])
        out = self.routed.forward(input_ids, attention_mask, position_ids=position_ids, last_only=True,
                                  return_cache=True, trace=True, past=cache)
        flat = [out.logits[:, -1]]  # [B,V]
        for li in self.layers:
            flat += to_seq_major(out.new_cache[li])  # this call's rows (no slice of past + new to trace)
        flat += [out.traces[li].index for li in self.routed_layers]
        return tuple(flat)
