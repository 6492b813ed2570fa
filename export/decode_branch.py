"""Decode at dense cost: the one graph becomes `If(S == 1, decode, routed)`, weights stored once.

At S = 1 every routed block keeps its one token (k = S = 1), so the router, its features, the
attention-score window and the two custom ops compute nothing that changes the result; yet in one
traced graph they all run at every decode step (ONNX Runtime CPU, smollm2-135m: routed decode cost
~12% more than dense). A copy of the routed graph with the ops replaced by their S = 1 values still
ran the routed block's per-token gathers (positions, mask, RoPE tables) and scatter (~23% more
kernels than dense, 1.09x dense per token at 128 tokens of context). So the decode branch is the
**dense trace of the same model** (`RoutedModel` with its router off: every block runs every token,
exactly what a routed block does with k = S = 1), and this post-pass, on the graph protos loaded
without their weights, rewrites

    graph(inputs) -> outputs
into
    cond = (Shape(input_ids)[1] == 1)                       # 0-D bool
    outputs = If(cond, then_branch=decode, else_branch=routed)

- `routed` (else) is the traced graph as it was, node for node (prefill, chunked prefill).
- `decode` (then) is the dense trace's graph, its values renamed under `decode/`, plus
  `index.{l} = zeros [B, 1]` (the one kept position) for the routed layers' index outputs.

Both branches read the weights as outer-scope initializers: the two traces name parameters by their
module paths, so the decode trace's initializers are the routed graph's (checked; its weights file
is never kept), and its initializer-only nodes that the routed graph also computes (e.g. the tied
lm_head's Transpose, which ONNX Runtime folds into a new tensor per graph holding the node: 113 MB
on smollm2-135m) are shared by structure. The graph's inputs and outputs are unchanged.
TensorRT-RTX 1.7 cannot compile plugin layers inside a conditional, so engine builds parse
`routed_only(model)` (docs/export.md, "Decode path").

Dense exports get the same If (`always=True`, as the exporter calls it): their decode trace attends to the cache without
joining the new row to it (tokenskip.attention.graph_attend_past: no copy of the cache per block
and step) and their prefill trace may run attention in causal query chunks (graph_attend), so dense
and routed prefill and decode run the same attention code (docs/export.md, "Attention in the graph").
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from . import onnx_ops

DECODE = "decode/"  # prefix of every value the decode branch defines
ROUTED = "routed/"  # prefix of the routed branch's outputs (outer-scope names may not be shadowed)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)


def _is_custom(node: onnx.NodeProto) -> bool:
    return node.domain == onnx_ops.DOMAIN


def live_nodes(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in their original (topological) order (values read from an
    enclosing graph have no producer here and end the walk)."""
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


def _signature(node: onnx.NodeProto, names: dict[str, str]) -> tuple:
    """What a node computes, independent of its own names: op, inputs (after renaming), attributes."""
    return (node.domain, node.op_type, tuple(names.get(x, x) for x in node.input),
            tuple(a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name)))


def _digest(t: onnx.TensorProto, base_dir: str | None) -> bytes:
    """A hash of a tensor's bytes, reading external data from base_dir."""
    import hashlib

    from onnx import external_data_helper, numpy_helper

    if t.data_location == TensorProto.EXTERNAL:
        if base_dir is None:
            raise ValueError("add_decode_branch: external weights to compare and no base_dir")
        t2 = onnx.TensorProto()
        t2.CopyFrom(t)
        external_data_helper.load_external_data_for_tensor(t2, base_dir)
        t2.data_location = TensorProto.DEFAULT
        del t2.external_data[:]
        t = t2
    return hashlib.sha256(numpy_helper.to_array(t).tobytes()).digest()


