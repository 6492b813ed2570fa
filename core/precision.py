"""Device and precision choices, one definition for every command that loads the model.

`--device cpu|cuda|auto` and `--dtype fp32|bf16|fp16` mean the same thing everywhere: the frozen
LLM is loaded once, directly in that dtype, onto that device (no fp32 copy on a GPU). Routers keep
fp32 weights (they are tiny, and their scores decide which tokens run, so they are computed in
fp32 whatever the LLM's dtype).
"""

from __future__ import annotations

import click
import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype (a one-line error otherwise)."""
    if name not in DTYPES:
        raise UserError(f"{flag} {name}: choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """'cpu' | 'cuda' | 'auto' -> torch.device. auto = cuda when a GPU is visible, else cpu."""
    if name not in DEVICES:
        raise UserError(f"{flag} {name}: choose from {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} cuda: no CUDA GPU is visible to PyTorch (use --device cpu or auto)")
    return torch.device(name)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def device_options(f=None, *, default_dtype: str = "fp32"):
    """Click options --device and --dtype (passed to the command as `device` and `dtype` strings)."""
    if f is None:
        return lambda g: device_options(g, default_dtype=default_dtype)
    f = click.option("--dtype", type=click.Choice(list(DTYPES)), default=default_dtype, show_default=True,
                     help="Precision the frozen LLM is loaded and run in (routers stay fp32).")(f)
    f = click.option("--device", type=click.Choice(list(DEVICES)), default="cpu", show_default=True,
                     help="Where the LLM runs (auto: cuda when a GPU is visible).")(f)
    return f


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's first floating-point parameter (what --dtype loaded it in)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for router training: torch.autocast in the LLM's half dtype (bf16 or fp16
    on cuda, bf16 or fp16 on cpu), nothing for fp32. Under it, matmuls run in half while softmax,
    log-softmax and the losses run in fp32; the router itself opts out (LearnedRouter.forward) so
    its weights, scores and AdamW state stay fp32."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fp32_region(t: torch.Tensor):
    """A context that turns an enclosing autocast off for code that must run in fp32 (router
    scores, the attention-score feature). A no-op when no autocast is active, so tracing for
    export sees plain code."""
    import contextlib

    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()
