"""Decode at dense cost: the one graph becomes `If(S == 1, decode, routed)`, weights stored once.

At S = 1 every routed block keeps its one token (k = S = 1), so the router, its features, the
attention-score window and the two custom ops compute nothing that changes the result; yet in one
traced graph they all run at every decode step (ONNX Runtime CPU, smollm2-135m: routed decode cost
~12% more than dense). This post-pass, on the graph proto loaded without its weights, rewrites

    graph(inputs) -> outputs
into
    cond = (Shape(input_ids)[1] == 1)                       # 0-D bool
    outputs = If(cond, then_branch=decode, else_branch=routed)

- `routed` (else) is the traced graph as it was, node for node (prefill, chunked prefill).
- `decode` (then) is a copy where each `TopKGather(hidden, scores, valid)` becomes
  `kept = hidden[:, :k]`, `index = zeros[B,k]` and each `ScatterTokens(hidden, delta, index)`
  becomes `hidden + Pad(delta to S rows)`; at S = 1 (k = 1) that is the ops' own output (one
  slot, position 0; the body's Add), so logits and cache rows are bit-identical to the routed
  path. Dead-code removal then drops the router, its features, the forced-token masks and the
  score window: they only fed the ops' `scores` input.

Both branches read the weights as outer-scope initializers (nodes computed from initializers
alone stay outside too), so the file and ONNX Runtime hold them once; the graph's inputs and
outputs are unchanged. TensorRT shape-checks both branches at every profile point and requires
their outputs' shapes to be provably equal: the decode branch keeps the routed shapes for any S
(Slice/Pad above), and both branches reshape the outputs with a `kept_l` dim to one outer shape
tensor (`keep(S)` from the op's attributes). TensorRT-RTX 1.7 cannot compile plugin layers inside
a conditional, so engine builds parse `routed_only(model)` (docs/export.md, "Decode path").
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from . import onnx_ops

DECODE = "decode/"  # prefix of every value the decode branch defines
ROUTED = "routed/"  # prefix of the routed branch's outputs (outer-scope names may not be shadowed)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Outer:
    """Shape tensors computed once in the outer scope (cheap int64 arithmetic on S) and read by both
    branches: S, B, constants, and per keep fraction k = keep(S), [B,k] and the Pad amounts S - k."""

    def __init__(self, ids: str) -> None:
        self.nodes = [helper.make_node("Shape", [ids], ["ts_s1/batch"], start=0, end=1),  # [1]
                      helper.make_node("Shape", [ids], ["ts_s1/seq"], start=1, end=2)]  # [1]
        self.dims = {"batch": "ts_s1/batch", "seq": "ts_s1/seq"}
        self.keeps: dict[tuple, str] = {}

    def const(self, *values: int) -> str:
        name = "ts_s1/c" + "_".join(str(v) for v in values)
        if name not in self.dims.values():
            self.dims[name] = name
            self.nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(
                "c", TensorProto.INT64, [len(values)], list(values))))
        return name

    def keep(self, topk: onnx.NodeProto) -> str:
        """k = keep(S) = min(S, max(min_keep, (keep_num*S + keep_den - 1) // keep_den)) ([1] int64),
        the op's own output width (docs/ops.md)."""
        a = _attrs(topk)
        key = (a["keep_num"], a["keep_den"], a["min_keep"])
        if key not in self.keeps:
            out = "ts_s1/k_{}_{}_{}".format(*key)
            s, num, den = self.dims["seq"], self.const(key[0]), self.const(key[1])
            self.nodes += [helper.make_node("Mul", [s, num], [f"{out}/nx"]),
                           helper.make_node("Add", [f"{out}/nx", self.const(key[1] - 1)], [f"{out}/t"]),
                           helper.make_node("Div", [f"{out}/t", den], [f"{out}/ceil"]),
                           helper.make_node("Max", [f"{out}/ceil", self.const(key[2])], [f"{out}/m"]),
                           helper.make_node("Min", [f"{out}/m", s], [out]),
                           helper.make_node("Concat", [self.dims["batch"], out], [f"{out}/bk"], axis=0),  # [B,k]
                           helper.make_node("Sub", [s, out], [f"{out}/skip"]),  # S - k
                           helper.make_node("Concat", [self.const(0, 0, 0, 0), f"{out}/skip", self.const(0)],
                                            [f"{out}/pads"], axis=0)]  # Pad [B,k,H] -> [B,S,H]
            self.keeps[key] = out
        return self.keeps[key]


def _decode_nodes(nodes: list[onnx.NodeProto], outer: _Outer) -> list[onnx.NodeProto]:
    """The S = 1 path: each custom op replaced by what it computes at k = S = 1, written so that the
    shapes stay those of the routed path for every S (TensorRT checks both branches' shapes at
    every profile point, though it runs one): TopKGather -> kept = hidden[:, :k] (at S = 1: hidden),
    index = zeros [B,k] (position 0); ScatterTokens -> hidden + Pad(delta, to S rows) (at S = 1:
    hidden + delta, exactly the op body's Add)."""
    out, k_of_index = [], {}
    for n in nodes:
        if n.domain == onnx_ops.DOMAIN and n.op_type == onnx_ops.TOPK_GATHER:
            hidden, (kept, index) = n.input[0], n.output
            k = outer.keep(n)
            k_of_index[index] = k
            out += [helper.make_node("Slice", [hidden, outer.const(0), k, outer.const(1)], [kept],
                                     name=f"{kept}/s1"),  # [B,k,H]
                    helper.make_node("ConstantOfShape", [f"{k}/bk"], [index], name=f"{index}/s1",
                                     value=helper.make_tensor("zero", TensorProto.INT64, [1], [0]))]  # [B,k]
        elif n.domain == onnx_ops.DOMAIN and n.op_type == onnx_ops.SCATTER_TOKENS:
            hidden, delta, index = n.input
            padded = f"{n.output[0]}/delta_rows"
            out += [helper.make_node("Pad", [delta, f"{k_of_index[index]}/pads"], [padded], name=padded),  # [B,S,H]
                    helper.make_node("Add", [hidden, padded], [n.output[0]], name=f"{n.output[0]}/s1")]
        else:
            out.append(n)
    return out


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in their original (topological) order."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    keep, stack = set(), list(outputs)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in keep:
            continue
        keep.add(i)
        stack += [x for x in nodes[i].input if x]
    return [n for i, n in enumerate(nodes) if i in keep]


def _split_constants(g: onnx.GraphProto) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(the rest, the nodes computed from initializers and constants alone). The latter stay in the
    outer scope, shared: ONNX Runtime folds e.g. the lm_head's Transpose of the tied embedding into a
    new tensor per graph that holds the node, so one copy per branch would hold it twice (113 MB on
    smollm2-135m, measured)."""
    known = {t.name for t in g.initializer}
    rest, shared = [], []
    for n in g.node:
        if all(not x or x in known for x in n.input):
            shared.append(n)
            known.update(n.output)
        else:
            rest.append(n)
    return rest, shared


def _renamed(node: onnx.NodeProto, names: dict[str, str]) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    for i, x in enumerate(new.input):
        new.input[i] = names.get(x, x)
    for i, x in enumerate(new.output):
        new.output[i] = names.get(x, x)
    if new.name:
        new.name = names.get(new.name, new.name)
    return new


def _keep_shape_nodes(topk: onnx.NodeProto, s: str, out: str) -> list[onnx.NodeProto]:
    """out = keep(S) = min(S, max(min_keep, (keep_num*S + keep_den - 1) // keep_den)) ([1] int64)."""
    a = _attrs(topk)
    c = {k: f"{out}/{k}" for k in ("num", "den1", "den", "mink")}
    vals = {"num": a["keep_num"], "den1": a["keep_den"] - 1, "den": a["keep_den"], "mink": a["min_keep"]}
    nodes = [helper.make_node("Constant", [], [c[k]], value=helper.make_tensor(c[k], TensorProto.INT64, [1], [v]))
             for k, v in vals.items()]
    return nodes + [helper.make_node("Mul", [s, c["num"]], [f"{out}/nx"]),
                    helper.make_node("Add", [f"{out}/nx", c["den1"]], [f"{out}/t"]),
                    helper.make_node("Div", [f"{out}/t", c["den"]], [f"{out}/ceil"]),
                    helper.make_node("Max", [f"{out}/ceil", c["mink"]], [f"{out}/m"]),
                    helper.make_node("Min", [f"{out}/m", s], [out])]


def add_decode_branch(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite `model` (in place, weights not loaded) into If(S == 1, decode, routed); a graph with
    no tokenskip op (a dense export) is returned unchanged. The graph's first input is input_ids
    [batch, seq]; its outputs' dims are the export's names (batch, seq, kept_{l}, integers)."""
    g = model.graph
    nodes, shared = _split_constants(g)
    topk = [n for n in nodes if n.domain == onnx_ops.DOMAIN and n.op_type == onnx_ops.TOPK_GATHER]
    if not topk:
        return model
    if any(_has_subgraph(n) for n in nodes):
        raise ValueError("add_decode_branch: the traced graph already holds subgraphs")
    outputs = list(g.output)
    producer = {o: n for n in nodes for o in n.output}
    topk_of_layer = {}  # l -> the TopKGather whose index output is index.{l}
    for o in outputs:
        if o.name.startswith("index."):
            topk_of_layer[o.name.split(".", 1)[1]] = producer[o.name]

    outer = _Outer(g.input[0].name)  # S, B, k per keep fraction: the shape tensors both branches read
    decode = _live(_decode_nodes(nodes, outer), [o.name for o in outputs])
    cond = [helper.make_node("Equal", [outer.dims["seq"], outer.const(1)], ["ts_s1/eq"]),
            helper.make_node("Squeeze", ["ts_s1/eq"], ["ts_s1/cond"])]  # 0-D bool (TensorRT's condition)
    # outputs with a kept_l dim: both branches reshape them to one outer shape tensor, so that
    # their shapes are provably equal (the op's k and the Slice's k are different expressions)
    targets, shapes = {}, set()
    for o in outputs:
        dims = [d.dim_param or int(d.dim_value) for d in o.type.tensor_type.shape.dim]
        if not any(isinstance(d, str) and d.startswith("kept_") for d in dims):
            continue
        parts = [outer.const(d) if isinstance(d, int) else
                 outer.keep(topk_of_layer[d.split("_", 1)[1]]) if d.startswith("kept_") else outer.dims[d]
                 for d in dims]
        name = "ts_s1/shape/" + "/".join(p.rsplit("/", 1)[-1] for p in parts)
        if name not in shapes:  # one per distinct shape (layers with one keep fraction share it)
            shapes.add(name)
            outer.nodes.append(helper.make_node("Concat", parts, [name], axis=0))
        targets[o.name] = name

    def branch(name: str, body: list[onnx.NodeProto], names: dict[str, str]) -> onnx.GraphProto:
        """body's nodes with the values in `names` renamed; outputs in graph order, the kept_l ones
        reshaped to the shared shape tensor."""
        out_nodes = [_renamed(n, names) for n in body]
        outs = []
        for o in outputs:
            inner = names.get(o.name, o.name)
            if o.name in targets:
                reshaped = f"{inner}/reshaped"
                out_nodes.append(helper.make_node("Reshape", [inner, targets[o.name]], [reshaped]))
                inner = reshaped
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(o)
            vi.name = inner
            outs.append(vi)
        return helper.make_graph(out_nodes, name, [], outs)

    out_names = {o.name for o in outputs}
    # decode: every value it defines gets the prefix (no value_info: at S = 1 the kept dims are 1)
    then_g = branch("decode", decode, {x: DECODE + x for n in decode for x in list(n.output) + [n.name] if x})
    # routed: the traced names, except its outputs (a subgraph may not shadow the If's outputs)
    else_g = branch("routed", nodes, {x: ROUTED + x for x in out_names})
    else_g.value_info.extend(vi for vi in g.value_info if vi.name not in out_names)
    branch_node = helper.make_node("If", ["ts_s1/cond"], [o.name for o in outputs], name="decode_or_routed",
                                   then_branch=then_g, else_branch=else_g)
    del g.node[:]
    g.node.extend([*shared, *outer.nodes, *cond, branch_node])
    del g.value_info[:]
    return model



def routed_only(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The graph without the decode branch: the outer shape nodes and the routed branch inlined,
    outputs under their own names (the format before the decode branch), in place; None if `model`
    has no decode branch. For TensorRT-RTX 1.7, whose Myelin compiler cannot compile plugin layers
    inside a conditional ("custom_layer ... wksp with TYPE unspecified"): the engine runs the
    routed path for every S, as it did before (docs/export.md, "Decode path")."""
    g = model.graph
    node = next((n for n in g.node if n.op_type == "If" and n.name == "decode_or_routed"), None)
    if node is None:
        return None
    routed = next(a.g for a in node.attribute if a.name == "else_branch")
    names = {o.name: outer for o, outer in zip(routed.output, node.output)}
    outer = [n for n in g.node if n is not node]
    inlined = [_renamed(n, names) for n in routed.node]
    nodes = _live(outer + inlined, [o.name for o in g.output])
    value_info = [v for v in routed.value_info if v.name not in names]
    del g.node[:]
    g.node.extend(nodes)
    g.value_info.extend(value_info)
    return model
