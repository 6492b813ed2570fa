"""tokenskip.plugins: CUDA kernels and TensorRT IPluginV3 plugins for the two tokenskip ops.

- `build_library(arch=None, force=False, kernels_only=False) -> Path` compiles libtokenskip_plugins.so
  (cached); `kernels_only` builds libtokenskip_kernels.so, the kernels without TensorRT.
- `tokenskip.plugins.aliasing.in_place_scatter(trt, config, lib)` makes ScatterTokens in place in a build.
- `tokenskip.plugins.kernels` calls the kernels' C entry points on torch CUDA tensors.
- `tokenskip.plugins.testing` writes small ONNX graphs with tokenskip nodes for engine tests.
"""

from __future__ import annotations

from .build import KERNELS_LIB_NAME, LIB_NAME, build_library, check_library, library_source_hash, source_hash

__all__ = ["KERNELS_LIB_NAME", "LIB_NAME", "build_library", "check_library", "library_source_hash", "source_hash"]
