"""Flat-tensor wrappers around RoutedModel for torch.export: the prefill and the decode graph.

They add no routing logic: prefill is `RoutedModel.forward(last_only=True, return_cache=True,
trace=True)` and decode is `RoutedModel.decode_step`, with the per-layer caches flattened into
named tensors (ONNX graphs have flat inputs/outputs).
"""

from __future__ import annotations

from torch import Tensor, nn

from tokenskip.block import LayerKV
from tokenskip.routed import RoutedModel, default_positions

CACHE_FIELDS = ("key", "value", "pos", "valid")


def cache_names(prefix: str, layers: list[int]) -> list[str]:
    return [f"{prefix}.{li}.{f}" for li in layers for f in CACHE_FIELDS]


class PrefillGraph(nn.Module):
    """(input_ids [B,S], attention_mask [B,S]) -> logits [B,V], present.*, index.* (routed layers)."""

    def __init__(self, routed: RoutedModel) -> None:
        super().__init__()
        self.routed = routed
        self.layers = [li for li in range(len(routed.layers)) if li not in routed.removed_layers]
        self.routed_layers = [li for li in self.layers if routed.layer_is_routed(li)]

    def output_names(self) -> list[str]:
        return ["logits", *cache_names("present", self.layers), *[f"index.{li}" for li in self.routed_layers]]

    def forward(self, input_ids: Tensor, attention_mask: Tensor):
        valid = attention_mask.bool()
        positions = default_positions(valid)
        out = self.routed.forward(input_ids, attention_mask, position_ids=positions, last_only=True,
                                  return_cache=True, trace=True)
        flat = [out.logits[:, -1]]  # [B,V]
        for li in self.layers:
            kv = out.cache[li]
            flat += [kv.key, kv.value, kv.pos, kv.valid]
        flat += [out.traces[li].index for li in self.routed_layers]
        return tuple(flat)


class DecodeGraph(nn.Module):
    """(input_ids [B,1], position_ids [B,1], past.*) -> logits [B,V], present.* (= decode_step)."""

    def __init__(self, routed: RoutedModel) -> None:
        super().__init__()
        self.routed = routed
        self.layers = [li for li in range(len(routed.layers)) if li not in routed.removed_layers]

    def input_names(self) -> list[str]:
        return ["input_ids", "position_ids", *cache_names("past", self.layers)]

    def output_names(self) -> list[str]:
        return ["logits", *cache_names("present", self.layers)]

    def forward(self, input_ids: Tensor, position_ids: Tensor, *past: Tensor):
        cache: list[LayerKV | None] = [None] * len(self.routed.layers)
        for i, li in enumerate(self.layers):
            key, value, pos, valid = past[4 * i: 4 * i + 4]
            cache[li] = LayerKV(key, value, pos, valid)
        logits, new_cache = self.routed.decode_step(input_ids, position_ids, cache)
        flat = [logits]
        for li in self.layers:
            kv = new_cache[li]
            flat += [kv.key, kv.value, kv.pos, kv.valid]
        return tuple(flat)
