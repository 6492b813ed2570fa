"""Numpy references for the two tokenskip custom ops (see docs/ops.md).

They are the ground truth every other implementation is tested against: the PyTorch routing code,
the ONNX function bodies and the CUDA plugin kernels. Plain loops over the batch on purpose:
obviously correct beats fast here.
"""

from __future__ import annotations

import numpy as np


def keep_count(seq_len: int, keep_num: int, keep_den: int, min_keep: int) -> int:
    """k = min(S, max(min_keep, ceil(keep_num * S / keep_den))), in exact integer arithmetic."""
    if keep_den < 1 or keep_num < 0 or min_keep < 1:
        raise ValueError(f"bad keep fraction {keep_num}/{keep_den} or min_keep {min_keep}")
    k = (keep_num * seq_len + keep_den - 1) // keep_den
    return int(min(seq_len, max(min_keep, k)))


def topk_gather(hidden: np.ndarray, scores: np.ndarray, keep_num: int, keep_den: int,
                min_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """hidden [B,S,H], scores [B,S] -> kept [B,k,H], index [B,k] int64 ascending."""
    if hidden.ndim != 3 or scores.shape != hidden.shape[:2]:
        raise ValueError(f"shapes {hidden.shape} / {scores.shape} do not match [B,S,H] / [B,S]")
    batch, seq, _ = hidden.shape
    k = keep_count(seq, keep_num, keep_den, min_keep)
    index = np.empty((batch, k), dtype=np.int64)
    for b in range(batch):
        # stable descending sort: ties keep the lower position first (ONNX TopK semantics)
        order = np.argsort(-scores[b].astype(np.float64), kind="stable")[:k]
        index[b] = np.sort(order)
    kept = np.take_along_axis(hidden, index[:, :, None], axis=1)  # [B,k,H]
    return kept, index


def scatter_tokens(hidden: np.ndarray, delta: np.ndarray, index: np.ndarray) -> np.ndarray:
    """hidden [B,S,H] + delta [B,k,H] scattered at index [B,k] -> [B,S,H]."""
    if delta.shape[0] != hidden.shape[0] or delta.shape[2] != hidden.shape[2] or index.shape != delta.shape[:2]:
        raise ValueError(f"shapes {hidden.shape} / {delta.shape} / {index.shape} do not match")
    out = hidden.copy()
    for b in range(hidden.shape[0]):
        out[b, index[b]] = (out[b, index[b]] + delta[b]).astype(hidden.dtype)
    return out
