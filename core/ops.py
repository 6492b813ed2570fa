"""Token selection and write-back in PyTorch: the `tokenskip::topk_gather` and
`tokenskip::scatter_tokens` custom ops (semantics in docs/ops.md).

They are torch.library custom ops so that torch.export keeps them as single nodes, which the
exporter maps to the ONNX `tokenskip::TopKGather` / `tokenskip::ScatterTokens` nodes. Their eager
implementation is the one PyTorch routing uses, so training, evaluation, export and the numpy
references all agree on which tokens a block runs on.
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_count_sym(seq_len, keep_num: int, keep_den: int, min_keep: int):
    """k = min(S, max(min_keep, ceil(keep_num * S / keep_den))); works on ints and SymInts."""
    k = (keep_num * seq_len + keep_den - 1) // keep_den
    return torch.sym_min(seq_len, torch.sym_max(min_keep, k))


def select_topk(scores: Tensor, k: int) -> Tensor:
    """scores [B,S] -> index [B,k] int64: the k best positions, ascending.

    A stable descending sort breaks ties by the lower position first, as ONNX TopK does, so every
    backend picks the same tokens even when scores tie (the static router ties often).
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B,S]
    return order[:, :k].sort(dim=-1).values  # [B,k] ascending original order


def gather_rows(hidden: Tensor, index: Tensor) -> Tensor:
    """hidden [B,S,H], index [B,k] -> [B,k,H]."""
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def add_rows(hidden: Tensor, delta: Tensor, index: Tensor) -> Tensor:
    """hidden [B,S,H] with delta [B,k,H] added at rows index [B,k] (unique per row)."""
    return hidden.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), delta)


@torch.library.custom_op("tokenskip::topk_gather", mutates_args=())
def topk_gather(hidden: Tensor, scores: Tensor, keep_num: int, keep_den: int, min_keep: int) -> tuple[Tensor, Tensor]:
    """hidden [B,S,H], scores [B,S] -> kept [B,k,H], index [B,k] int64 ascending."""
    k = keep_count_sym(hidden.shape[1], keep_num, keep_den, min_keep)
    index = select_topk(scores, k)  # [B,k]
    return gather_rows(hidden, index), index


@topk_gather.register_fake
def _topk_gather_fake(hidden, scores, keep_num, keep_den, min_keep):
    batch, seq, width = hidden.shape
    k = keep_count_sym(seq, keep_num, keep_den, min_keep)
    return hidden.new_empty(batch, k, width), scores.new_empty(batch, k, dtype=torch.int64)


@torch.library.custom_op("tokenskip::scatter_tokens", mutates_args=())
def scatter_tokens(hidden: Tensor, delta: Tensor, index: Tensor) -> Tensor:
    """hidden [B,S,H] + delta [B,k,H] at index [B,k] -> [B,S,H]."""
    return add_rows(hidden, delta, index)


@scatter_tokens.register_fake
def _scatter_tokens_fake(hidden, delta, index):
    return torch.empty_like(hidden)
