"""The ONNX side of the two tokenskip custom ops (docs/ops.md): schemas, function bodies, and the
torch.onnx translation that turns `torch.ops.tokenskip.*` into `tokenskip::*` nodes.

- `register_schemas()` registers an `onnx.defs.OpSchema` for `tokenskip::TopKGather` and
  `tokenskip::ScatterTokens` (version 1) so the exporter can emit them and
  `onnx.checker.check_model(..., full_check=True)` accepts the nodes.
- `function_protos(opset)` builds the model-local ONNX functions (standard ops only), so ONNX
  Runtime, and TensorRT without our plugin library, run the file as is.
- `TRANSLATION_TABLE` is passed to `torch.onnx.export(..., custom_translation_table=...)`.
- `finalize(model_proto, opset)` is the post-pass: `plugin_namespace="tokenskip"` on every
  tokenskip node, the functions attached, the opset imports and IR version set.
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, defs, helper

DOMAIN = "tokenskip"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "tokenskip"
TOPK_GATHER = "TopKGather"
SCATTER_TOKENS = "ScatterTokens"
TOPK_ATTRS = ("keep_num", "keep_den", "min_keep")
IR_VERSION = 10  # onnxruntime 1.31/1.32 reads at most IR 13; onnx 1.23 would write 14
FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


# ------------------------------------------------------------------------------------------ schemas
def _schemas() -> list[defs.OpSchema]:
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    ns_attr = A("plugin_namespace", defs.OpSchema.AttrType.STRING,
                "TensorRT plugin namespace (\"tokenskip\"); ignored by everything else", required=False)
    topk = defs.OpSchema(
        TOPK_GATHER, DOMAIN, DOMAIN_VERSION,
        doc="Row b keeps its keep(L_b) best-scored valid tokens (NaN as -inf, ties: lower position "
            "first) plus its lowest k - keep(L_b) padding positions, in ascending order; "
            "k = keep(S), keep(n) = min(n, max(min_keep, ceil(keep_num * n / keep_den))), "
            "L_b = valid[b].sum(). See docs/ops.md.",
        inputs=[P("hidden", "T", "[B,S,H]"), P("scores", "F", "[B,S] float32"),
                P("valid", "V", "[B,S] bool, False on padding")],
        outputs=[P("kept", "T", "[B,k,H]"), P("index", "I", "[B,k] int64, ascending")],
        type_constraints=[("T", FLOAT_TYPES, "hidden dtype"), ("F", ["tensor(float)"], "scores"),
                          ("V", ["tensor(bool)"], "valid mask"), ("I", ["tensor(int64)"], "indices")],
        attributes=[A("keep_num", defs.OpSchema.AttrType.INT, "keep fraction numerator (>= 0)", required=True),
                    A("keep_den", defs.OpSchema.AttrType.INT, "keep fraction denominator (>= 1)", required=True),
                    A("min_keep", defs.OpSchema.AttrType.INT, "lower bound on k (>= 1)", required=True),
                    ns_attr],
    )
    scatter = defs.OpSchema(
        SCATTER_TOKENS, DOMAIN, DOMAIN_VERSION,
        doc="hidden_out = hidden; hidden_out[b, index[b, j]] += delta[b, j]. See docs/ops.md.",
        inputs=[P("hidden", "T", "[B,S,H]"), P("delta", "T", "[B,k,H]"), P("index", "I", "[B,k]")],
        outputs=[P("hidden_out", "T", "[B,S,H]")],
        type_constraints=[("T", FLOAT_TYPES, "hidden dtype"), ("I", ["tensor(int64)"], "indices")],
        attributes=[ns_attr],
    )
    return [topk, scatter]


def register_schemas() -> None:
    """Register both schemas once per process (idempotent)."""
    for schema in _schemas():
        try:
            defs.get_schema(schema.name, schema.since_version, schema.domain)
            continue  # already there
        except defs.SchemaError:
            pass
        defs.register_schema(schema)


# --------------------------------------------------------------------------------- function bodies
def _attr_ref(name: str, ref: str) -> AttributeProto:
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, AttributeProto.INT
    return a


def _const_i64(out: str, value: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, TensorProto.INT64, [1], [value]))


def _keep_count_nodes(x: str, out: str) -> list[onnx.NodeProto]:
    """out = min(x, max(min_keep, (keep_num * x + keep_den - 1) // keep_den)) on int64 tensors (x >= 0);
    reads the Constants `num`, `den`, `mink` and `one` of the TopKGather body."""
    return [
        helper.make_node("Mul", ["num", x], [f"{out}_nx"]),
        helper.make_node("Add", [f"{out}_nx", "den"], [f"{out}_t0"]),
        helper.make_node("Sub", [f"{out}_t0", "one"], [f"{out}_t1"]),
        helper.make_node("Div", [f"{out}_t1", "den"], [f"{out}_ceil"]),  # integer ceil (all >= 0)
        helper.make_node("Max", [f"{out}_ceil", "mink"], [f"{out}_t2"]),
        helper.make_node("Min", [f"{out}_t2", x], [out]),
    ]


def topk_gather_function(opset: int) -> onnx.FunctionProto:
    """TopKGather as standard ops, the per-row rule of docs/ops.md without a per-row TopK:

    k = keep(S) and k_b = keep(L_b) in integer arithmetic; the k_b-th best valid score `thr` is
    column k_b - 1 of one TopK(k) over the scores with padding at -inf (NaN -> -inf first); row b
    takes its valid tokens above thr, the first (k_b - #above) equal to thr by position (CumSum),
    and its first k - k_b padding positions; a TopK(k) of that 0/1 mask (ties: lower index first)
    lists the taken positions in ascending order; GatherElements copies the rows."""
    ninf = helper.make_tensor("ninf", TensorProto.FLOAT, [], [float("-inf")])
    nodes = [
        helper.make_node("Shape", ["hidden"], ["S"], start=1, end=2),  # [1]
        helper.make_node("Shape", ["hidden"], ["Hdim"], start=2, end=3),  # [1]
        helper.make_node("Constant", [], ["num"]),  # scalars from the attributes (set below)
        helper.make_node("Constant", [], ["den"]),
        helper.make_node("Constant", [], ["mink"]),
        _const_i64("one", 1),
        _const_i64("zero", 0),
        _const_i64("axis1", 1),
        _const_i64("minus_one", -1),
        helper.make_node("Constant", [], ["neg_inf"], value=ninf),
        # k = keep(S) for the batch, k_b = keep(L_b) per row
        *_keep_count_nodes("S", "k"),  # [1]
        helper.make_node("Cast", ["valid"], ["valid_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["valid_i", "axis1"], ["L"], keepdims=1),  # [B,1]
        *_keep_count_nodes("L", "kb"),  # [B,1]
        # selection keys: NaN ranks like -inf; padding never competes with real tokens
        helper.make_node("IsNaN", ["scores"], ["is_nan"]),
        helper.make_node("Where", ["is_nan", "neg_inf", "scores"], ["key"]),  # [B,S]
        helper.make_node("Where", ["valid", "key", "neg_inf"], ["key_v"]),  # [B,S]
        helper.make_node("TopK", ["key_v", "k"], ["top_v", "top_i"], axis=-1, largest=1, sorted=1),  # [B,k]
        helper.make_node("Sub", ["kb", "one"], ["kb_m1"]),
        helper.make_node("Max", ["kb_m1", "zero"], ["thr_col"]),  # [B,1] (k_b = 0 only when L_b = 0)
        helper.make_node("GatherElements", ["top_v", "thr_col"], ["thr"], axis=1),  # [B,1] k_b-th best
        helper.make_node("Greater", ["key", "thr"], ["above"]),
        helper.make_node("And", ["valid", "above"], ["gt"]),  # [B,S]
        helper.make_node("Equal", ["key", "thr"], ["same"]),
        helper.make_node("And", ["valid", "same"], ["eq"]),  # [B,S]
        helper.make_node("Cast", ["gt"], ["gt_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["gt_i", "axis1"], ["n_gt"], keepdims=1),  # [B,1]
        helper.make_node("Sub", ["kb", "n_gt"], ["take_eq"]),  # [B,1] ties at thr to take, lowest first
        helper.make_node("Cast", ["eq"], ["eq_i"], to=TensorProto.INT64),
        helper.make_node("CumSum", ["eq_i", "axis1"], ["eq_rank"]),  # [B,S] inclusive
        helper.make_node("LessOrEqual", ["eq_rank", "take_eq"], ["eq_ok"]),
        helper.make_node("And", ["eq", "eq_ok"], ["sel_eq"]),
        helper.make_node("Not", ["valid"], ["pad"]),
        helper.make_node("Cast", ["pad"], ["pad_i"], to=TensorProto.INT64),
        helper.make_node("CumSum", ["pad_i", "axis1"], ["pad_rank"]),  # [B,S] inclusive
        helper.make_node("Sub", ["k", "kb"], ["fill"]),  # [B,1] padding slots of row b
        helper.make_node("LessOrEqual", ["pad_rank", "fill"], ["pad_ok"]),
        helper.make_node("And", ["pad", "pad_ok"], ["sel_pad"]),
        helper.make_node("Or", ["gt", "sel_eq"], ["sel_real"]),
        helper.make_node("Or", ["sel_real", "sel_pad"], ["taken"]),  # [B,S] exactly k per row
        helper.make_node("Cast", ["taken"], ["taken_f"], to=TensorProto.FLOAT),
        # equal values come out lower index first: the taken positions, ascending
        helper.make_node("TopK", ["taken_f", "k"], ["_taken_v", "index"], axis=-1, largest=1, sorted=1),  # [B,k]
        helper.make_node("Unsqueeze", ["index", "minus_one"], ["index3"]),  # [B,k,1]
        helper.make_node("Shape", ["index"], ["bk"]),  # [2]
        helper.make_node("Concat", ["bk", "Hdim"], ["bkh"], axis=0),  # [3]
        helper.make_node("Expand", ["index3", "bkh"], ["index_h"]),  # [B,k,H]
        helper.make_node("GatherElements", ["hidden", "index_h"], ["kept"], axis=1),  # [B,k,H]
    ]
    # the three attribute Constants read the function's attributes (attribute references)
    for node, ref in zip(nodes[2:5], TOPK_ATTRS):
        node.attribute.append(_attr_ref("value_int", ref))
    return helper.make_function(
        DOMAIN, TOPK_GATHER, inputs=["hidden", "scores", "valid"], outputs=["kept", "index"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(TOPK_ATTRS),
        doc_string="tokenskip::TopKGather reference body (docs/ops.md)")


def scatter_tokens_function(opset: int) -> onnx.FunctionProto:
    """ScatterTokens as gather + add + ScatterElements (no `reduction`: TensorRT-RTX lacks 'add')."""
    nodes = [
        _const_i64("minus_one", -1),
        helper.make_node("Unsqueeze", ["index", "minus_one"], ["index3"]),  # [B,k,1]
        helper.make_node("Shape", ["delta"], ["bkh"]),  # [3]
        helper.make_node("Expand", ["index3", "bkh"], ["index_h"]),  # [B,k,H]
        helper.make_node("GatherElements", ["hidden", "index_h"], ["rows"], axis=1),  # [B,k,H]
        helper.make_node("Add", ["rows", "delta"], ["updated"]),  # in the hidden dtype
        helper.make_node("ScatterElements", ["hidden", "index_h", "updated"], ["hidden_out"], axis=1),
    ]
    return helper.make_function(
        DOMAIN, SCATTER_TOKENS, inputs=["hidden", "delta", "index"], outputs=["hidden_out"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=[],
        doc_string="tokenskip::ScatterTokens reference body (docs/ops.md)")


def function_protos(opset: int) -> list[onnx.FunctionProto]:
    return [topk_gather_function(opset), scatter_tokens_function(opset)]


# ------------------------------------------------------------------------- torch.onnx translation
def _translation_table() -> dict:
    import torch
    from onnxscript import values

    import tokenskip.ops  # noqa: F401  (registers torch.ops.tokenskip.*)

    register_schemas()
    ts = values.Opset(DOMAIN, DOMAIN_VERSION)

    def topk_gather(hidden, scores, valid, keep_num: int, keep_den: int, min_keep: int):
        return ts.TopKGather(hidden, scores, valid, keep_num=keep_num, keep_den=keep_den, min_keep=min_keep,
                             plugin_namespace=PLUGIN_NAMESPACE)

    def scatter_tokens(hidden, delta, index):
        return ts.ScatterTokens(hidden, delta, index, plugin_namespace=PLUGIN_NAMESPACE)

    def sort(self, dim: int = -1, descending: bool = False, stable: bool | None = None):
        # A full-length TopK *is* a stable sort: ONNX TopK puts equal values lower index first,
        # which is exactly torch.sort(stable=True) in both directions. (torch.onnx 2.13 has no
        # translation for aten.sort.stable; the learned router's rank feature uses it.)
        from onnxscript import opset18 as op

        if dim < 0:
            size = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
        else:
            size = op.Shape(self, start=dim, end=dim + 1)
        return op.TopK(self, size, axis=dim, largest=1 if descending else 0, sorted=1)

    def sort_stable(self, stable: bool | None = None, dim: int = -1, descending: bool = False):
        return sort(self, dim=dim, descending=descending)

    return {torch.ops.tokenskip.topk_gather.default: topk_gather,
            torch.ops.tokenskip.scatter_tokens.default: scatter_tokens,
            torch.ops.aten.sort.default: sort,
            torch.ops.aten.sort.stable: sort_stable}


def translation_table() -> dict:
    return _translation_table()


# ------------------------------------------------------------------------------------- post-pass
def finalize(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """plugin_namespace on every tokenskip node, model-local functions, opset imports, IR 10.

    The function bodies import the default-domain opset the model actually imports (the checker
    requires them to agree), which is `opset` unless the exporter raised it."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    uses = False
    for graph_node in all_nodes(model.graph):
        if graph_node.domain != DOMAIN:
            continue
        uses = True
        if not any(a.name == "plugin_namespace" for a in graph_node.attribute):
            graph_node.attribute.append(helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
    del model.functions[:]  # anything the exporter left for our domain is replaced by our bodies
    if uses:
        model.functions.extend(function_protos(opset))
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    else:
        keep = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    model.ir_version = IR_VERSION
    return model


def all_nodes(graph: onnx.GraphProto):
    """Every node of the graph and of its subgraphs (the If branches of tokenskip.export.decode_branch)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from all_nodes(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from all_nodes(g)


def single_op_model(op: str, opset: int, hidden_dtype: int = TensorProto.FLOAT, **attrs) -> onnx.ModelProto:
    """A model holding just one tokenskip node (+ its function): for testing the bodies alone."""
    if op == TOPK_GATHER:
        inputs = [helper.make_tensor_value_info("hidden", hidden_dtype, ["B", "S", "H"]),
                  helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "S"]),
                  helper.make_tensor_value_info("valid", TensorProto.BOOL, ["B", "S"])]
        outputs = [helper.make_tensor_value_info("kept", hidden_dtype, ["B", "k", "H"]),
                   helper.make_tensor_value_info("index", TensorProto.INT64, ["B", "k"])]
        node = helper.make_node(TOPK_GATHER, ["hidden", "scores", "valid"], ["kept", "index"], domain=DOMAIN, **attrs)
    elif op == SCATTER_TOKENS:
        inputs = [helper.make_tensor_value_info("hidden", hidden_dtype, ["B", "S", "H"]),
                  helper.make_tensor_value_info("delta", hidden_dtype, ["B", "k", "H"]),
                  helper.make_tensor_value_info("index", TensorProto.INT64, ["B", "k"])]
        outputs = [helper.make_tensor_value_info("hidden_out", hidden_dtype, ["B", "S", "H"])]
        node = helper.make_node(SCATTER_TOKENS, ["hidden", "delta", "index"], ["hidden_out"], domain=DOMAIN, **attrs)
    else:
        raise ValueError(f"unknown op {op!r}")
    graph = helper.make_graph([node], op, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    return finalize(model, opset)
