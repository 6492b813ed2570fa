"""The ONNX function bodies of tokenskip::TopKGather / ScatterTokens, each alone in ONNX Runtime,
against the numpy references (tokenskip.ops_reference). Fast: no model is loaded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

ort = pytest.importorskip("onnxruntime")

from tokenskip import ops_reference as ref  # noqa: E402
from tokenskip.export import onnx_ops  # noqa: E402


def _session(model: onnx.ModelProto):
    # CPU EP, no custom-op library: ORT must run the model-local function body
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


_SESSIONS: dict = {}


def topk_session(num: int, den: int, min_keep: int, dtype=TensorProto.FLOAT, opset: int = 18):
    key = ("topk", num, den, min_keep, dtype, opset)
    if key not in _SESSIONS:
        m = onnx_ops.single_op_model(onnx_ops.TOPK_GATHER, opset, dtype, keep_num=num, keep_den=den,
                                     min_keep=min_keep)
        onnx.checker.check_model(m, full_check=True)
        _SESSIONS[key] = _session(m)
    return _SESSIONS[key]


def scatter_session(dtype=TensorProto.FLOAT, opset: int = 18):
    key = ("scatter", dtype, opset)
    if key not in _SESSIONS:
        m = onnx_ops.single_op_model(onnx_ops.SCATTER_TOKENS, opset, dtype)
        onnx.checker.check_model(m, full_check=True)
        _SESSIONS[key] = _session(m)
    return _SESSIONS[key]


def check_both(hidden, scores, num, den, min_keep, dtype=TensorProto.FLOAT, seed=0, valid=None):
    valid = np.ones(scores.shape, bool) if valid is None else valid
    feeds = {"hidden": hidden, "scores": scores, "valid": valid}
    kept, index = topk_session(num, den, min_keep, dtype).run(None, feeds)
    rkept, rindex = ref.topk_gather(hidden, scores, num, den, min_keep, valid)
    assert index.dtype == np.int64
    assert np.array_equal(index, rindex)
    assert kept.dtype == hidden.dtype and np.array_equal(kept, rkept)
    delta = np.random.default_rng(seed).standard_normal(kept.shape).astype(hidden.dtype)
    out = scatter_session(dtype).run(None, {"hidden": hidden, "delta": delta, "index": index})[0]
    expect = ref.scatter_tokens(hidden, delta, rindex)
    assert out.dtype == hidden.dtype
    assert np.array_equal(out, expect)  # one rounding per element in both: bit-identical
    return index


def test_function_bodies_present_and_attributes():
    m = onnx_ops.single_op_model(onnx_ops.TOPK_GATHER, 18, keep_num=7, keep_den=10, min_keep=2)
    node = m.graph.node[0]
    assert (node.domain, node.op_type) == ("tokenskip", "TopKGather")
    assert list(node.input) == ["hidden", "scores", "valid"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"keep_num": 7, "keep_den": 10, "min_keep": 2, "plugin_namespace": b"tokenskip"}
    funcs = {(f.domain, f.name): f for f in m.functions}
    assert set(funcs) == {("tokenskip", "TopKGather"), ("tokenskip", "ScatterTokens")}
    assert list(funcs[("tokenskip", "TopKGather")].attribute) == ["keep_num", "keep_den", "min_keep"]
    assert list(funcs[("tokenskip", "TopKGather")].input) == ["hidden", "scores", "valid"]
    body_ops = {n.op_type for n in funcs[("tokenskip", "ScatterTokens")].node}
    assert "ScatterElements" in body_ops
    for n in funcs[("tokenskip", "ScatterTokens")].node:  # TensorRT-RTX has no reduction="add"
        assert all(a.name != "reduction" for a in n.attribute)
    assert all(n.domain == "" for f in m.functions for n in f.node)  # standard ops only
    assert m.ir_version == 10


@pytest.mark.parametrize("seq,num,den", [(1, 1, 2), (2, 1, 2), (10, 7, 10), (37, 3, 10), (64, 1, 1)])
def test_topk_gather_many_ties_and_infs(seq, num, den):
    rng = np.random.default_rng(seq)
    hidden = rng.standard_normal((3, seq, 8)).astype(np.float32)
    scores = rng.integers(0, 3, (3, seq)).astype(np.float32)  # many ties
    scores[0, 0] = np.inf
    scores[1, -1] = -np.inf
    scores[2, : seq // 2] = np.inf  # ties among +inf
    check_both(hidden, scores, num, den, 2)


def test_k_equals_one_and_k_equals_s():
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((2, 9, 4)).astype(np.float32)
    scores = rng.standard_normal((2, 9)).astype(np.float32)
    idx = check_both(hidden, scores, 0, 1, 1)  # keep nothing but min_keep = 1 -> k = 1
    assert idx.shape == (2, 1)
    assert np.array_equal(idx[:, 0], scores.argmax(-1))
    idx = check_both(hidden, scores, 1, 1, 2)  # keep everything -> k = S, identity order
    assert np.array_equal(idx, np.broadcast_to(np.arange(9), (2, 9)))
    idx = check_both(hidden, scores, 1, 10, 50)  # min_keep > S -> k = S
    assert idx.shape == (2, 9)


def test_all_equal_scores_pick_lowest_positions():
    hidden = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3)
    scores = np.zeros((2, 10), np.float32)
    idx = check_both(hidden, scores, 1, 2, 2)
    assert np.array_equal(idx, np.broadcast_to(np.arange(5), (2, 5)))


def test_batch_with_different_valid_lengths():
    """Scores as the routed model gives them: padding -inf, first/last valid +inf; each row keeps
    keep(L_b) real tokens and fills the rest of its k slots with padding."""
    rng = np.random.default_rng(2)
    seq = 23
    hidden = rng.standard_normal((4, seq, 6)).astype(np.float32)
    scores = rng.standard_normal((4, seq)).astype(np.float32)
    valid = np.ones((4, seq), bool)
    for b, pad in enumerate([0, 5, 17, 21]):  # left padding
        valid[b, :pad] = False
        scores[b, :pad] = -np.inf
        scores[b, pad] = np.inf
        scores[b, -1] = np.inf
    idx = check_both(hidden, scores, 3, 5, 2, valid=valid)
    k = ref.keep_count(seq, 3, 5, 2)
    assert idx.shape == (4, k)
    assert (np.diff(idx, axis=1) > 0).all()  # ascending and unique
    real = np.take_along_axis(valid, idx, axis=1).sum(axis=1)
    assert real.tolist() == [ref.keep_count(seq - pad, 3, 5, 2) for pad in [0, 5, 17, 21]] == [14, 11, 4, 2]


def test_long_sequence_beyond_tensorrt_topk_cap():
    rng = np.random.default_rng(3)
    seq = 5000  # k = 3500 and S = 5000 > TensorRT's native TopK cap of 3840
    hidden = rng.standard_normal((2, seq, 4)).astype(np.float32)
    scores = rng.integers(0, 50, (2, seq)).astype(np.float32)
    idx = check_both(hidden, scores, 7, 10, 2)
    assert idx.shape == (2, 3500)


def test_fp16_hidden():
    rng = np.random.default_rng(4)
    hidden = rng.standard_normal((2, 31, 8)).astype(np.float16)
    scores = rng.standard_normal((2, 31)).astype(np.float32)
    check_both(hidden, scores, 13, 20, 2, dtype=TensorProto.FLOAT16)


@pytest.mark.parametrize("opset", [17, 21])
def test_other_opsets(opset):
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((2, 12, 4)).astype(np.float32)
    scores = rng.standard_normal((2, 12)).astype(np.float32)
    sess = _session(onnx_ops.single_op_model(onnx_ops.TOPK_GATHER, opset, keep_num=1, keep_den=2, min_keep=2))
    kept, index = sess.run(None, {"hidden": hidden, "scores": scores, "valid": np.ones((2, 12), bool)})
    assert np.array_equal(index, ref.topk_gather(hidden, scores, 1, 2, 2)[1])


def test_checker_rejects_missing_attribute():
    onnx_ops.register_schemas()
    m = onnx_ops.single_op_model(onnx_ops.TOPK_GATHER, 18, keep_num=1, keep_den=2)  # no min_keep
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m, full_check=True)
