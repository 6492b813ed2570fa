"""The backend flags of `tokenskip generate`/`serve`/`bench`/`bench-serve`: click options, the
`--backend` choices (read from the registry, deploy/runtime/base.py) and the checks that need to
know which flags the user typed. Only CLI modules import this; the rest builds a BackendSpec.
"""

from __future__ import annotations

import click

from tokenskip.errors import UserError
from tokenskip.precision import device_options

from .runtime.base import THRESHOLD_TORCH_ONLY, BackendSpec, backend_names

ROUTING_FLAGS = ("router", "sparsity", "schedule", "routers_dir", "kv_policy")


def given(ctx: click.Context, name: str) -> bool:
    """Did the user type this flag (not its default)?"""
    src = ctx.get_parameter_source(name)
    return src is not None and src != click.core.ParameterSource.DEFAULT


def given_flags(ctx: click.Context, names) -> list[str]:
    return [n for n in names if given(ctx, n)]


def backend_spec(flags: dict, given_names, **extra) -> BackendSpec:
    """Command-line values -> BackendSpec, refusing PyTorch-only flags the user gave for an export
    or engine (one line naming the first flag at fault)."""
    given_names = set(given_names)
    spec = BackendSpec.from_flags(flags, given_names, **extra)
    if spec.name == "torch":  # first: --onnx and --engine together
        return spec
    routing = [f for f in ROUTING_FLAGS if f in given_names]
    if routing:
        raise UserError(f"--{routing[0].replace('_dir', '').replace('_', '-')} applies to the PyTorch backend; "
                        "an export or engine carries its own routing")
    if spec.threshold_skip:
        raise UserError(THRESHOLD_TORCH_ONLY)
    if "dtype" in given_names:
        raise UserError("--dtype applies to the PyTorch backend; an export or engine carries its own precision")
    return spec


class BackendChoice(click.Choice):
    """--backend: the registered backends with `feature`, read when the option is shown or parsed
    (so a backend registered after this module was imported is listed too)."""

    def __init__(self, feature: str) -> None:
        self.feature = feature
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(backend_names(self.feature))

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns; the registry is the source
        pass


def backend_options(f):
    f = click.option("--threads", type=int, default=None, help="CPU threads (PyTorch / ONNX Runtime).")(f)
    f = device_options(f)  # --device cpu|cuda|auto (PyTorch device / ORT execution provider), --dtype (PyTorch)
    f = click.option("--tokenizer", "tokenizer_dir", type=click.Path(), default=None,
                     help="Tokenizer folder (default: the export's / engine's own).")(f)
    f = click.option("--engine", "engine_dir", type=click.Path(), default=None,
                     help="TensorRT engine folder from `tokenskip build` (CUDA GPU needed).")(f)
    f = click.option("--onnx", "onnx_dir", type=click.Path(), default=None,
                     help="Export folder from `tokenskip export` (runs on ONNX Runtime).")(f)
    return f
