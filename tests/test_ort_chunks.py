"""Causal query chunks applied by the ONNX Runtime backend (tokenskip.deploy.runtime.ort_chunks).

On a tiny random Llama (4 query heads, 2 KV heads), exported dense, static kv_policy=skip, learned
kv_policy=skip and static kv_policy=dense: the OrtBackend with chunks gives the unchunked graph's
outputs (to 1e-5) for a padded prefill, a chunk against the cache with fewer rows than chunks and
with more, and decode steps; every block's rectangle is rewritten where the rule allows it
(dense and kv_policy=skip exports), nothing where it does not (kv_policy=dense, traced chunks);
the learned router's score-window softmax is left alone; the file on disk is unchanged.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from tokenskip.config import RoutingConfig, build_routed, save_routing  # noqa: E402
from tokenskip.deploy.runtime import ort_chunks  # noqa: E402
from tokenskip.deploy.runtime.ort_backend import OrtBackend  # noqa: E402
from tokenskip.errors import UserError  # noqa: E402
from tokenskip.export import decode_branch  # noqa: E402
from tokenskip.export.sidecar import read_export  # noqa: E402

from conftest import export_tiny, random_learned_router  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = [("dense", "skip"), ("static", "skip"), ("learned", "skip"), ("static", "dense")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{r}-{k}" for r, k in CASES])
def export_dir(request, tiny_llama, tmp_path_factory):
    router_name, kv = request.param
    model, path = tiny_llama
    if router_name == "dense":
        routed, cfg = build_routed(model, router="dense", model_name=str(path))
    else:
        cfg = RoutingConfig(model=str(path), num_layers=4, router=router_name, schedule=[0.0, 0.5, 0.4, 0.0],
                            kv_policy=kv, model_type="llama", hidden_size=64, score_window=8)
        routers_dir = tmp_path_factory.mktemp("routers")
        save_routing(routers_dir, cfg, random_learned_router() if router_name == "learned" else None)
        routed, cfg = build_routed(model, routers_dir=routers_dir)
    out = tmp_path_factory.mktemp("export") / "exp"
    export_tiny(model, str(path), routed, cfg, out, max_seq_len=256)
    return out, request.param


def _backend(folder, monkeypatch, chunks: int) -> OrtBackend:
    monkeypatch.setenv("TOKENSKIP_ORT_ATTENTION_CHUNKS", str(chunks))
    be = OrtBackend(folder, threads=1)
    be.new_tokens = 12
    return be


def test_chunked_session_equals_the_rectangle(export_dir, monkeypatch):
    folder, (router, kv) = export_dir
    digest = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    one, four = _backend(folder, monkeypatch, 1), _backend(folder, monkeypatch, 4)
    chunked = kv == "skip"  # dense exports count as skip (no routed block reads other rows)
    assert one.stats.get("attention_chunks", 1) == 1
    assert four.stats["attention_chunks"] == (4 if chunked else 1)
    assert four.stats["chunked_rectangles"] == (4 if chunked else 0)  # every block, or none
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 256, (2, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: rows no key may reach
    (l1, c1), (l4, c4) = one.prefill(ids, mask), four.prefill(ids, mask)
    torch.testing.assert_close(l4, l1, rtol=0, atol=1e-5)
    pos = mask.sum(-1, keepdim=True)
    for rows in (2, 7):  # a chunked prefill against the cache: fewer rows than chunks, and more
        more = torch.randint(2, 256, (2, rows), generator=g)
        positions = pos + torch.arange(rows)
        (l1, c1), (l4, c4) = one.prefill_chunk(more, positions, c1), four.prefill_chunk(more, positions, c4)
        torch.testing.assert_close(l4, l1, rtol=0, atol=1e-5)
        pos = pos + rows
    tok = l1[:, -1].argmax(-1, keepdim=True) if l1.dim() == 3 else l1.argmax(-1, keepdim=True)
    for _ in range(3):
        (l1, c1), (l4, c4) = one.decode(tok, pos, c1), four.decode(tok, pos, c4)
        torch.testing.assert_close(l4, l1, rtol=0, atol=1e-5)
        tok, pos = l1.argmax(-1, keepdim=True), pos + 1
    assert hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest() == digest


def test_rewrite_leaves_the_score_window_and_decode_alone(export_dir):
    folder, (router, kv) = export_dir
    meta = read_export(folder, "--onnx")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    decode = next(a.g for a in ifs[0].attribute if a.name == "then_branch")
    before = decode.SerializeToString()
    prefill = decode_branch.prefill_graph(model)
    softmax = sum(n.op_type == "Softmax" for n in prefill.node)
    n = ort_chunks.chunk_attention(model, 4, groups=2, head_dim=16) if ort_chunks.eligible(meta) else 0
    assert n == (4 if kv == "skip" else 0)
    after = sum(x.op_type == "Softmax" for x in prefill.node)
    assert after == softmax + 3 * n  # each rectangle's one softmax became four; the window's stayed
    assert decode.SerializeToString() == before
    if n:  # next to the weights file its external-data references name
        from tokenskip.export import onnx_ops

        onnx_ops.register_schemas()
        check = folder / "chunked-check.onnx"
        onnx.save(model, str(check))
        try:
            onnx.checker.check_model(str(check), full_check=True)
        finally:
            check.unlink()


def test_traced_chunks_and_kv_policy_dense_are_not_eligible():
    assert ort_chunks.eligible({"custom_ops": {"ops": []}})
    assert ort_chunks.eligible({"custom_ops": {"ops": ["TopKGather"]}, "kv_policy": "skip"})
    assert not ort_chunks.eligible({"custom_ops": {"ops": ["TopKGather"]}, "kv_policy": "dense"})
    assert not ort_chunks.eligible({"custom_ops": {"ops": []}, "attention_chunks": 4})


def test_bad_setting_names_the_variable(export_dir, monkeypatch):
    folder, _ = export_dir
    monkeypatch.setenv("TOKENSKIP_ORT_ATTENTION_CHUNKS", "zero")
    with pytest.raises(UserError, match="TOKENSKIP_ORT_ATTENTION_CHUNKS"):
        OrtBackend(folder, threads=1)


def test_rectangle_chunks_equal_numpy_on_one_block():
    """The rewrite on a one-block graph built by hand (q = 5 rows after a past of 3, 2 KV heads, 2
    groups): equal to the rectangle it replaces, valid rows and all."""
    from onnx import TensorProto, helper

    b, nkv, g, q, past, d = 1, 2, 2, 5, 3, 4
    t = past + q
    f = TensorProto.FLOAT
    shape5 = helper.make_tensor("s5", TensorProto.INT64, [5], [b, nkv, g, q, t])
    shape4 = helper.make_tensor("s4", TensorProto.INT64, [4], [b, nkv, g * q, t])
    shape_out = helper.make_tensor("so", TensorProto.INT64, [4], [b, nkv * g, q, d])
    nodes = [helper.make_node("MatMul", ["qg", "kt"], ["mm1"]), helper.make_node("Reshape", ["mm1", "s5"], ["v5"]),
             helper.make_node("Add", ["v5", "bias"], ["add"]), helper.make_node("Softmax", ["add"], ["p"], axis=-1),
             helper.make_node("Reshape", ["p", "s4"], ["p4"]), helper.make_node("MatMul", ["p4", "v"], ["mm2"]),
             helper.make_node("Reshape", ["mm2", "so"], ["out"])]
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("qg", f, [b, nkv, g * q, d]),
                                             helper.make_tensor_value_info("kt", f, [b, nkv, d, t]),
                                             helper.make_tensor_value_info("bias", f, [b, 1, 1, q, t]),
                                             helper.make_tensor_value_info("v", f, [b, nkv, t, d])],
                              [helper.make_tensor_value_info("out", f, [b, nkv * g, q, d])],
                              initializer=[shape5, shape4, shape_out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    qpos, kpos = np.arange(past, t), np.arange(t)
    bias = np.where(kpos[None, :] <= qpos[:, None], 0.0, -1e30).astype(np.float32)[None, None, None]
    feeds = {"qg": rng.standard_normal((b, nkv, g * q, d), np.float32),
             "kt": rng.standard_normal((b, nkv, d, t), np.float32), "bias": bias,
             "v": rng.standard_normal((b, nkv, t, d), np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert ort_chunks.chunk_attention(model, 4, groups=g, head_dim=d) == 1
    onnx.checker.check_model(model, full_check=True)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 4
