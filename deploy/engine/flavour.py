"""A thin layer over the two TensorRT Python packages we support, imported lazily.

- `tensorrt` (full TensorRT 10, needs a GPU to build; what users on a CUDA machine install), and
- TensorRT-RTX (`tensorrt_rtx_bindings` from PyPI, or `tensorrt_rtx` from the SDK), which builds
  engines ahead of time on a machine with no GPU (SM80/86/89/120 targets, not SM90).

Everything the engine builder needs that differs between them lives here: module lookup, the
libtensorrt_rtx.so symlink fix, plugin library (un)loading through the registry, and the plugin
identity of a network layer. Nothing here imports TensorRT at module import time.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from tokenskip.errors import UserError

FLAVOURS = ("tensorrt", "tensorrt-rtx")
PLUGIN_NAMESPACE = "tokenskip"
_MODULES = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx")}
_INSTALL = {"tensorrt": "pip install 'tokenskip[tensorrt]' (tensorrt-cu13, on a CUDA machine)",
            "tensorrt-rtx": "pip install 'tokenskip[tensorrt-rtx]' (tensorrt-rtx-cu13-libs + -bindings)"}
_loaded: dict[tuple[int, str], tuple[ModuleType, Any]] = {}  # (id(module), library path) -> (module, handle)


@dataclasses.dataclass
class Flavour:
    """An imported TensorRT flavour: `trt` is the module, `name` one of FLAVOURS."""

    name: str
    trt: ModuleType

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    @property
    def version(self) -> str:
        return str(getattr(self.trt, "__version__", "unknown"))

    @property
    def always_strongly_typed(self) -> bool:
        """TensorRT-RTX has no FP16/BF16 builder flags: precision is the ONNX file's."""
        return not hasattr(self.trt.BuilderFlag, "FP16")

    def registry(self):
        return self.trt.get_plugin_registry()

    def tokenskip_creators(self) -> list[str]:
        return sorted(f"{c.name}/{c.plugin_version}" for c in self.registry().all_creators
                      if c.plugin_namespace == PLUGIN_NAMESPACE)

    def load_plugins(self, lib: str | os.PathLike) -> None:
        """Register libtokenskip_plugins.so's creators (once per process and path). TensorRT's
        `load_library` returns None when any creator of the library is already registered, so a
        copy this process loaded from another path (the build cache vs the engine folder) is
        deregistered first, and the result is checked."""
        path = str(Path(lib).resolve())
        if (id(self.trt), path) in _loaded:
            return
        self._deregister_loaded()
        if self.tokenskip_creators():
            raise UserError(f"cannot load the plugin library {lib}: tokenskip plugins "
                            f"({', '.join(self.tokenskip_creators())}) are already registered in this process by a "
                            "library tokenskip did not load")
        handle = self.registry().load_library(path)
        if handle is None or not self.tokenskip_creators():
            raise UserError(f"TensorRT ({self.name}) could not load the plugin library {lib}: rebuild it with "
                            "`tokenskip plugins build`")
        _loaded[(id(self.trt), path)] = (self.trt, handle)

    def unload_plugins(self) -> None:
        """Deregister every tokenskip plugin library this process loaded (for --no-plugins builds)."""
        self._deregister_loaded()
        if self.tokenskip_creators():
            raise UserError("tokenskip plugins are registered by something else in this process; cannot build "
                            "with --no-plugins here")

    def _deregister_loaded(self) -> None:
        """Deregister the libraries this process loaded into this flavour's registry."""
        reg = self.registry()
        for key, (module, handle) in list(_loaded.items()):
            if module is self.trt:
                reg.deregister_library(handle)
                del _loaded[key]

    def plugin_of(self, layer) -> tuple[str, str] | None:
        """(plugin name, namespace) of a PLUGIN_V3 network layer, else None."""
        trt = self.trt
        if layer.type != trt.LayerType.PLUGIN_V3:
            return None
        layer.__class__ = trt.IPluginV3Layer
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        core.__class__ = trt.IPluginV3OneCore
        return str(core.plugin_name), str(core.plugin_namespace)


def _import_first(names: tuple[str, ...]) -> ModuleType | None:
    for name in names:
        try:
            return __import__(name)
        except ImportError:
            continue
    return None


def get_flavour(name: str | None = None) -> Flavour:
    """Import TensorRT: `name` in FLAVOURS, or None for the full package if installed, else RTX."""
    if name is not None and name not in FLAVOURS:
        raise UserError(f"--backend {name}: choose from {', '.join(FLAVOURS)}")
    for candidate in ([name] if name else list(FLAVOURS)):
        module = _import_first(_MODULES[candidate])
        if module is not None:
            backend = Flavour(candidate, module)
            if backend.is_rtx:
                ensure_rtx_parser_symlink()
            return backend
        if name:
            raise UserError(f"--backend {name}: not installed: {_INSTALL[name]}")
    raise UserError("no TensorRT installed: " + " or ".join(_INSTALL.values()))


def ensure_rtx_parser_symlink() -> None:
    """Create libtensorrt_rtx.so -> libtensorrt_rtx.so.1 next to the RTX ONNX parser if missing.

    The parser dlopen()s the unversioned name when it imports a plugin node, the PyPI wheel ships
    only the versioned one, and the failure aborts the process ("terminate called without an
    active exception"). The parser's RPATH is $ORIGIN, so a link in its folder fixes it.
    """
    try:
        import tensorrt_rtx_libs
    except ImportError:
        return  # SDK install: the unversioned name ships with it
    folder = Path(tensorrt_rtx_libs.__file__).resolve().parent
    link = folder / "libtensorrt_rtx.so"
    if link.exists():
        return
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if d and (Path(d) / "libtensorrt_rtx.so").exists():
            return
    try:
        if link.is_symlink():  # dangling
            link.unlink()
        link.symlink_to("libtensorrt_rtx.so.1")
    except OSError as exc:
        raise UserError(f"TensorRT-RTX's ONNX parser needs {link} -> libtensorrt_rtx.so.1 and {folder} is not "
                        f"writable ({exc.strerror}): create that link once as the environment's owner, or put one "
                        "in a folder on LD_LIBRARY_PATH") from None
