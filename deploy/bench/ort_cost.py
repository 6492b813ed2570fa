"""What routing costs inside ONNX Runtime (issue 20, "the router and its inputs cost <= 3% of dense
prefill at S = 1024 in ONNX Runtime").

`tokenskip bench`'s overhead figure (latency.router_overhead) instruments the PyTorch calls. This
module measures the exported graph itself: ORT's profiler (SessionOptions.enable_profiling) times
every kernel of a routed prefill, and each kernel is attributed to one of these classes:

- router: the router and its inputs: the scoring (MLP, features, rank sort, select's pooled
  log-attention, recency terms), the attention-score window of the blocks that fill the table
  (window query gather, QK^T, softmax, head reduction) and the table's updates across blocks.
- gather / scatter: the bodies of the tokenskip::TopKGather and tokenskip::ScatterTokens nodes
  (the skipping mechanism itself: top-k selection + row gather, residual scatter).
- index: other kernels that read a TopKGather's kept-index output directly (the routed block's
  per-token gathers of positions, mask and RoPE tables): skipping bookkeeping, not routing.
- model: everything else (the LLM's own computation on the kept tokens).

Attribution rule (structural; the exported node names carry no module scope: the exporter clears
the per-node metadata and names nodes after their aten op, `node_linear_18`): a node is *router*
when every use of every one of its outputs is either the `scores` or `valid` input of a
TopKGather or an input of another router node (and none is a graph output). It is computed over
each graph holding TopKGather nodes (the routed branch of the `If(S == 1, decode, routed)` graph)
in reverse topological order, so it is the largest set of nodes that exist only to decide which
tokens are kept: if the router were removed (scores given for free), exactly these nodes would
disappear. Values the model also needs (the block's q and k, which the window reuses; the
attention mask) are not router cost, since the dense model computes them anyway.

The rule is applied to a copy of the graph whose node names carry the class as a prefix
(`tokenskip.router/`, `tokenskip.index/`, and names given to the function bodies:
`tokenskip.gather/`, `tokenskip.scatter/`), loaded from memory with the weights read from the
export folder (nothing copied, the export untouched). ORT keeps
the original name inside the names of inlined and fused nodes, so a profiled kernel is classified
by the tag its name contains; kernels whose name ORT made up (no known name inside) are counted
apart (`unattributed_ms`) so a lost attribution shows.

Prefill latency (unprofiled sessions, the runtime's session options) is timed with the routed and
the dense sessions alternating; the fractions divide the profiled class times (median over runs)
by the dense prefill median. Profiling adds a small fixed cost to every kernel (smollm2-135m,
S = 1024: profiled kernels sum 1-3.5% above the unprofiled routed prefill, `profiled_kernels_ms` vs
`routed_ms`), which weighs most on classes of many small kernels, the router's above all: its
figure is an upper bound.

    python -m tokenskip.deploy.bench.ort_cost --export out/export --dense out/export-dense --seq 1024 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from tokenskip.errors import UserError

from ..runtime import ort_chunks
from ..runtime.ort_backend import attention_chunks, ort_session

ROUTER, GATHER, SCATTER, INDEX, MODEL = "router", "gather", "scatter", "index", "model"
TAGS = {ROUTER: "tokenskip.router/", GATHER: "tokenskip.gather/", SCATTER: "tokenskip.scatter/",
        INDEX: "tokenskip.index/"}
_CONTROL_FLOW = {"If", "Loop", "Scan"}  # their kernel time is the sum of their subgraphs' kernels
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


# ------------------------------------------------------------------------------------ attribution
def _subgraphs(node):
    from onnx import AttributeProto

    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def _outer_refs(node) -> set[str]:
    """Every value name read inside the node's subgraphs (outer-scope reads included)."""
    refs: set[str] = set()
    for g in _subgraphs(node):
        for n in g.node:
            refs.update(x for x in n.input if x)
            refs |= _outer_refs(n)
    return refs


def _is_op(node, op: str) -> bool:
    from tokenskip.export import onnx_ops

    return node.domain == onnx_ops.DOMAIN and node.op_type == op


