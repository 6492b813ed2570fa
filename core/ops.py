"""Token selection and write-back in PyTorch: the `tokenskip::topk_gather` and
`tokenskip::scatter_tokens` custom ops (semantics in docs/ops.md).

They are torch.library custom ops so that torch.export keeps them as single nodes, which the
exporter maps to the ONNX `tokenskip::TopKGather` / `tokenskip::ScatterTokens` nodes. Their eager
implementation is the one PyTorch routing uses, so training, evaluation, export and the numpy
references all agree on which tokens a block runs on.

The selection rule (one definition, `select_topk`): row b keeps `counts[b]` of its valid tokens,
the best by score (NaN ranks like -inf, ties lower position first), and fills the remaining
`k - counts[b]` output slots with its lowest padding positions, so the output stays [B,k] for the
whole batch while a row's real tokens depend only on that row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_count(seq_len, keep_num: int, keep_den: int, min_keep: int):
    """k = min(L, max(min_keep, ceil(keep_num * L / keep_den))) in integers, for an int, a SymInt
    (the traced S) or an int64 tensor of row lengths (0 for an empty row)."""
    k = (keep_num * seq_len + keep_den - 1) // keep_den
    if isinstance(seq_len, Tensor):
        return torch.minimum(seq_len, k.clamp(min=min_keep))
    return torch.sym_min(seq_len, torch.sym_max(min_keep, k))


def select_topk(scores: Tensor, k: int, valid: Tensor | None = None, counts: Tensor | None = None) -> Tensor:
    """scores [B,S] -> index [B,k] int64 ascending (the rule in the module docstring).

    valid [B,S] bool (None: no padding), counts [B] int64 real tokens per row (None: k for every
    row, which needs k <= every row's valid length). A stable descending sort breaks ties by the
    lower position first, as ONNX TopK does, so every backend picks the same tokens.
    """
    key = scores.float()
    key = key.masked_fill(key.isnan(), float("-inf"))  # [B,S] NaN ranks like -inf
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [B,S] best first
    if valid is None and counts is None:  # every row keeps its k best
        return order[:, :k].sort(dim=-1).values  # [B,k] ascending original order
    if valid is None:
        valid = torch.ones_like(key, dtype=torch.bool)
    counts = torch.full_like(key[:, 0], k, dtype=torch.int64) if counts is None else counts.to(torch.int64)
    valid_sorted = valid.gather(1, order)  # [B,S] in score order
    take_sorted = valid_sorted & (valid_sorted.long().cumsum(-1) <= counts[:, None])  # the counts[b] best valid
    take = torch.zeros_like(valid).scatter(1, order, take_sorted)  # [B,S] back in position order
    pad = ~valid
    take |= pad & (pad.long().cumsum(-1) <= (k - counts)[:, None])  # lowest padding fills the rest
    # exactly k per row: a stable sort puts the taken positions first, in ascending order
    return torch.sort(take.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :k]  # [B,k]


def gather_rows(hidden: Tensor, index: Tensor) -> Tensor:
    """hidden [B,S,H], index [B,k] -> [B,k,H]."""
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def add_rows(hidden: Tensor, delta: Tensor, index: Tensor) -> Tensor:
    """hidden [B,S,H] with delta [B,k,H] added at rows index [B,k] (unique per row)."""
    return hidden.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), delta)


@torch.library.custom_op("tokenskip::topk_gather", mutates_args=())
def topk_gather(hidden: Tensor, scores: Tensor, valid: Tensor, keep_num: int, keep_den: int,
                min_keep: int) -> tuple[Tensor, Tensor]:
    """hidden [B,S,H], scores [B,S], valid [B,S] bool -> kept [B,k,H], index [B,k] int64 ascending.

    k = keep_count(S) for the whole batch; row b keeps keep_count(L_b) real tokens (L_b its valid
    count) and pads the rest of its slots with padding positions."""
    k = keep_count(hidden.shape[1], keep_num, keep_den, min_keep)
    counts = keep_count(valid.sum(-1), keep_num, keep_den, min_keep)  # [B]
    index = select_topk(scores, k, valid.bool(), counts)  # [B,k]
    return gather_rows(hidden, index), index


@topk_gather.register_fake
def _topk_gather_fake(hidden, scores, valid, keep_num, keep_den, min_keep):
    batch, seq, width = hidden.shape
    k = keep_count(seq, keep_num, keep_den, min_keep)
    return hidden.new_empty(batch, k, width), scores.new_empty(batch, k, dtype=torch.int64)


@torch.library.custom_op("tokenskip::scatter_tokens", mutates_args=())
def scatter_tokens(hidden: Tensor, delta: Tensor, index: Tensor) -> Tensor:
    """hidden [B,S,H] + delta [B,k,H] at index [B,k] -> [B,S,H]."""
    return add_rows(hidden, delta, index)


@scatter_tokens.register_fake
def _scatter_tokens_fake(hidden, delta, index):
    return torch.empty_like(hidden)
