"""Small ONNX graphs with tokenskip nodes, for engine-build tests without a real export.

`write_export(dir)` writes a folder shaped like `tokenskip export` output (export.json + model.onnx
+ decode.onnx) whose graphs route a toy block through TopKGather -> MatMul -> ScatterTokens. The
nodes carry plugin_namespace="tokenskip" and the model ships model-local function bodies made of
standard ops (the fallback TensorRT uses when our plugin library is not loaded), implementing
docs/ops.md exactly: TopK (ties: lower index first), then a second TopK on the float indices to
put the kept positions in ascending order (exact for S < 2^24), then GatherElements / gather + add +
ScatterElements (TensorRT-RTX lacks ScatterElements reduction="add").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DOMAIN = "tokenskip"
OPSET = 18
IR_VERSION = 10  # onnxruntime reads at most IR 13; onnx 1.23 writes 14 by default
DTYPES = {"float32": 1, "float16": 10, "bfloat16": 16}  # TensorProto enums


def _topk_gather_function():
    from onnx import AttributeProto, TensorProto, helper

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [1], [value]))

    def ref(name):  # Constant whose value_int reads the function attribute `name`
        node = helper.make_node("Constant", [], [name])
        attr = AttributeProto()
        attr.name, attr.ref_attr_name, attr.type = "value_int", name, AttributeProto.INT
        node.attribute.append(attr)
        return node

    nodes = [
        helper.make_node("Shape", ["hidden"], ["S"], start=1, end=2),      # [1]
        helper.make_node("Shape", ["hidden"], ["Hd"], start=2, end=3),     # [1]
        ref("keep_num"), ref("keep_den"), ref("min_keep"), const("one", 1), const("minus_one", -1),
        helper.make_node("Mul", ["keep_num", "S"], ["nS"]),
        helper.make_node("Add", ["nS", "keep_den"], ["t0"]),
        helper.make_node("Sub", ["t0", "one"], ["t1"]),
        helper.make_node("Div", ["t1", "keep_den"], ["ceil"]),            # ceil(num * S / den), integers >= 0
        helper.make_node("Max", ["ceil", "min_keep"], ["t2"]),
        helper.make_node("Min", ["t2", "S"], ["k"]),                       # [1]
        helper.make_node("TopK", ["scores", "k"], ["_v", "top"], axis=-1, largest=1, sorted=1),  # [B,k]
        helper.make_node("Cast", ["top"], ["top_f"], to=TensorProto.FLOAT),
        helper.make_node("TopK", ["top_f", "k"], ["_w", "order"], axis=-1, largest=0, sorted=1),
        helper.make_node("GatherElements", ["top", "order"], ["index"], axis=1),  # [B,k] ascending
        helper.make_node("Unsqueeze", ["index", "minus_one"], ["index3"]),       # [B,k,1]
        helper.make_node("Shape", ["index"], ["bk"]),
        helper.make_node("Concat", ["bk", "Hd"], ["bkh"], axis=0),
        helper.make_node("Expand", ["index3", "bkh"], ["index_h"]),             # [B,k,H]
        helper.make_node("GatherElements", ["hidden", "index_h"], ["kept"], axis=1),
    ]
    return helper.make_function(DOMAIN, "TopKGather", ["hidden", "scores"], ["kept", "index"], nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["keep_num", "keep_den", "min_keep"])


def _scatter_tokens_function():
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Constant", [], ["minus_one"], value=helper.make_tensor("m", TensorProto.INT64, [1], [-1])),
        helper.make_node("Unsqueeze", ["index", "minus_one"], ["index3"]),  # [B,k,1]
        helper.make_node("Shape", ["delta"], ["bkh"]),
        helper.make_node("Expand", ["index3", "bkh"], ["index_h"]),         # [B,k,H]
        helper.make_node("GatherElements", ["hidden", "index_h"], ["rows"], axis=1),
        helper.make_node("Add", ["rows", "delta"], ["updated"]),
        helper.make_node("ScatterElements", ["hidden", "index_h", "updated"], ["hidden_out"], axis=1),
    ]
    return helper.make_function(DOMAIN, "ScatterTokens", ["hidden", "delta", "index"], ["hidden_out"], nodes,
                                [helper.make_opsetid("", OPSET)])


def routed_block_model(hidden: int = 64, dtype: str = "float32", keep_num: int = 3, keep_den: int = 5,
                       min_keep: int = 1, seq: str | int = "seq", seed: int = 0):
    """x [batch, seq, H], scores [batch, seq] -> y [batch, seq, H], index [batch, k].

    y = ScatterTokens(x, TopKGather(x, scores).kept @ W, index): one routed block in miniature.
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
    ns = {"plugin_namespace": DOMAIN}
    nodes = [
        helper.make_node("TopKGather", ["x", "scores"], ["kept", "index"], name="route_gather", domain=DOMAIN,
                         keep_num=keep_num, keep_den=keep_den, min_keep=min_keep, **ns),
        helper.make_node("MatMul", ["kept", "W"], ["delta"], name="block"),
        helper.make_node("ScatterTokens", ["x", "delta", "index"], ["y"], name="route_scatter", domain=DOMAIN, **ns),
    ]
    graph = helper.make_graph(
        nodes, "routed_block",
        [helper.make_tensor_value_info("x", elem, ["batch", seq, hidden]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", seq])],
        [helper.make_tensor_value_info("y", elem, ["batch", seq, hidden]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", "kept"])],
        initializer=[w_init])
    return helper.make_model(graph, ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                             functions=[_topk_gather_function(), _scatter_tokens_function()])


def _bf16_tensor(name: str, arr: np.ndarray):
    from onnx import TensorProto, helper

    u = arr.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even (finite values)
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(arr.shape), bits.astype(np.uint16).tobytes(), raw=True)


def _io(model) -> dict:
    out = {}
    for v in model.graph.input:
        dims = [d.dim_param or int(d.dim_value) for d in v.type.tensor_type.shape.dim]
        name = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64"}[v.type.tensor_type.elem_type]
        out[v.name] = {"dtype": name, "shape": dims}
    return out


def write_export(out_dir: str | Path, hidden: int = 64, dtype: str = "float32", keep_num: int = 3, keep_den: int = 5,
                 min_keep: int = 1, decode: bool = True) -> Path:
    """A folder shaped like `tokenskip export` output: export.json + model.onnx (+ decode.onnx)."""
    import json

    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphs = {}
    prefill = routed_block_model(hidden, dtype, keep_num, keep_den, min_keep)
    onnx.save(prefill, out / "model.onnx")
    graphs["prefill"] = {"file": "model.onnx", "inputs": _io(prefill)}
    if decode:  # one new token per step: the decode graph routes a length-1 sequence
        dec = routed_block_model(hidden, dtype, keep_num, keep_den, min_keep, seq=1)
        onnx.save(dec, out / "decode.onnx")
        graphs["decode"] = {"file": "decode.onnx", "inputs": _io(dec)}
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
    side = {"format": "tokenskip-export", "version": 1, "dtype": short, "max_seq_len": 4096, "graphs": graphs,
            "custom_ops": {"domain": DOMAIN, "version": 1, "plugin_namespace": DOMAIN,
                           "ops": ["TopKGather", "ScatterTokens"]}}
    (out / "export.json").write_text(json.dumps(side, indent=2) + "\n", encoding="utf-8")
    return out


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