def _merge_decode_constants(routed: onnx.GraphProto, shared: list[onnx.NodeProto], decode: onnx.GraphProto,
                            d_shared: list[onnx.NodeProto], base_dir: str | None) -> tuple[dict, list, list]:
    """Map the decode trace's initializers and initializer-only nodes onto the routed graph's:
    (names: decode value -> outer name, new outer initializers, new outer nodes). Tensors match by
    shape, dtype and bytes, not by name: constant folding makes new ones (a projection's transposed
    weight) whose generated names (val_N) mean different things in the two traces. An external
    decode tensor with no match is an error: its file is not kept, and a second copy of a weight is
    what this design avoids; a small inline one is kept under the decode prefix."""
    names, inits, nodes = {}, [], []
    key = lambda t: (tuple(t.dims), t.data_type)  # noqa: E731
    wanted = {key(t) for t in decode.initializer}
    by_bytes = {}  # the routed graph's tensors of a wanted shape, by content
    for t in routed.initializer:
        if key(t) in wanted:
            by_bytes.setdefault((*key(t), _digest(t, base_dir)), t.name)
    for t in decode.initializer:
        same = by_bytes.get((*key(t), _digest(t, base_dir)))
        if same is not None:
            names[t.name] = same
            continue
        if t.data_location == TensorProto.EXTERNAL:
            raise ValueError(f"add_decode_branch: the decode trace's tensor {t.name} {list(t.dims)} "
                             "matches no tensor of the routed graph")
        new = onnx.TensorProto()
        new.CopyFrom(t)
        new.name = names[t.name] = DECODE + t.name
        inits.append(new)
    computed = {_signature(n, {}): list(n.output) for n in shared}
    for n in d_shared:
        same = computed.get(_signature(n, names))
        if same is not None and len(same) == len(n.output):
            names.update(zip(n.output, same))
        else:
            names.update({x: DECODE + x for x in n.output if x})
            nodes.append(_renamed(n, {**names, n.name: DECODE + n.name} if n.name else names))
    return names, inits, nodes


