"""Causal query chunks for ONNX Runtime on the CPU, applied to the graph when a session loads.

An exported graph has no causal attention kernel: `attention.graph_attend` computes every block's
whole q x T rectangle of scores and masks the upper triangle with a bias. Split into n query
chunks, chunk [a, b) needs only the keys before past + b (5/8 of the square with 4 chunks): ONNX
Runtime CPU prefill was ~1.3x faster at 1k tokens and ~1.5x at 2k (docs/export.md, "Attention in
the graph"). Traced by torch.export (`tokenskip export --attention-chunks 4`), the chunks cost
minutes of symbolic shape reasoning and double TensorRT-RTX's build, so exports stay one rectangle
and this module rewrites the rectangle into chunks in the ONNX Runtime session's copy of the graph
(the file on disk, and the TensorRT engines built from it, are unchanged; seconds at load).

What is rewritten, per block (the node chain graph_attend traces):

    S5 = Reshape(MatMul(QG, KT))    QG [B,nkv,g*q,d], KT [B,nkv,d,T]  -> [B,nkv,g,q,T]
    P  = Softmax(Add(S5, BIAS))     BIAS [B,1,1,q,T]
    O  = Reshape(MatMul(Reshape(P), V), ...)   V [B,nkv,T,d]          -> [B,nh,q,d]

into, for each chunk c (a = q c / n, b = q (c + 1) / n, past = T - q):

    S5c = Reshape(MatMul(Reshape(Slice(QG5, a:b)), Slice(KT, :past + b)))
    Pc  = Softmax(Add(S5c, Slice(BIAS, a:b, :past + b)))
    Oc  = Reshape(MatMul(Reshape(Pc), Slice(V, :past + b)))   [B,nkv,g,b-a,d]
    O   = Reshape(Concat(O0..On-1 on the rows), ...)

It is exact only where a chunk's rows may not see keys after past + b: the keys are the query rows
themselves, ascending, after a past (graph_attend's `rows_are_keys`). That holds in every block of
a dense export and of a kv_policy=skip export (dense blocks and routed blocks alike); in a
kv_policy=dense routed block the kept rows attend to every token, so such exports are left as they
are (`eligible`). Only the prefill graph is rewritten (the If's else branch; decode, S = 1, needs
no chunks). Rows that no key may reach (padding) differ between the two forms, and run_block sets
their output to 0 after attention in both. Tested against the unchunked graph in ONNX Runtime
(tests/test_ort_chunks.py) and by `tokenskip validate` through the runtime.
"""

from __future__ import annotations

import itertools

DEFAULT_CHUNKS = 4


def eligible(meta: dict) -> bool:
    """Whether an export's attention may be chunked (see the module docstring): no routed block
    attends to other rows than its own (kv_policy=skip, or no routed block), and the export was
    not traced with chunks already."""
    routed = bool(meta.get("custom_ops", {}).get("ops"))
    return (not routed or meta.get("kv_policy") == "skip") and int(meta.get("attention_chunks", 1)) == 1


def _consumers(nodes) -> dict:
    out: dict = {}
    for n in nodes:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


def _match(softmax, producer: dict, consumers: dict):
    """The rectangle's chain around one Softmax, or None when this softmax is something else (e.g.
    a router's attention-score window)."""
    def only(name, op, index=0):
        cs = consumers.get(name, [])
        return cs[0] if len(cs) == 1 and cs[0].op_type == op and list(cs[0].input).index(name) == index else None

    add = producer.get(softmax.input[0])
    if add is None or add.op_type != "Add" or len(consumers.get(add.output[0], [])) != 1:
        return None
    s5, bias = (producer.get(x) for x in add.input)
    if s5 is None or s5.op_type != "Reshape":
        s5, bias = bias, s5
        scores_first = False
    else:
        scores_first = True
    if s5 is None or s5.op_type != "Reshape" or len(consumers.get(s5.output[0], [])) != 1:
        return None
    mm1 = producer.get(s5.input[0])
    if mm1 is None or mm1.op_type != "MatMul" or len(consumers.get(mm1.output[0], [])) != 1:
        return None
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    r4 = only(softmax.output[0], "Reshape")
    mm2 = r4 and only(r4.output[0], "MatMul", 0)
    out = mm2 and only(mm2.output[0], "Reshape")
    if axis != -1 or out is None:
        return None
    return {"qg": mm1.input[0], "kt": mm1.input[1], "bias": add.input[1 if scores_first else 0], "v": mm2.input[1],
            "out": out, "remove": [s5, mm1, add, softmax, r4, mm2]}


