"""Numpy references for the two tokenskip custom ops (see docs/ops.md).

They are the ground truth every other implementation is tested against: the PyTorch routing code,
the ONNX function bodies and the CUDA plugin kernels. Plain loops over the batch on purpose:
obviously correct beats fast here.
"""

from __future__ import annotations

import numpy as np


def keep_count(seq_len: int, keep_num: int, keep_den: int, min_keep: int) -> int:
    """k = min(L, max(min_keep, ceil(keep_num * L / keep_den))), in exact integer arithmetic."""
    if keep_den < 1 or keep_num < 0 or min_keep < 1:
        raise ValueError(f"bad keep fraction {keep_num}/{keep_den} or min_keep {min_keep}")
    k = (keep_num * seq_len + keep_den - 1) // keep_den
    return int(min(seq_len, max(min_keep, k)))


def select_rows(scores: np.ndarray, valid: np.ndarray, counts, k_out: int) -> np.ndarray:
    """The selection rule of docs/ops.md, one row at a time.

    scores [B,S] float, valid [B,S] bool, counts [B] (real tokens row b keeps, <= its valid length)
    -> index [B,k_out] int64 ascending: row b's `counts[b]` best valid positions (score descending,
    NaN as -inf, ties lower position first) plus its `k_out - counts[b]` lowest padding positions.
    """
    batch, seq = scores.shape
    index = np.empty((batch, k_out), dtype=np.int64)
    for b in range(batch):
        pos = np.flatnonzero(valid[b])  # ascending valid positions
        pad = np.flatnonzero(~valid[b])
        fill = k_out - int(counts[b])
        if not 0 <= int(counts[b]) <= len(pos) or not 0 <= fill <= len(pad):
            raise ValueError(f"row {b}: cannot keep {counts[b]} of {len(pos)} tokens + {fill} of {len(pad)} padding")
        s = scores[b, pos].astype(np.float64)
        s[np.isnan(s)] = -np.inf  # NaN ranks like -inf
        # stable descending sort: ties keep the lower position first (ONNX TopK semantics)
        best = pos[np.argsort(-s, kind="stable")[: int(counts[b])]]
        index[b] = np.sort(np.concatenate([best, pad[:fill]]))
    return index


def topk_gather(hidden: np.ndarray, scores: np.ndarray, keep_num: int, keep_den: int, min_keep: int,
                valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """hidden [B,S,H], scores [B,S], valid [B,S] bool (None: no padding)
    -> kept [B,k,H], index [B,k] int64 ascending, k = keep_count(S); row b keeps keep_count(L_b)
    real tokens, L_b = valid[b].sum(), and fills the other slots with its lowest padding positions."""
    if hidden.ndim != 3 or scores.shape != hidden.shape[:2]:
        raise ValueError(f"shapes {hidden.shape} / {scores.shape} do not match [B,S,H] / [B,S]")
    batch, seq, _ = hidden.shape
    valid = np.ones((batch, seq), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if valid.shape != (batch, seq):
        raise ValueError(f"valid {valid.shape} does not match [B,S] = {(batch, seq)}")
    counts = [keep_count(int(n), keep_num, keep_den, min_keep) for n in valid.sum(axis=1)]
    index = select_rows(scores, valid, counts, keep_count(seq, keep_num, keep_den, min_keep))
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
