"""From `tokenskip serve` flags to a running engine and app, in this process or a Ray replica.

`ServeSpec` is the resolved command line as plain data (picklable), so a Ray Serve replica
rebuilds exactly the backend the user asked for with the same code the local server runs:
deploy/cli.py's `make_backend` (PyTorch, ONNX Runtime or TensorRT), then model_info,
AsyncEngine and api_server.build_app.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from tokenskip.errors import UserError

from .engine import EngineSettings

EXTRA_MODULES = {"serve": ("fastapi", "uvicorn", "sse_starlette", "prometheus_client", "httpx"),
                 "serve-ray": ("ray.serve",)}


def require_extra(extra: str, command: str) -> None:
    """One line naming the extra when one of its modules is missing."""
    import importlib

    for module in EXTRA_MODULES[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"`{command}` needs the `{extra}` extra ({module} is not installed): "
                            f"pip install 'tokenskip[{extra}]'") from None


@dataclass
class ServeSpec:
    """What to serve: the backend flags (as deploy/cli.py's make_backend takes them), the flags the
    user actually gave (routing flags conflict with --onnx/--engine only when given), the
    engine settings and the name clients use in `model`."""

    backend: dict
    given: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    served_model_name: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


class _GivenFlags:
    """Stands in for the click context make_backend consults about which flags were given."""

    def __init__(self, given) -> None:
        self.given = set(given)

    def get_parameter_source(self, name: str):
        source = click.core.ParameterSource
        return source.COMMANDLINE if name in self.given else source.DEFAULT


def default_name(desc: dict, spec: ServeSpec) -> str:
    if spec.served_model_name:
        return spec.served_model_name
    for key in ("onnx", "engine"):
        if desc.get(key):
            return Path(desc[key]).resolve().name
    name = str(desc.get("model") or "tokenskip")
    return Path(name).name if Path(name).is_dir() else name


def build_engine(spec: ServeSpec):
    """-> (AsyncEngine, served model name). Loads the model: this is the slow part of a start."""
    from ..cli import make_backend
    from .engine import AsyncEngine
    from .model_info import model_info

    backend, tokenizer, desc = make_backend(_GivenFlags(spec.given), threshold_skip=False, **spec.backend)
    name = default_name(desc, spec)
    info = model_info(backend, name)
    settings = EngineSettings(**spec.settings)
    if settings.kv_budget is not None and info.config is None:
        raise UserError("--kv-cache-gb: the KV-cache geometry of this backend is unknown (no export sidecar next "
                        "to the engines), so no budget can be enforced: drop --kv-cache-gb")
    return AsyncEngine(backend, tokenizer, info, settings), name


def create_app(spec: ServeSpec):
    from .api_server import build_app

    engine, name = build_engine(spec)
    return build_app(engine, name)
