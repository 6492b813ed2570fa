"""tokenskip.plugins: CUDA kernels and TensorRT IPluginV3 plugins for the two tokenskip ops.

- `build_library(arch=None, force=False) -> Path` compiles libtokenskip_plugins.so (cached).
- `tokenskip.plugins.kernels` calls the kernels' C entry points on torch CUDA tensors.
- `tokenskip.plugins.testing` writes small ONNX graphs with tokenskip nodes for engine tests.
"""

from __future__ import annotations

from .build import LIB_NAME, build_library, check_library, library_source_hash, source_hash

__all__ = ["LIB_NAME", "build_library", "check_library", "library_source_hash", "source_hash"]
