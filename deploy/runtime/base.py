"""The backend contract and the registry: a new runtime backend is one file.

A backend is an object with the `Backend` protocol below. The generation loop (generation.py),
the benchmarks (deploy/bench) and the server (deploy/serve) only talk to it through this
protocol, so none of them names a backend class. Its file registers a factory under a name:

    @register_backend("mine", features=("bench",))
    class MyBackend:
        @classmethod
        def create(cls, spec: BackendSpec) -> Created: ...  # backend + tokenizer + description
        @classmethod
        def open(cls, spec: BackendSpec) -> Backend: ...    # the runtime alone (benchmarks)
        ... the Backend methods ...

`create_backend(spec)` builds whatever `spec` names (`BackendSpec.name`: its `backend`, else
`ort` with --onnx, `trt` with --engine, else `torch`). The built-in backends (torch_backend.py,
ort_backend.py, trt_backend.py) are imported the first time the registry is read; importing
them imports no optional runtime (onnxruntime and tensorrt load when a backend is opened).
`features` say which commands can drive the backend beyond generate/serve: "bench" (a dense and
a routed side in `tokenskip bench`), "bench-serve" (`tokenskip bench-serve`'s servers).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from os import PathLike
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Protocol

import torch
from torch import Tensor

from tokenskip.errors import UserError
from tokenskip.schedule import Schedule

BUILTIN_MODULES = ("torch_backend", "ort_backend", "trt_backend")  # registration order = --backend order
FEATURES = ("bench", "bench-serve")
THRESHOLD_TORCH_ONLY = "--threshold-skip runs on the PyTorch backend only (exported graphs run every block in decode)"


# ------------------------------------------------------------------------------------- what serve needs
@dataclass(frozen=True)
class ModelFacts:
    """What a backend knows about its model, for serving: context length, KV-cache geometry (the
    config fields tokenskip.kv_bytes reads; None when unknown: no KV budget) and the routing."""

    max_length: int | None = None
    max_batch: int | None = None  # rows one call takes (a TensorRT engine's profile); None: no limit
    config: object | None = None  # num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim
    schedule: Schedule | None = None  # None: dense
    kv_policy: str = "skip"
    dtype: str = "float32"

    def as_dict(self) -> dict:
        """Field -> value, shallow (the config object is shared, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def facts_from_sidecar(meta: dict, max_length: int | None) -> ModelFacts:
    """ModelFacts from an export sidecar (export.json), for the backends that run an export."""
    c = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    config = None
    if all(isinstance(c.get(k), int) for k in ("num_layers", "num_attention_heads", "head_dim")):
        config = SimpleNamespace(num_hidden_layers=c["num_layers"], num_attention_heads=c["num_attention_heads"],
                                 num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                                 head_dim=c["head_dim"], hidden_size=c.get("hidden_size"))
    layers = meta.get("layers") if isinstance(meta.get("layers"), list) else []
    schedule = None
    if layers and any(isinstance(entry, dict) and entry.get("routed") for entry in layers):
        schedule = Schedule(tuple(float(entry.get("sparsity", 0.0)) if entry.get("routed") else 0.0
                                  for entry in layers))
    return ModelFacts(max_length=max_length, config=config, schedule=schedule,
                      kv_policy=str(meta.get("kv_policy") or "skip"), dtype=str(meta.get("dtype") or "float32"))


@dataclass(frozen=True)
class CacheOps:
    """Row surgery on one backend's cache, for continuous batching (deploy/serve/scheduler.py):
    select(cache, rows, room) -> a cache of those batch rows, in that order; concat(caches, room)
    -> one cache, rows in order; fit(cache, room) -> the cache with room for `room` more tokens.
    Every result has room for `room` more tokens per layer, so the decode steps until the next
    regrouping write in place. `device(cache)`: where it lives; on CUDA each operation ends by
    synchronising the current stream (a runtime may read the cache on a stream of its own)."""

    name: str
    select: Callable[[Any, list[int], int], Any]
    concat: Callable[[list, int], Any]
    fit: Callable[[Any, int], Any]

    @classmethod
    def synced(cls, name: str, select: Callable, concat: Callable, fit: Callable,
               device: Callable[[Any], torch.device | None]) -> "CacheOps":
        def wrap(op: Callable) -> Callable:
            def run(*args):
                out = op(*args)
                dev = device(out)
                if dev is not None and dev.type == "cuda":
                    torch.cuda.current_stream(dev).synchronize()
                return out
            return run
        return cls(name, wrap(select), wrap(concat), wrap(fit))


# ------------------------------------------------------------------------------------------ the protocol
class Backend(Protocol):
    """prefill/decode behind one interface; the cache is whatever the backend needs (opaque to
    the generation loop and the scheduler, which reach into it only through `cache_ops`)."""

    name: str  # the registry name
    max_length: int | None  # longest prompt + generation it holds (None: no limit known)
    stats: dict  # backend extras reported with a generation (e.g. threshold-skip counts)

    def prefill(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Any]:
        """ids [B,S] int64, mask [B,S] int64 (left-padded) -> (logits [B,V] float32 on the CPU, cache)."""

    def decode(self, token: Tensor, position: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """token [B,1] int64, position [B,1] int64 -> (logits [B,V] float32 on the CPU, cache)."""

    def check_length(self, prompt: int, new: int) -> None:
        """A one-line UserError when prompt + new tokens exceed what the backend holds. No side effect."""

    def expect_new_tokens(self, new: int) -> None:
        """The next prefills' caches make room for `new` decode tokens (generation.py says, once
        per generation; a server that regroups rows between steps does not)."""

    def cache_nbytes(self, cache: Any) -> int:
        """Bytes of cache data the batch holds."""

    def cache_ops(self) -> CacheOps | None:
        """Row operations on this backend's cache; None: the server falls back to dynamic batching."""

    def model_facts(self) -> ModelFacts:
        """What the server needs to know about the model (context length, cache geometry, routing)."""

    # Optional (read with getattr; absent = False): chunked prefill for the server's token budget.
    chunked_prefill: bool  # True: prefill_chunk below works

    def prefill_chunk(self, ids: Tensor, positions: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """Continue a prefill: ids/positions [B,S] int64 (no padding) are the next S prompt tokens
        after the cache's, routed among themselves and attending to the cache (RoutedModel.forward
        with a past) -> (logits [B,V] of the last, cache of past + these tokens). Only when
        `chunked_prefill`; otherwise the server prefills every prompt whole."""


BACKEND_MEMBERS = ("name", "max_length", "stats", "prefill", "decode", "check_length", "expect_new_tokens",
                   "cache_nbytes", "cache_ops", "model_facts")


# ------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class BackendSpec:
    """Everything a backend may be built from (the generate/serve/bench flags of the same names)."""

    backend: str | None = None  # registry name; None: "ort" with onnx_dir, "trt" with engine_dir, else "torch"
    onnx_dir: str | PathLike | None = None  # export folder (`tokenskip export`)
    engine_dir: str | PathLike | None = None  # TensorRT engine folder (`tokenskip build`)
    tokenizer_dir: str | PathLike | None = None  # None: the export's / engine's own
    device: str = "cpu"  # cpu | cuda | auto
    threads: int | None = None  # CPU threads (None: the runtime's default)
    dtype: str = "fp32"  # PyTorch: precision the LLM is loaded in
    threshold_skip: bool = False  # PyTorch, learned router: decode skips low-probability routed blocks
    model: str | None = None  # PyTorch; None: the routers folder's model, else the built-in default
    router: str | None = None  # PyTorch; None: learned with routers_dir, static with a sparsity, else dense
    sparsity: float | None = None
    schedule: str | None = None  # schedule.json
    routers_dir: str | None = None  # a `tokenskip train` folder
    kv_policy: str | None = None
    seed: int = 0

    @classmethod
    def from_flags(cls, flags: dict, given, **extra) -> "BackendSpec":
        """From command-line values (`given`: the flags the user typed): --model counts only when
        given, so a routers folder's own model wins over the default."""
        values = {**flags, **extra}
        if "model" not in set(given):
            values["model"] = None
        return cls(**values)

    @property
    def name(self) -> str:
        if self.backend:
            return self.backend
        if self.onnx_dir and self.engine_dir:
            raise UserError("give either --onnx DIR or --engine DIR, not both")
        return "ort" if self.onnx_dir else "trt" if self.engine_dir else "torch"

    def refuse_threshold_skip(self) -> None:
        """For backends that run exported graphs (every block runs in decode)."""
        if self.threshold_skip:
            raise UserError(THRESHOLD_TORCH_ONLY)


class Created(NamedTuple):
    backend: Backend
    tokenizer: Any  # a Hugging Face tokenizer with a pad token
    description: dict  # what was built, as `tokenskip generate --json` prints it


def load_tokenizer(path: Path, flag: str):
    """A tokenizer folder (with a pad token: the EOS when it has none), or a one-line error naming `flag`."""
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise UserError(f"{flag}: tokenizer folder {path} not found (pass --tokenizer DIR)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag}: cannot load the tokenizer in {path}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------- the registry
class BackendFactory(Protocol):
    def create(self, spec: BackendSpec) -> Created: ...

    def open(self, spec: BackendSpec) -> Backend: ...


@dataclass(frozen=True)
class Registered:
    name: str
    factory: BackendFactory
    features: frozenset[str]


_REGISTRY: dict[str, Registered] = {}
_builtins_loaded = False


def register_backend(name: str, *, features=()):
    """Decorator: register `factory` (a class or object with create(spec) and open(spec)) as `name`."""
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"register_backend({name!r}): unknown features {sorted(unknown)} (known: {FEATURES})")

    def add(factory):
        for method in ("create", "open"):
            if not callable(getattr(factory, method, None)):
                raise TypeError(f"register_backend({name!r}): {factory!r} has no {method}(spec)")
        old = _REGISTRY.get(name)
        if old is not None and getattr(old.factory, "__qualname__", None) != getattr(factory, "__qualname__", None):
            raise ValueError(f"backend {name!r} is already registered by {old.factory!r}")
        _REGISTRY[name] = Registered(name, factory, frozenset(features))
        return factory
    return add


def _registry() -> dict[str, Registered]:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")
    return _REGISTRY


def _order(reg: Registered) -> int:
    """The built-ins first, in BUILTIN_MODULES order; then the others as registered."""
    module = getattr(reg.factory, "__module__", "")
    builtin = [f"{__package__}.{m}" for m in BUILTIN_MODULES]
    return builtin.index(module) if module in builtin else len(builtin)


def backend_names(feature: str | None = None) -> list[str]:
    """Registered names (the built-ins first), those with `feature` when given."""
    return [r.name for r in sorted(_registry().values(), key=_order) if feature is None or feature in r.features]


def registered(name: str) -> Registered:
    reg = _registry()
    if name not in reg:
        raise UserError(f"--backend {name}: no such backend (registered: {', '.join(reg)})")
    return reg[name]


def _spec(spec: BackendSpec | str, values: dict) -> BackendSpec:
    return BackendSpec(backend=spec, **values) if isinstance(spec, str) else spec


def _checked(name: str, backend, members=BACKEND_MEMBERS) -> Backend:
    missing = [m for m in members if not hasattr(backend, m)]
    if missing:
        raise TypeError(f"backend {name!r} ({type(backend).__name__}) lacks {', '.join(missing)} "
                        "(the Backend protocol of deploy/runtime/base.py)")
    return backend


def create_backend(spec: BackendSpec | str, **values) -> Created:
    """-> (backend, tokenizer, description) for a spec, or for a name and spec fields."""
    spec = _spec(spec, values)
    name = spec.name
    created = Created(*registered(name).factory.create(spec))
    _checked(name, created.backend)
    return created


def open_backend(spec: BackendSpec | str, **values) -> Backend:
    """The backend alone (no tokenizer): what the benchmarks time (they call prefill and decode only)."""
    spec = _spec(spec, values)
    name = spec.name
    return _checked(name, registered(name).factory.open(spec), ("prefill", "decode"))