def routing_nodes(graph) -> set[int]:
    """Indices of the router nodes of one graph (the module docstring's rule): every use of every
    output is a TopKGather's `scores`/`valid` input (slots 1, 2) or another router node, none is a
    graph output, and at least one use exists. One reverse pass over the (topologically ordered)
    nodes: a node's consumers are decided before it."""
    from tokenskip.export import onnx_ops

    uses: dict[str, list[tuple[int, int]]] = defaultdict(list)  # value -> (consumer node, input slot)
    for i, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if name:
                uses[name].append((i, slot))
        for name in _outer_refs(node):
            uses[name].append((i, -1))  # read by a subgraph: never a routing sink
    outputs = {o.name for o in graph.output}
    router: set[int] = set()
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if node.domain == onnx_ops.DOMAIN:
            continue
        used, only_routing = False, True
        for out in filter(None, node.output):
            if out in outputs:
                only_routing = False
                break
            for j, slot in uses.get(out, ()):
                used = True
                if j in router or (_is_op(graph.node[j], onnx_ops.TOPK_GATHER) and slot in (1, 2)):
                    continue
                only_routing = False
                break
            if not only_routing:
                break
        if used and only_routing:
            router.add(i)
    return router


def index_nodes(graph, router: set[int]) -> set[int]:
    """Non-router, non-custom nodes that read a TopKGather's index output (output 1) directly."""
    from tokenskip.export import onnx_ops

    index_values = {n.output[1] for n in graph.node if _is_op(n, onnx_ops.TOPK_GATHER) and len(n.output) > 1}
    return {i for i, n in enumerate(graph.node)
            if i not in router and n.domain != onnx_ops.DOMAIN and index_values.intersection(n.input)}


def _graphs(graph):
    yield graph
    for node in graph.node:
        for g in _subgraphs(node):
            yield from _graphs(g)


def tag_model(model) -> dict:
    """Rename nodes in place with their class prefix (TAGS) and name the custom ops' function-body
    nodes; returns node counts per class and the set of original node names (to spot kernels whose
    name ORT made up). Raises UserError when the model has no TopKGather (a dense export)."""
    from tokenskip.export import onnx_ops

    counts = defaultdict(int)
    known: set[str] = set()
    for graph in _graphs(model.graph):
        for n in graph.node:
            known.add(n.name)
        if not any(_is_op(n, onnx_ops.TOPK_GATHER) for n in graph.node):
            continue
        router = routing_nodes(graph)
        index = index_nodes(graph, router)
        for i, node in enumerate(graph.node):
            if i in router:
                node.name, kind = TAGS[ROUTER] + node.name, ROUTER
            elif i in index:
                node.name, kind = TAGS[INDEX] + node.name, INDEX
            elif _is_op(node, onnx_ops.TOPK_GATHER):
                kind = GATHER
            elif _is_op(node, onnx_ops.SCATTER_TOKENS):
                kind = SCATTER
            else:
                continue
            counts[kind] += 1
    if not counts[GATHER]:
        raise UserError("the export has no tokenskip::TopKGather node (a dense export?): "
                        "give a routed export (`tokenskip export --routers DIR`)")
    for fn in model.functions:  # ORT inlines them as `_inlfunc_<op>_<body node name>`
        kind = {onnx_ops.TOPK_GATHER: GATHER, onnx_ops.SCATTER_TOKENS: SCATTER}.get(fn.name)
        if fn.domain == onnx_ops.DOMAIN and kind:
            for j, node in enumerate(fn.node):
                node.name = f"{TAGS[kind]}{fn.name}/{node.op_type}_{j}"
    return {"nodes": dict(counts), "known": known}


def tagged_model(export_dir: Path, graph_entry: dict, meta: dict | None = None) -> tuple[bytes, dict]:
    """The export's model.onnx with tagged node names (tag_model), serialized without its weights:
    the session reads them from the export folder (ORT refuses external data outside the model's
    folder, symlinks included, so the tagged graph is loaded from memory instead). With the
    sidecar (`meta`), prefill attention is chunked first, as the runtime's CPU session does
    (ort_backend.ort_session), so the profile is of the graph the runtime runs."""
    import onnx

    model = onnx.load(str(export_dir / graph_entry["file"]), load_external_data=False)
    chunks = attention_chunks("cpu") if meta is not None else 1
    chunked = ort_chunks.chunk_export_graph(model, meta, chunks) if chunks > 1 else 0
    info = tag_model(model)
    info["attention_chunks"] = chunks if chunked else 1
    return model.SerializeToString(), info


def classify(name: str, known: set[str]) -> str:
    for kind, tag in TAGS.items():
        if tag in name:
            return kind
    if name in known or any(part in known for part in re.split(r"/", name) if part):
        return MODEL
    return "unattributed"


