"""Small ONNX graphs with tokenskip nodes, for engine-build tests without a real export.

`routed_block_model()` is a graph that routes a toy block through TopKGather -> MatMul ->
ScatterTokens (tests/test_engine_build.py wraps it as an export folder); `compiled_library()`
builds the plugin library once per process. The nodes carry plugin_namespace="tokenskip" and the
model ships the exporter's own model-local function bodies (`tokenskip.export.onnx_ops.function_protos`, standard ops only): the fallback
TensorRT uses when our plugin library is not loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokenskip.export.onnx_ops import DOMAIN, DOMAIN_VERSION, IR_VERSION, PLUGIN_NAMESPACE, function_protos

OPSET = 18
DTYPES = {"float32": 1, "float16": 10, "bfloat16": 16}  # TensorProto enums


def routed_block_model(hidden: int = 64, dtype: str = "float32", keep_num: int = 3, keep_den: int = 5,
                       min_keep: int = 1, seq: str | int = "seq", seed: int = 0, with_mask: bool = False):
    """x [batch, seq, H], scores [batch, seq] (+ mask [batch, seq] int64) -> y [batch, seq, H], index [batch, k].

    y = ScatterTokens(x, TopKGather(x, scores, valid).kept @ W, index): one routed block in miniature.
    valid = mask != 0 with `with_mask` (as the export's attention_mask), else every token is valid.
    """
    from onnx import TensorProto, helper, numpy_helper

    elem = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)  # [H,H]
    if dtype == "float32":
        w_init = numpy_helper.from_array(w, "W")
    elif dtype == "float16":
        w_init = numpy_helper.from_array(w.astype(np.float16), "W")
    else:
        w_init = _bf16_tensor("W", w)
    ns = {"plugin_namespace": PLUGIN_NAMESPACE}
    inputs = [helper.make_tensor_value_info("x", elem, ["batch", seq, hidden]),
              helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", seq])]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", seq]))
        valid = [helper.make_node("Cast", ["mask"], ["valid"], to=TensorProto.BOOL, name="valid")]
    else:
        valid = [helper.make_node("Shape", ["scores"], ["scores_shape"], name="scores_shape"),
                 helper.make_node("ConstantOfShape", ["scores_shape"], ["valid"], name="valid",
                                  value=helper.make_tensor("true", TensorProto.BOOL, [1], [True]))]
    nodes = [
        *valid,
        helper.make_node("TopKGather", ["x", "scores", "valid"], ["kept", "index"], name="route_gather",
                         domain=DOMAIN, keep_num=keep_num, keep_den=keep_den, min_keep=min_keep, **ns),
        helper.make_node("MatMul", ["kept", "W"], ["delta"], name="block"),
        helper.make_node("ScatterTokens", ["x", "delta", "index"], ["y"], name="route_scatter", domain=DOMAIN, **ns),
    ]
    graph = helper.make_graph(
        nodes, "routed_block", inputs,
        [helper.make_tensor_value_info("y", elem, ["batch", seq, hidden]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", "kept"])],
        initializer=[w_init])
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=opsets,
                             functions=function_protos(OPSET))


def _bf16_tensor(name: str, arr: np.ndarray):
    from onnx import TensorProto, helper

    u = arr.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even (finite values)
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(arr.shape), bits.astype(np.uint16).tobytes(), raw=True)


_COMPILED: dict[str, Path] = {}


def compiled_library(arch: str = "90") -> Path:
    """Compile the plugin library once per test session (forced, into a fresh temporary cache).

    Tests share it so the ~15 s compile happens once; one architecture keeps it short.
    Raises UserError (from the toolchain lookup) when nvcc is not installed.
    """
    if arch not in _COMPILED:
        import tempfile

        from .build import build_library

        root = Path(tempfile.mkdtemp(prefix="tokenskip-plugins-test-"))  # laid out like cache_dir()
        _COMPILED[arch] = build_library(arch=arch, force=True, cache=root / "plugins")
    return _COMPILED[arch]
