"""Decode at dense cost (tokenskip.export.decode_branch): the one graph is If(S == 1, decode, routed).

On a tiny random Llama, for the static and a learned router (random weights) and both kv_policy
values: ONNX Runtime outputs of the exported graph equal the routed path alone (the graph before
this change, `routed_only`) bit for bit in prefill and a chunked call and to 1e-5 in decode (the
dense trace: same math, other op order), and PyTorch (StepGraph / RoutedModel.decode_step) to
1e-4, at batch 1 and 2; the decode branch holds no custom op, no TopK, no gather of the routed
block, no router weight and no score-window softmax; the weights are stored once (outer scope).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from tokenskip.config import RoutingConfig, build_routed, save_routing  # noqa: E402
from tokenskip.deploy.runtime.validate import empty_past  # noqa: E402
from tokenskip.export import decode_branch  # noqa: E402
from tokenskip.export.wrappers import CACHE_FIELDS, StepGraph, to_seq_major  # noqa: E402
from tokenskip.routed import default_positions  # noqa: E402

from conftest import export_tiny, random_learned_router  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULE = (0.0, 0.4, 0.3, 0.0)
CASES = [("static", "skip"), ("static", "dense"), ("learned", "skip"), ("learned", "dense")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{r}-{k}" for r, k in CASES])
def exported(request, tiny_llama, tmp_path_factory):
    """(routed, folder, routed-only session, decode-branch session) for one router and kv_policy."""
    router_name, kv = request.param
    model, path = tiny_llama
    cfg = RoutingConfig(model=str(path), num_layers=4, router=router_name, schedule=list(SCHEDULE),
                        kv_policy=kv, model_type="llama", hidden_size=64, score_window=8)
    router = random_learned_router() if router_name == "learned" else None
    routers_dir = tmp_path_factory.mktemp("routers")
    save_routing(routers_dir, cfg, router)
    routed, cfg = build_routed(model, routers_dir=routers_dir)
    out = tmp_path_factory.mktemp("export") / "exp"
    side = export_tiny(model, str(path), routed, cfg, out, max_seq_len=256)
    assert side["timings"]["decode_merge_s"] < 5
    old = decode_branch.routed_only(onnx.load(str(out / "model.onnx"), load_external_data=False))
    onnx.save(old, str(out / "routed_only.onnx"))  # the same external data file, next to it
    sessions = [ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"])
                for f in ("routed_only.onnx", "model.onnx")]
    return routed, out, *sessions


def _run(sess, feeds) -> dict:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _same(a: dict, b: dict, where, tol: float = 0.0) -> None:
    assert list(a) == list(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, (where, n, a[n].shape, b[n].shape)
        if tol and a[n].dtype.kind == "f":
            assert np.abs(a[n] - b[n]).max() <= tol, (where, n)
        else:
            assert np.array_equal(a[n], b[n]), (where, n)


@pytest.mark.parametrize("bsz", [1, 2])
def test_decode_branch_equals_routed_path_and_pytorch(exported, bsz):
    """Prefill (S > 1, empty past), 4 decode steps (S = 1) and a chunk of 3 tokens against the
    cache: the graph with the decode branch gives the routed path's outputs (exactly in prefill and
    the chunk, to 1e-5 and the same argmax in decode), and PyTorch's to 1e-4; index.* at decode is
    the one position, 0."""
    routed, out, old, new = exported
    graph = StepGraph(routed).eval()
    layers, n_layers = graph.layers, len(graph.layers)
    g = torch.Generator().manual_seed(bsz)
    ids = torch.randint(0, 256, (bsz, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :4] = 0 if bsz > 1 else 1  # left padding in the second row
    pos = default_positions(mask.bool())
    feeds = dict(zip(graph.input_names(), [t.numpy() for t in (ids, mask, pos, *empty_past(graph, bsz))]))
    a, b = _run(old, feeds), _run(new, feeds)
    _same(a, b, "prefill")
    with torch.no_grad():
        ref = dict(zip(graph.output_names(), graph(*[torch.from_numpy(v) for v in feeds.values()])))
        logits, cache = routed.prefill(ids, mask)
    for n in b:
        if ref[n].is_floating_point():
            assert np.abs(b[n] - ref[n].numpy()).max() <= 1e-4, n
        else:
            assert np.array_equal(b[n], ref[n].numpy()), n
    past = {f"past.{l}.{f}": b[f"new.{l}.{f}"] for l in layers for f in CACHE_FIELDS}
    tok, p = torch.from_numpy(b["logits"]).argmax(-1, keepdim=True), mask.sum(-1, keepdim=True)
    for step in range(4):
        feeds = {"input_ids": tok.numpy(), "attention_mask": np.ones((bsz, 1), np.int64), "position_ids": p.numpy(),
                 **past}
        a, b = _run(old, feeds), _run(new, feeds)
        _same(a, b, f"decode {step}", tol=1e-5)
        assert np.array_equal(a["logits"].argmax(-1), b["logits"].argmax(-1))
        with torch.no_grad():
            logits, cache = routed.decode_step(tok, p, cache)
        assert np.abs(b["logits"] - logits.numpy()).max() <= 1e-4
        for li in graph.routed_layers:
            assert np.array_equal(b[f"index.{li}"], np.zeros((bsz, 1), np.int64))
        assert all(b[f"new.{l}.key"].shape[0] == 1 for l in layers)
        past = {k: np.concatenate([v, b["new" + k[4:]]]) for k, v in past.items()}
        tok, p = logits.argmax(-1, keepdim=True), p + 1
    for li in range(n_layers):  # the cache built by the decode branch is PyTorch's
        assert np.abs(past[f"past.{li}.key"] - to_seq_major(cache[li])[0].numpy()).max() <= 1e-4
        assert np.array_equal(past[f"past.{li}.pos"], to_seq_major(cache[li])[2].numpy())
    chunk = torch.randint(0, 256, (bsz, 3), generator=g)  # S = 3 against the cache: the routed branch
    feeds = {"input_ids": chunk.numpy(), "attention_mask": np.ones((bsz, 3), np.int64),
             "position_ids": (p + torch.arange(3)).numpy(), **past}
    _same(_run(old, feeds), _run(new, feeds), "chunk")


def _branches(model: onnx.ModelProto):
    (node,) = [n for n in model.graph.node if n.op_type == "If"]
    g = {a.name: a.g for a in node.attribute}
    return g["then_branch"], g["else_branch"]


def _cache_concats(model: onnx.ModelProto, branch: onnx.GraphProto) -> int:
    """Concat nodes of `branch` that read the cache's keys or values (a graph input past.*.key /
    past.*.value, through layout-only ops): each one copies the whole cache."""
    views = {i.name for i in model.graph.input if i.name.startswith("past.") and i.name.endswith((".key", ".value"))}
    count = 0
    for n in branch.node:  # topological order
        if n.op_type in ("Transpose", "Reshape", "Identity", "Cast", "Unsqueeze") and n.input[0] in views:
            views.update(n.output)
        count += n.op_type == "Concat" and any(x in views for x in n.input)
    return count


def test_decode_branch_runs_no_router_no_ops_and_weights_are_stored_once(exported):
    routed, out, old, new = exported
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    decode, routed_g = _branches(model)
    n_routed = sum(routed.layer_is_routed(li) for li in range(len(routed.layers)))
    ops = [n.op_type for n in routed_g.node]
    assert ops.count("TopKGather") == ops.count("ScatterTokens") == n_routed == 2
    ops = [n.op_type for n in decode.node]
    assert not any(n.domain == "tokenskip" for n in decode.node)
    assert "TopK" not in ops and "ScatterElements" not in ops and "GatherElements" not in ops
    # one attention softmax per block: no score window (the learned router's routed branch has more)
    assert ops.count("Softmax") == len(routed.layers)
    # attention.graph_attend: no NaN guard, no any() over [B,q,T], no cache expanded to every head
    # (the routed branch has Expands, ReduceMax and IsNaN of its own: gather indices, the score window)
    assert not set(ops) & {"IsNaN", "Expand", "ReduceMax"}
    assert _cache_concats(model, decode) == 0  # attention.graph_attend_past: the cache is never copied
    assert _cache_concats(model, routed_g) == len(routed.layers) * 2  # prefill/chunks join it (graph_attend)
    if routed.router.needs_attention:
        assert [n.op_type for n in routed_g.node].count("Softmax") > len(routed.layers)
    router_weights = {t.name for t in model.graph.initializer if "router" in t.name}
    assert (len(router_weights) > 0) == (routed.router.needs_attention)
    assert not router_weights & {x for n in decode.node for x in n.input}
    # the weights once: initializers in the outer scope only, read by both branches
    assert len(decode.initializer) == len(routed_g.initializer) == 0
    big = {t.name for t in model.graph.initializer if np.prod(t.dims) >= 4096}  # projections, MLP, embedding
    reads = [{x for n in branch.node for x in n.input} & big for branch in (decode, routed_g)]
    assert reads[0] == reads[1] and len(reads[0]) >= 5 * len(routed.layers)  # q, o, gate, up, down
    assert sorted(p.name for p in out.glob("*.onnx.data")) == ["model.onnx.data"]
    # the decode branch is the dense graph: at most the dense trace's nodes plus the index outputs
    assert len(decode.node) < len(routed_g.node)
    assert sum(n.op_type == "ConstantOfShape" for n in decode.node) >= n_routed
    assert not [t.name for t in model.graph.initializer if t.name.startswith(decode_branch.DECODE)
                and np.prod(t.dims) >= 4096]  # no second copy of a weight


def test_routed_only_restores_the_previous_graph_and_dense_exports_are_unchanged():
    """routed_only gives the single-path graph (no If) that the TensorRT build parses; a graph with
    no custom op (a dense export) gets no If."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["input_ids"], ["logits"])], "dense",
                          [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["batch", "seq"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq"])])
    m = helper.make_model(g)
    before = m.SerializeToString()
    assert decode_branch.add_decode_branch(m, m).SerializeToString() == before
    assert decode_branch.routed_only(m) is None


@pytest.mark.parametrize("chunks", [1, 4])
def test_dense_export_runs_causal_chunks_in_prefill_and_one_rectangle_in_decode(tiny_llama, tmp_path, chunks):
    """A dense export is If(S == 1, decode, prefill) too: decode attends to the cache without
    copying it (attention.graph_attend_past) in one rectangle, and with causal chunks
    (--attention-chunks 4) prefill's attention runs in 4 query chunks (the upper triangle skipped;
    chunks at S = 1 would only add nodes and block ONNX Runtime's transpose fusion); both equal
    PyTorch, padded rows included (their attention output is 0 on every path)."""
    from tokenskip import attention

    model, path = tiny_llama
    routed, cfg = build_routed(model, router="dense", model_name=str(path))
    assert not StepGraph(routed).routed_layers
    out = tmp_path / "exp"
    with attention.graph_chunks(chunks):  # `tokenskip export --attention-chunks 4`
        export_tiny(model, str(path), routed, cfg, out, max_seq_len=256)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    decode, prefill = _branches(m)
    n = len(routed.layers)
    assert not any(x.domain == "tokenskip" for g in (decode, prefill) for x in g.node)
    assert [x.op_type for x in decode.node].count("Softmax") == n
    assert [x.op_type for x in prefill.node].count("Softmax") == n * chunks
    assert _cache_concats(m, decode) == 0 and _cache_concats(m, prefill) == 2 * n
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = StepGraph(routed).eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (2, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    pos = default_positions(mask.bool())
    feeds = dict(zip(graph.input_names(), [t.numpy() for t in (ids, mask, pos, *empty_past(graph, 2))]))
    got = _run(sess, feeds)
    with torch.no_grad():
        ref = dict(zip(graph.output_names(), graph(*[torch.from_numpy(v) for v in feeds.values()])))
    for name in got:
        if ref[name].is_floating_point():
            assert np.abs(got[name] - ref[name].numpy()).max() <= 1e-4, name
        else:
            assert np.array_equal(got[name], ref[name].numpy()), name
    past = {f"past.{l}.{f}": got[f"new.{l}.{f}"] for l in graph.layers for f in CACHE_FIELDS}
    tok, p = torch.from_numpy(got["logits"]).argmax(-1, keepdim=True), mask.sum(-1, keepdim=True)
    step = {"input_ids": tok.numpy(), "attention_mask": np.ones((2, 1), np.int64), "position_ids": p.numpy(), **past}
    got = _run(sess, step)
    with torch.no_grad():
        ref = dict(zip(graph.output_names(), graph(*[torch.from_numpy(v) for v in step.values()])))
    assert np.abs(got["logits"] - ref["logits"].numpy()).max() <= 1e-4