# ------------------------------------------------------------------------------------------ runs
def _session(model: Path | bytes, threads: int | None, profile_prefix: str | None = None,
             weights_dir: Path | None = None):
    """The runtime's session options (deploy/runtime/ort_backend.ort_session), CPU, optionally
    profiled; `model` is a file, or serialized bytes whose external weights are in `weights_dir`."""
    from ..runtime.ort_backend import import_ort, session_options

    ort = import_ort()
    opts = session_options(threads)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if weights_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    what = model if isinstance(model, Path) else weights_dir
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load {what} in ONNX Runtime: {first}") from None


def prefill_feeds(session, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Random prompt ids, full mask, positions 0..S-1 and an empty past (length 0) for every layer."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(bool)": np.bool_}.get(inp.type)
        if dtype is None:
            raise UserError(f"input {inp.name}: unsupported type {inp.type} (bfloat16 exports: profile the fp32 one)")
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, seq), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        else:  # past.{l}.{key,value,pos,valid}: [T, B, ...] with T = 0
            shape = [0, batch] + [d if isinstance(d, int) else batch for d in inp.shape[2:]]
            feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


def _node_events(profile: Path) -> list[tuple[float, list[dict]]]:
    """(run ms, kernel events) of every Run in the profile (its `model_run` session events)."""
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    grouped: list[list[dict]] = [[] for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        for k, (a, b) in enumerate(runs):
            if a <= e["ts"] <= b:
                grouped[k].append(e)
                break
    return [((b - a) / 1e3, g) for (a, b), g in zip(runs, grouped) if g]


def _class_times(events: list[dict], known: set[str]) -> dict[str, float]:
    """Kernel milliseconds per class in one run (control-flow nodes' own events left out)."""
    ms: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("args", {}).get("op_name") in _CONTROL_FLOW:
            continue
        ms[classify(e["name"][: -len("_kernel_time")], known)] += e["dur"] / 1e3
    return ms


def profile_prefill(model: bytes, weights_dir: Path, known: set[str], feeds_for, repeats: int, warmup: int,
                    threads: int | None, workdir: Path) -> dict:
    """Median kernel ms per class over `repeats` profiled prefills (after `warmup` untimed ones)."""
    sess = _session(model, threads, str(workdir / "ort-profile"), weights_dir)
    feeds = feeds_for(sess)
    for _ in range(warmup + repeats):
        sess.run(None, feeds)
    profile = Path(sess.end_profiling())
    runs = _node_events(profile)[warmup:]
    profile.unlink(missing_ok=True)
    if not runs:
        raise UserError("ONNX Runtime's profile holds no model_run events (onnxruntime too old?)")
    per_run = [_class_times(events, known) for _, events in runs]
    kinds = [ROUTER, GATHER, SCATTER, INDEX, MODEL, "unattributed"]
    med = {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in kinds}
    med["kernels"] = statistics.median(sum(r.values()) for r in per_run)
    return {"ms": med, "runs": len(per_run), "kernels_per_run": len(runs[0][1]),
            "run_ms": statistics.median(ms for ms, _ in runs)}


def _wall(sessions: dict, feeds: dict, repeats: int, warmup: int) -> dict[str, float]:
    from tokenskip.timing import alternate

    times = alternate({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}, repeats, warmup)
    return {k: 1e3 * times.median(k) for k in sessions}


def ort_routing_cost(export_dir, dense_dir=None, seq: int = 1024, batch: int = 1, repeats: int = 5,
                     warmup: int = 1, threads: int | None = None, seed: int = 0) -> dict:
    """Routing cost of a routed export's prefill in ONNX Runtime (CPU), per the module docstring.

    Returns ms per class (router = router + its inputs; gather, scatter = the custom ops' bodies;
    index = other kept-index gathers), the routed prefill (unprofiled median and profiled run), the
    dense prefill when `dense_dir` is given, and the fractions of the dense prefill (else of the
    routed one)."""
    from tokenskip.export.sidecar import read_export

    if seq < 2 or batch < 1 or repeats < 1 or warmup < 0:
        raise UserError("--seq must be >= 2, --batch and --repeats >= 1, --warmup >= 0")
    export_dir = Path(export_dir)
    meta = read_export(export_dir, "--export")
    entry = meta["graphs"]["model"]
    vocab = int(meta["config"]["vocab_size"])
    dense_meta = read_export(dense_dir, "--dense") if dense_dir is not None else None
    if dense_meta is not None and dense_meta.get("custom_ops", {}).get("ops"):
        raise UserError(f"--dense {dense_dir}: a routed export (router {dense_meta.get('router')!r}): "
                        "give a `tokenskip export --router dense` folder")
    with tempfile.TemporaryDirectory(prefix="tokenskip-ort-cost-") as tmp:
        tmp = Path(tmp)
        tagged, info = tagged_model(export_dir, entry, meta)
        prof = profile_prefill(tagged, export_dir, info["known"], lambda s: prefill_feeds(s, batch, seq, vocab, seed),
                               repeats, warmup, threads, tmp)
    sessions = {"routed": ort_session(export_dir / entry["file"], "cpu", threads, meta=meta)}
    if dense_meta is not None:  # the runtime's sessions: chunked prefill attention where it applies
        sessions["dense"] = ort_session(Path(dense_dir) / dense_meta["graphs"]["model"]["file"], "cpu", threads,
                                        meta=dense_meta)
    feeds = {k: prefill_feeds(s, batch, seq, vocab, seed) for k, s in sessions.items()}
    wall = _wall(sessions, feeds, repeats, warmup)
    ms = prof["ms"]
    base_name = "dense" if "dense" in wall else "routed"
    base = wall[base_name]
    out = {
        "export": str(export_dir), "dense_export": str(dense_dir) if dense_dir is not None else None,
        "router": meta.get("router"), "model": meta.get("model"), "dtype": meta.get("dtype"),
        "seq": seq, "batch": batch, "repeats": repeats, "warmup": warmup, "threads": threads,
        "attention_chunks": info["attention_chunks"],
        "onnxruntime": _ort_version(), "cpus": os.cpu_count(),
        "nodes": info["nodes"], "kernels_per_run": prof["kernels_per_run"],
        "router_ms": ms[ROUTER], "gather_ms": ms[GATHER], "scatter_ms": ms[SCATTER],
        "gather_scatter_ms": ms[GATHER] + ms[SCATTER], "index_ms": ms[INDEX], "model_ms": ms[MODEL],
        "unattributed_ms": ms["unattributed"], "profiled_kernels_ms": ms["kernels"],
        "profiled_run_ms": prof["run_ms"],
        "routed_ms": wall["routed"], "dense_ms": wall.get("dense"),
        "fraction_of": base_name,
        "router_fraction": ms[ROUTER] / base,
        "gather_scatter_fraction": (ms[GATHER] + ms[SCATTER]) / base,
        "index_fraction": ms[INDEX] / base,
        "router_share_of_routed_kernels": ms[ROUTER] / ms["kernels"] if ms["kernels"] else float("nan"),
        "speedup": wall["dense"] / wall["routed"] if "dense" in wall else None,
    }
    return out


def _ort_version() -> str:
    from ..runtime.ort_backend import import_ort

    return import_ort().__version__


def format_summary(r: dict) -> str:
    of = r["fraction_of"]
    lines = [f"{r['model']} {r['router']} router, S={r['seq']} B={r['batch']}, ORT {r['onnxruntime']} CPU "
             f"({r['repeats']} runs, medians)",
             f"  router + inputs   {r['router_ms']:8.2f} ms  {100 * r['router_fraction']:5.2f}% of {of} prefill",
             f"  gather + scatter  {r['gather_scatter_ms']:8.2f} ms  {100 * r['gather_scatter_fraction']:5.2f}% "
             f"(gather {r['gather_ms']:.2f}, scatter {r['scatter_ms']:.2f})",
             f"  index gathers     {r['index_ms']:8.2f} ms  {100 * r['index_fraction']:5.2f}%",
             f"  routed prefill    {r['routed_ms']:8.2f} ms (profiled kernels {r['profiled_kernels_ms']:.2f} ms, "
             f"profiled run {r['profiled_run_ms']:.2f} ms, unattributed {r['unattributed_ms']:.2f} ms)"]
    if r["dense_ms"] is not None:
        lines.append(f"  dense prefill     {r['dense_ms']:8.2f} ms  speed-up {r['speedup']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenskip.deploy.bench.ort_cost",
                                description="Router + input cost of a routed export's prefill in ONNX Runtime "
                                            "(profiled, attributed per node; see the module docstring).")
    p.add_argument("--export", required=True, help="routed export folder (tokenskip export)")
    p.add_argument("--dense", help="dense export folder: the denominator (else the routed prefill)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    try:
        r = ort_routing_cost(a.export, a.dense, a.seq, a.batch, a.repeats, a.warmup, a.threads)
    except UserError as exc:
        print(f"Error: {exc.format_message()}", file=sys.stderr)
        return 1
    text = json.dumps(r, indent=2, sort_keys=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text if a.json else format_summary(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
