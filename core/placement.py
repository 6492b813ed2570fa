"""Blocks placed by accelerate: a model loaded with a `device_map` (split over several GPUs, or
partly offloaded to CPU RAM or disk) runs each block where accelerate put it.

Why: accelerate's big-model dispatch puts a hook on each decoder layer's `forward` that moves the
inputs to the layer's device and, for an offloaded layer, loads its weights before the call and
drops them after. Our block code (tokenskip.block.run_block) calls the layer's submodules directly,
never `layer.forward`, so that hook would never fire. `enter(layer, *tensors)` runs the hook's
`pre_forward` (weights in, tensors moved to the layer's execution device) and `leave(layer)` its
`post_forward` (offloaded weights dropped again). A model without hooks (every normal load) pays
one getattr per block.

Autograd keeps the tensors a block saved for backward, so router training through an offloaded
block still has its weights for the backward pass (tested, tests/test_placement.py).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn


def hook(module: nn.Module):
    """accelerate's hook on this module (`add_hook_to_module` sets `_hf_hook`), or None."""
    return getattr(module, "_hf_hook", None)


def enter(layer: nn.Module, *tensors: Any) -> tuple:
    """Before running `layer`'s block: its weights loaded (offload) and `tensors` (tensors, tuples,
    lists, dicts or None) on its execution device. Without a hook: `tensors` unchanged."""
    h = hook(layer)
    if h is None:
        return tensors
    args, _ = h.pre_forward(layer, *tensors)
    return tuple(args)


def leave(layer: nn.Module) -> None:
    """After `layer`'s block: offloaded weights dropped (no-op for a placed or unhooked layer)."""
    h = hook(layer)
    if h is not None:
        h.post_forward(layer, None)


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where `module` computes: its hook's execution device, else its first parameter's or
    buffer's device, else `default` (a module without tensors, e.g. the static router)."""
    dev = getattr(hook(module), "execution_device", None)
    if dev is not None:
        return torch.device(dev)
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return default if first is None else first.device
