"""Inference-only shortcuts around the gather/scatter of a routed block (unpadded rows, no grad).

- `scatter_delta_` writes a block's delta into the hidden state in place: the exported
  `tokenskip::scatter_tokens` op is functional, so it copies the whole [B,S,H] residual every
  routed block; in inference nobody reads the old hidden state again, and the in-place add gives
  the same values (the same scatter_add, in the same dtype).
- `gather_norm` gathers the kept rows and applies the block's input RMSNorm to them.

With TOKENSKIP_FUSED=1 on CUDA both are torch.compile'd (Triton): the delta subtraction fuses into
the scatter, and the gather into the norm's reduction (one read of the kept rows instead of the
gather's write + the norm's several float32 passes). Off by default: the benchmark's dense
baseline (HF's eager forward) gets no compiled kernels either, so the comparison stays like for
like; `bench_gpu --fused` measures it (`use_fused`). Elsewhere (CPU, the flag unset) this is the plain code.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

from . import ops
from .families import Family

ENV = "TOKENSKIP_FUSED"


def scatter_delta(hidden: Tensor, out: Tensor, kept: Tensor, index: Tensor) -> Tensor:
    """hidden [B,S,H] += (out - kept) [B,k,H] at rows index [B,k], in place; returns hidden."""
    delta = out - kept  # [B,k,H]
    return hidden.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), delta)


def rms_gather(hidden: Tensor, index: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(kept [B,k,H], LlamaRMSNorm(kept)) for rows index [B,k]: HF's formula (float32 statistics,
    cast back, then the weight), written out so that one compiled kernel can do both."""
    kept = ops.gather_rows(hidden, index)  # [B,k,H]
    x = kept.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return kept, weight * x.to(kept.dtype)


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    return torch.compile({"scatter": scatter_delta, "gather": rms_gather}[name], dynamic=True, fullgraph=True)


_override: bool | None = None  # use_fused(); None: the environment decides


@contextlib.contextmanager
def use_fused(on: bool):
    """Fusion on/off for the body, whatever TOKENSKIP_FUSED says (the benchmark's A/B)."""
    global _override
    saved, _override = _override, on
    try:
        yield
    finally:
        _override = saved


def enabled(t: Tensor) -> bool:
    on = os.environ.get(ENV) == "1" if _override is None else _override
    return on and t.is_cuda


def scatter_delta_(hidden: Tensor, out: Tensor, kept: Tensor, index: Tensor) -> Tensor:
    """`scatter_delta`, compiled on CUDA when fusion is on."""
    fn = _compiled("scatter") if enabled(hidden) else scatter_delta
    return fn(hidden, out, kept, index)


def gather_norm(hidden: Tensor, index: Tensor, norm, family: Family) -> tuple[Tensor, Tensor | None]:
    """(kept rows, their input-norm output or None: the block normalises them itself). Fused only
    for the norm classes the model's family lists as HF's LlamaRMSNorm formula (rms_gather's)."""
    if enabled(hidden) and family.is_llama_rms_norm(norm):
        return _compiled("gather")(hidden, index, norm.weight, float(norm.variance_epsilon))
    return ops.gather_rows(hidden, index), None
