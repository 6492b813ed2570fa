"""Pieces every training stage shares: data windows and determinism."""

from __future__ import annotations

import torch

from tokenskip.errors import UserError


def deterministic(seed: int) -> None:
    """Same seed, same bytes on CPU: fixed seeds and deterministic kernels where torch has them."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def windows(tokenizer, split: str, text_file: str | None, seq_len: int, count: int, seed: int = 0) -> torch.Tensor:
    """Token windows [N,L] of a built-in split ("train"/"calib"/"eval") or of a user's text file,
    sampled by seed across every article (tokenskip.windows.sample_windows)."""
    from tokenskip.windows import load_windows

    ids = load_windows(tokenizer, split, seq_len, count, seed, text_file)
    if ids.ndim != 2 or ids.shape[0] == 0:
        where = text_file or f"the built-in {split} split"
        raise UserError(f"{where}: not enough text for one window of {seq_len} tokens")
    return ids
