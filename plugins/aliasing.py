"""In-place ScatterTokens under TensorRT: `IPluginV3OneBuildV2::getAliasedInput`.

ScatterTokens can declare its output `hidden_out` an alias of its input `hidden`; TensorRT then hands
the plugin one buffer and the kernel adds the k processed rows into it, instead of writing a fresh
[B,S,H] copy of the residual stream in every routed block (docs/plugins.md has the bytes saved).

TensorRT only allows it with `PreviewFeature.ALIASED_PLUGIN_IO_10_03` on the builder config, and
TensorRT-RTX 1.7 fails a build whose plugin declares an alias without that feature. A plugin cannot
see the builder config, so the library has a switch, off by default (plain builds keep the copy
path), that this context manager turns on together with the preview feature:

    with in_place_scatter(trt, config, lib) as on:   # on: whether the alias is offered
        serialized = builder.build_serialized_network(network, config)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

PREVIEW_FEATURE = "ALIASED_PLUGIN_IO_10_03"


def _handle(lib: str | os.PathLike) -> ctypes.CDLL:
    # the same file TensorRT's registry loaded: dlopen returns that very handle, so the switch is shared
    handle = ctypes.CDLL(str(Path(lib).resolve()))
    handle.tokenskip_plugins_supports_aliased_io.restype = ctypes.c_int
    handle.tokenskip_plugins_set_aliased_io.argtypes = [ctypes.c_int]
    handle.tokenskip_plugins_set_aliased_io.restype = None
    handle.tokenskip_plugins_aliases_granted.restype = ctypes.c_int64
    return handle


def tensorrt_supports(trt) -> bool:
    """Whether this TensorRT module has the aliased-plugin-I/O preview feature (TensorRT >= 10.3)."""
    preview = getattr(trt, "PreviewFeature", None)
    return preview is not None and hasattr(preview, PREVIEW_FEATURE)


def library_supports(lib: str | os.PathLike) -> bool:
    """Whether the plugin library was compiled against headers with IPluginV3OneBuildV2."""
    return bool(_handle(lib).tokenskip_plugins_supports_aliased_io())


def aliases_granted(lib: str | os.PathLike) -> int:
    """How many times ScatterTokens gave TensorRT the alias in this process (getAliasedInput calls)."""
    return int(_handle(lib).tokenskip_plugins_aliases_granted())


@contextlib.contextmanager
def in_place_scatter(trt, config, lib: str | os.PathLike, enable: bool = True) -> Iterator[bool]:
    """Offer ScatterTokens' alias for the builds inside the block; yields whether it is offered.

    Falls back to the copy path (yields False) where TensorRT or the library lacks the feature. The
    library's switch is process-wide: it is reset on exit, so later builds are plain again."""
    handle = _handle(lib)
    on = enable and tensorrt_supports(trt) and bool(handle.tokenskip_plugins_supports_aliased_io())
    if on:
        config.set_preview_feature(getattr(trt.PreviewFeature, PREVIEW_FEATURE), True)
    handle.tokenskip_plugins_set_aliased_io(1 if on else 0)
    try:
        yield on
    finally:
        handle.tokenskip_plugins_set_aliased_io(0)
