"""Inference-only shortcuts around the gather/scatter of a routed block (unpadded rows, no grad).

`scatter_delta_` writes a block's delta into the hidden state in place: the exported
`tokenskip::scatter_tokens` op is functional, so it copies the whole [B,S,H] residual every routed
block; in inference nobody reads the old hidden state again, and the in-place add gives the same
values (the same scatter_add, in the same dtype).
"""

from __future__ import annotations

from torch import Tensor


def scatter_delta_(hidden: Tensor, out: Tensor, kept: Tensor, index: Tensor) -> Tensor:
    """hidden [B,S,H] += (out - kept) [B,k,H] at rows index [B,k], in place; returns hidden."""
    delta = out - kept  # [B,k,H]
    return hidden.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), delta)