def _chunk_nodes(m: dict, tag: str, chunks: int, groups: int, head_dim: int):
    """The nodes computing the chunked attention of one matched chain; their last output is O5
    [B,nkv,g,q,d] (what the chain's final Reshape reads instead)."""
    from onnx import TensorProto, helper

    nodes = []

    def const(name: str, values: list[int]) -> str:
        full = f"{tag}.{name}"  # no "/": ORT names fused kernels "<node>/<fusion>/" (ort_cost splits on it)
        nodes.append(helper.make_node("Constant", [], [full], name=full,
                                      value=helper.make_tensor(full, TensorProto.INT64, [len(values)], values)))
        return full

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        full = f"{tag}.{name}"  # no "/": ORT names fused kernels "<node>/<fusion>/" (ort_cost splits on it)
        nodes.append(helper.make_node(op, inputs, [full], name=full, **attrs))
        return full

    shape = node("Shape", [m["bias"]], "bias_shape")  # [B,1,1,q,T]
    q = node("Slice", [shape, const("i3", [3]), const("i4", [4])], "q")  # [1]
    t = node("Slice", [shape, const("i4b", [4]), const("i5", [5])], "t")  # [1]
    past = node("Sub", [t, q], "past")
    n, g, d = const("n", [chunks]), const("g", [groups]), const("d", [head_dim])
    # explicit dims and allowzero=1 throughout: a chunk may have 0 rows (q < chunks), which a
    # Reshape's default would read as "copy this dim from the input"
    bn = node("Slice", [node("Shape", [m["qg"]], "qg_shape"), const("i0", [0]), const("i2", [2])], "bn")  # [B,nkv]
    q5 = node("Reshape", [m["qg"], node("Concat", [bn, g, q, d], "q5_shape", axis=0)], "q5", allowzero=1)
    axis2, axis3, axis34 = const("axis2", [2]), const("axis3", [3]), const("axis34", [3, 4])
    start0 = const("start0", [0])
    outs = []
    bounds = [node("Div", [node("Mul", [q, const(f"c{c}", [c])], f"qc{c}"), n], f"bound{c}") for c in range(chunks)]
    bounds.append(q)
    for c, (a, b) in enumerate(itertools.pairwise(bounds)):
        rows = node("Sub", [b, a], f"rows{c}")  # [1] this chunk's query rows
        grows = node("Mul", [rows, g], f"grows{c}")
        last = c == chunks - 1  # the last chunk reads every key: no slice (ends = T)
        end = t if last else node("Add", [past, b], f"end{c}")  # [1] keys before past + b
        qc = node("Slice", [q5, a, b, axis3], f"q{c}")  # [B,nkv,g,rows,d]
        qc4 = node("Reshape", [qc, node("Concat", [bn, grows, d], f"q{c}_shape", axis=0)], f"q{c}_4", allowzero=1)
        kt = m["kt"] if last else node("Slice", [m["kt"], start0, end, axis3], f"kt{c}")  # [B,nkv,d,end]
        v = m["v"] if last else node("Slice", [m["v"], start0, end, axis2], f"v{c}")  # [B,nkv,end,d]
        bias = node("Slice", [m["bias"], node("Concat", [a, start0], f"bias{c}_starts", axis=0),
                              node("Concat", [b, end], f"bias{c}_ends", axis=0), axis34], f"bias{c}")
        s = node("MatMul", [qc4, kt], f"scores{c}")  # [B,nkv,g*rows,end]
        s5 = node("Reshape", [s, node("Concat", [bn, g, rows, end], f"s{c}_shape", axis=0)], f"s{c}_5", allowzero=1)
        p = node("Softmax", [node("Add", [s5, bias], f"biased{c}")], f"p{c}", axis=-1)
        p4 = node("Reshape", [p, node("Concat", [bn, grows, end], f"p{c}_shape", axis=0)], f"p{c}_4", allowzero=1)
        o = node("MatMul", [p4, v], f"o{c}")  # [B,nkv,g*rows,d]
        outs.append(node("Reshape", [o, node("Concat", [bn, g, rows, d], f"o{c}_shape", axis=0)], f"o{c}_5",
                         allowzero=1))
    node("Concat", outs, "o5", axis=3)  # [B,nkv,g,q,d]
    return nodes


def chunk_attention(model, chunks: int, groups: int, head_dim: int) -> int:
    """Rewrite every attention rectangle of `model`'s prefill graph (a ModelProto loaded without
    its weights; in place) into `chunks` causal query chunks. groups: query heads per KV head;
    head_dim: d. Returns the number of rectangles rewritten (0 when chunks < 2)."""
    from tokenskip.export.decode_branch import live_nodes, prefill_graph

    if chunks < 2:
        return 0
    graph = prefill_graph(model)
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers = _consumers(nodes)
    matches = [m for m in (_match(n, producer, consumers) for n in nodes if n.op_type == "Softmax") if m]
    if not matches:
        return 0
    removed = {id(n) for m in matches for n in m["remove"]}
    at = {id(m["remove"][-1]): (k, m) for k, m in enumerate(matches)}  # insert where the chain's last MatMul was
    rebuilt = []
    for n in nodes:
        if id(n) in at:
            k, m = at[id(n)]
            tag = f"ts_chunks.{k}"
            new = _chunk_nodes(m, tag, chunks, groups, head_dim)
            rebuilt += new
            m["out"].input[0] = new[-1].output[0]
        if id(n) not in removed:
            rebuilt.append(n)
    live = live_nodes(rebuilt, [o.name for o in graph.output])  # the rectangles' shape nodes go
    del graph.node[:]
    graph.node.extend(live)
    return len(matches)


def chunk_export_graph(model, meta: dict, chunks: int) -> int:
    """chunk_attention on an export's graph (`meta`: its export.json) where `eligible` allows it,
    with the head layout from the sidecar; the number of rectangles rewritten (0: none)."""
    cfg = meta.get("config", {})
    if not eligible(meta) or "num_attention_heads" not in cfg:
        return 0
    return chunk_attention(model, chunks, groups=cfg["num_attention_heads"] // cfg["num_key_value_heads"],
                           head_dim=cfg["head_dim"])
