"""From `tokenskip serve` flags to a running engine and app, in this process or a Ray replica.

`ServeSpec` is the resolved command line as plain data (picklable), so a Ray Serve replica
rebuilds exactly the backend the user asked for with the same code the local server runs:
a BackendSpec for the registry (deploy/runtime/base.py: PyTorch, ONNX Runtime, TensorRT or any
registered backend), then model_info, AsyncEngine and api_server.build_app.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenskip.errors import UserError

from ..runtime.base import BackendSpec
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
    """What to serve: the backend flags (BackendSpec's fields), the flags the user actually gave
    (--model counts only when given; `tokenskip serve` refused PyTorch-only flags given with
    --onnx/--engine before writing this), the engine settings and the name clients use in `model`."""

    backend: dict
    given: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    served_model_name: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def backend_spec(self) -> BackendSpec:
        return BackendSpec.from_flags(self.backend, self.given)


def default_name(desc: dict, spec: ServeSpec) -> str:
    if spec.served_model_name:
        return spec.served_model_name
    for key in ("onnx", "engine"):
        if desc.get(key):
            return Path(desc[key]).resolve().name
    name = str(desc.get("model") or "tokenskip")
    return Path(name).name if Path(name).is_dir() else name


def build_async_engine(spec: ServeSpec):
    """-> (AsyncEngine, served model name). Loads the model: this is the slow part of a start."""
    from ..runtime.base import create_backend
    from .engine import AsyncEngine
    from .model_info import model_info

    backend, tokenizer, desc = create_backend(spec.backend_spec())
    name = default_name(desc, spec)
    info = model_info(backend, name)
    settings = EngineSettings(**spec.settings)
    if settings.kv_budget is not None and info.config is None:
        raise UserError("--kv-cache-gb: the KV-cache geometry of this backend is unknown (no export sidecar next "
                        "to the engines), so no budget can be enforced: drop --kv-cache-gb")
    return AsyncEngine(backend, tokenizer, info, settings), name


def create_app(spec: ServeSpec):
    from .api_server import build_app

    engine, name = build_async_engine(spec)
    return build_app(engine, name)