def add_decode_branch(model: onnx.ModelProto, decode: onnx.ModelProto, base_dir: str | None = None,
                      always: bool = False) -> onnx.ModelProto:
    """Rewrite `model` (the routed trace, in place, weights not loaded) into If(S == 1, decode,
    routed), `decode` being the dense trace of the same model (same inputs, the same outputs less
    index.*); base_dir: the folder of both traces' external data (to match folded tensors by
    bytes). A graph with no tokenskip op (a dense export) is returned unchanged, unless `always`
    (what the exporter asks): its prefill trace (attention.graph_attend, maybe in causal chunks)
    and its decode trace (attention.graph_attend_past: the cache is not copied) differ too."""
    g, d = model.graph, decode.graph
    nodes, shared = _split_constants(g)
    if not always and not any(_is_custom(n) for n in nodes):
        return model
    if any(_has_subgraph(n) for n in nodes + list(d.node)):
        raise ValueError("add_decode_branch: a traced graph already holds subgraphs")
    if [i.name for i in d.input] != [i.name for i in g.input]:
        raise ValueError("add_decode_branch: the decode trace's inputs differ from the routed graph's")
    if any(_is_custom(n) for n in d.node):
        raise ValueError("add_decode_branch: the decode trace holds a tokenskip op (export it with the router off)")
    outputs = list(g.output)
    d_outputs = {o.name for o in d.output}
    missing = [o.name for o in outputs if o.name not in d_outputs and not o.name.startswith("index.")]
    if missing:
        raise ValueError(f"add_decode_branch: the decode trace has no output {missing[0]}")

    d_rest, d_shared = _split_constants(d)
    names, inits, outer = _merge_decode_constants(g, shared, d, d_shared, base_dir)
    ids = g.input[0].name  # input_ids [B,S]
    outer += [helper.make_node("Shape", [ids], ["ts_s1/batch"], start=0, end=1),  # [1]
              helper.make_node("Shape", [ids], ["ts_s1/seq"], start=1, end=2),  # [1]
              helper.make_node("Constant", [], ["ts_s1/one"], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
              helper.make_node("Concat", ["ts_s1/batch", "ts_s1/one"], ["ts_s1/b1"], axis=0),  # [B,1]
              helper.make_node("Equal", ["ts_s1/seq", "ts_s1/one"], ["ts_s1/eq"]),
              helper.make_node("Squeeze", ["ts_s1/eq"], ["ts_s1/cond"])]  # 0-D bool (the If's condition)

    # decode: every value the dense trace defines gets the prefix; the routed layers' index = [0]
    inner = dict(names)
    for n in d_rest:
        inner.update({x: DECODE + x for x in n.output if x})
        if n.name:
            inner[n.name] = DECODE + n.name
    body = [_renamed(n, inner) for n in d_rest]
    produced = {x for n in body for x in n.output}
    then_outs, used = [], set()
    for o in outputs:
        if o.name.startswith("index."):
            name = DECODE + o.name
            body.append(helper.make_node("ConstantOfShape", ["ts_s1/b1"], [name], name=name,
                                         value=helper.make_tensor("zero", TensorProto.INT64, [1], [0])))
        else:
            name = inner.get(o.name, o.name)
            if name not in produced or name in used:  # a branch output must be its own value
                alias = f"{DECODE}{o.name}/out"
                body.append(helper.make_node("Identity", [name], [alias], name=alias))
                name = alias
        used.add(name)
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(o)
        vi.name = name
        if not o.name.startswith("index."):  # at S = 1 the kept dims are 1: say nothing about them
            vi.type.tensor_type.ClearField("shape")
        then_outs.append(vi)
    then_g = helper.make_graph(body, "decode", [], then_outs)

    # routed: the traced names, except its outputs (a subgraph may not shadow the If's outputs)
    renamed = {o.name: ROUTED + o.name for o in outputs}
    else_outs = []
    for o in outputs:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(o)
        vi.name = renamed[o.name]
        else_outs.append(vi)
    else_g = helper.make_graph([_renamed(n, renamed) for n in nodes], "routed", [], else_outs)
    else_g.value_info.extend(vi for vi in g.value_info if vi.name not in renamed)

    branch = helper.make_node("If", ["ts_s1/cond"], [o.name for o in outputs], name="decode_or_routed",
                              then_branch=then_g, else_branch=else_g)
    del g.node[:]
    g.node.extend([*shared, *outer, branch])
    g.initializer.extend(inits)
    del g.value_info[:]
    return model


def _decode_if(g: onnx.GraphProto) -> onnx.NodeProto | None:
    return next((n for n in g.node if n.op_type == "If" and n.name == "decode_or_routed"), None)


def prefill_graph(model: onnx.ModelProto) -> onnx.GraphProto:
    """The graph a call with S > 1 runs, to edit in place: the If's routed (else) branch, or the
    model's graph when it has no decode branch."""
    node = _decode_if(model.graph)
    return model.graph if node is None else next(a.g for a in node.attribute if a.name == "else_branch")


def routed_only(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The graph without the decode branch: the outer shape nodes and the routed branch inlined,
    outputs under their own names (the format before the decode branch), in place; None if `model`
    has no decode branch. For TensorRT-RTX 1.7, whose Myelin compiler cannot compile plugin layers
    inside a conditional ("custom_layer ... wksp with TYPE unspecified"): the engine runs the
    routed path for every S, as it did before (docs/export.md, "Decode path")."""
    g = model.graph
    node = _decode_if(g)
    if node is None:
        return None
    routed = prefill_graph(model)
    names = {o.name: outer for o, outer in zip(routed.output, node.output)}
    outer = [n for n in g.node if n is not node]
    inlined = [_renamed(n, names) for n in routed.node]
    nodes = live_nodes(outer + inlined, [o.name for o in g.output])
    value_info = [v for v in routed.value_info if v.name not in names]
    used = {x for n in nodes for x in n.input}
    inits = [t for t in g.initializer if t.name in used or not t.name.startswith(DECODE)]
    del g.node[:]
    g.node.extend(nodes)
    g.value_info.extend(value_info)
    del g.initializer[:]
    g.initializer.extend(inits)
    return model
