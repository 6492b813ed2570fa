"""The TopKGather contract of docs/ops.md, in every backend that runs here: the numpy reference,
the PyTorch op (and the routed model that calls it), and ONNX Runtime on the function body.

- k per row from the row's valid length: a row keeps the same real tokens alone and in a padded batch;
- more forced (+inf) tokens than k_b: the k_b lowest positions among them;
- NaN ranks like -inf.
The CUDA kernels are held to the same cases in tests/test_plugins_gpu.py (GPU only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenskip import ops, ops_reference as R
from tokenskip.routed import RoutedModel, block_keep_counts, forced_tokens
from tokenskip.routers import LearnedRouter, StaticRouter
from tokenskip.schedule import Schedule

ort = pytest.importorskip("onnxruntime")
from tokenskip.export import onnx_ops  # noqa: E402

KEEP = (3, 5, 2)  # keep_num, keep_den, min_keep
_SESSIONS: dict = {}


def _ort_topk(hidden, scores, valid, keep):
    if keep not in _SESSIONS:
        model = onnx_ops.single_op_model(onnx_ops.TOPK_GATHER, 18, keep_num=keep[0], keep_den=keep[1],
                                         min_keep=keep[2])
        _SESSIONS[keep] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return tuple(_SESSIONS[keep].run(None, {"hidden": hidden, "scores": scores, "valid": valid}))


def _torch_topk(hidden, scores, valid, keep):
    kept, index = ops.topk_gather(torch.from_numpy(hidden), torch.from_numpy(scores), torch.from_numpy(valid), *keep)
    return kept.numpy(), index.numpy()


def _ref_topk(hidden, scores, valid, keep):
    return R.topk_gather(hidden, scores, *keep, valid)


BACKENDS = {"reference": _ref_topk, "torch": _torch_topk, "onnxruntime": _ort_topk}


def _real_tokens(index, valid_row, offset):
    """Positions (relative to the row's first real token) of the real tokens an index row keeps."""
    return [int(i) - offset for i in index if valid_row[i]]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("keep", [KEEP, (7, 10, 2), (1, 3, 1)])
def test_row_keeps_the_same_tokens_alone_and_in_a_padded_batch(backend, keep):
    run = BACKENDS[backend]
    rng = np.random.default_rng(sum(keep))
    S, H = 29, 5
    lengths = [29, 17, 6, 2, 1, 0]
    hidden = rng.standard_normal((len(lengths), S, H)).astype(np.float32)
    scores = rng.integers(-3, 4, (len(lengths), S)).astype(np.float32)  # ties decided by position
    scores[rng.random(scores.shape) < 0.1] = np.nan
    for side in ("left", "right"):
        valid = np.zeros((len(lengths), S), bool)
        for b, n in enumerate(lengths):
            if side == "left":
                valid[b, S - n:] = True
            else:
                valid[b, :n] = True
        kept, index = run(hidden, scores, valid, keep)
        assert index.shape == (len(lengths), R.keep_count(S, *keep)) and index.dtype == np.int64
        assert (np.diff(index, axis=1) > 0).all()  # ascending, unique
        for b, n in enumerate(lengths):
            start = S - n if side == "left" else 0
            real = _real_tokens(index[b], valid[b], start)
            assert len(real) == R.keep_count(n, *keep)  # k_b from the row's own length
            fill = [int(i) for i in index[b] if not valid[b, i]]  # the rest: the lowest padding positions
            assert fill == np.flatnonzero(~valid[b])[: index.shape[1] - len(real)].tolist()
            if n == 0:
                continue
            row = slice(start, start + n)  # the same row alone: S = L_b, no padding
            kept1, index1 = run(hidden[b:b + 1, row], scores[b:b + 1, row], np.ones((1, n), bool), keep)
            assert real == index1[0].tolist()
            assert np.array_equal(kept[b][valid[b, index[b]]], kept1[0])  # the same hidden rows


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_more_forced_tokens_than_k_keeps_the_lowest_positions(backend):
    run = BACKENDS[backend]
    S = 10
    hidden = np.arange(2 * S * 2, dtype=np.float32).reshape(2, S, 2)
    scores = np.zeros((2, S), np.float32)
    scores[0, [1, 3, 4, 6, 8, 9]] = np.inf  # six forced tokens
    scores[1, :] = np.inf  # every token forced
    valid = np.ones((2, S), bool)
    valid[1, :4] = False  # row 1: L = 6, k_b = keep(6) = 3, six forced tokens
    keep = (1, 2, 1)  # k = keep(10) = 5: row 0 keeps 5 of its 6 forced tokens
    _, index = run(hidden, scores, valid, keep)
    assert index[0].tolist() == [1, 3, 4, 6, 8]  # the 5 lowest positions among the forced
    assert index[1].tolist() == [0, 1, 4, 5, 6]  # 2 padding fill + the 3 lowest forced real tokens


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_nan_ranks_like_minus_inf(backend):
    run = BACKENDS[backend]
    rng = np.random.default_rng(7)
    S = 40
    hidden = rng.standard_normal((3, S, 3)).astype(np.float32)
    scores = rng.standard_normal((3, S)).astype(np.float32)
    scores[0, ::3] = np.nan
    scores[1, :] = np.nan  # a whole row of NaN: the lowest positions win
    scores[2, 5:30] = np.nan
    scores[2, 30:] = -np.inf
    valid = np.ones((3, S), bool)
    valid[2, :4] = False
    as_inf = np.where(np.isnan(scores), np.float32(-np.inf), scores)
    _, index = run(hidden, scores, valid, KEEP)
    _, index_inf = run(hidden, as_inf, valid, KEEP)
    assert np.array_equal(index, index_inf)
    k = R.keep_count(S, *KEEP)
    assert index[1].tolist() == list(range(k))
    # row 2: one finite real score (position 4), then NaN and -inf tie: the lowest positions first
    kb = R.keep_count(S - 4, *KEEP)
    assert index[2].tolist() == list(range(k - kb)) + list(range(4, 4 + kb))


def test_select_topk_without_padding_is_the_batch_rule():
    """keep_mask/select_topk with a fixed k (training: no padding) = the per-row rule with L_b = S."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 50), generator=g).float()
    scores[0, 7] = float("nan")
    k = R.keep_count(50, *KEEP)
    fixed = ops.select_topk(scores, k)
    per_row = ops.select_topk(scores, k, torch.ones(3, 50, dtype=torch.bool), torch.full((3,), k))
    assert torch.equal(fixed, per_row)
    assert np.array_equal(fixed.numpy(), R.topk_gather(np.zeros((3, 50, 1), np.float32), scores.numpy(), *KEEP)[1])


def test_routed_model_never_forces_more_than_a_row_keeps():
    for n_tail in (0, 1, 4):
        for sparsity in (0.1, 0.5, 0.9):
            sched = Schedule((sparsity,))
            for length in range(0, 12):
                valid = torch.zeros(1, 12, dtype=torch.bool)
                valid[0, 12 - length:] = True
                forced = forced_tokens(valid, n_tail).sum().item() if length else 0
                assert forced <= block_keep_counts(sched, 0, valid, n_tail).item(), (n_tail, sparsity, length)


@pytest.mark.parametrize("mode", ["gather", "mask"])
@pytest.mark.parametrize("n_tail", [0, 3])
def test_routed_row_alone_equals_row_in_padded_batch(tiny_llama, mode, n_tail):
    """Gather (the exported op / evaluation) and mask mode (training): a row's kept tokens and
    logits do not depend on its batch neighbours."""
    model, _ = tiny_llama
    n = model.config.num_hidden_layers
    sched = Schedule((0.0, 0.4, 0.6, 0.0))
    g = torch.Generator().manual_seed(1)
    S = 24
    ids = torch.randint(0, model.config.vocab_size, (3, S), generator=g)
    mask = torch.ones(3, S, dtype=torch.long)
    mask[1, :9] = 0  # left padding: L = 15
    mask[2, :20] = 0  # L = 4
    for router in (StaticRouter(), LearnedRouter()):  # scores from the row's own positions / features
        rm = RoutedModel(model, sched, router)
        with torch.no_grad():
            batch = rm(ids, mask, n_tail=n_tail, mode=mode, trace=True)
            for b in range(3):
                start = int((mask[b] == 0).sum())
                alone = rm(ids[b:b + 1, start:], None, n_tail=n_tail, mode=mode, trace=True)
                for li in range(n):
                    tb, ta = batch.traces[li], alone.traces[li]
                    if tb.index is None:
                        continue
                    real = [int(i) - start for i in tb.index[b] if mask[b, i]]
                    assert real == ta.index[0].tolist(), (type(router).__name__, mode, b, li)
                diff = (batch.logits[b, start:] - alone.logits[0]).abs().max().item()
                assert diff <= 1e-4, diff
