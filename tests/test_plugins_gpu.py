"""GPU tests of the plugin kernels' C entry points against the numpy references (docs/ops.md).

TopKGather selection, both paths (one block per row, several blocks per row) and the automatic
choice, on: random scores, heavy ties, clustered router-like scores (the radix select must go down
to the last byte), +inf (forced) / -inf / signed zeros, NaN (ranks like -inf), all-NaN and all-equal
rows; padding on the left, on the right, in holes, whole padded rows and none; keep fractions from
k = 1 to k = S and min_keep above L; row lengths around the 4-score groups, the 1024/4096-score tiles,
the 2048-score chunks and the multi-block threshold, up to S = 40000; batches 1..9. Then the gather
in every (dtype, index dtype), and ScatterTokens out of place and in place. Skipped, with the
reason, where there is no CUDA GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokenskip import ops_reference as R  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPES = ["float32", "float16", "bfloat16"]
INDEX = ["int32", "int64"]
KEEPS = [(3, 5, 1), (7, 10, 2), (1, 1, 1), (0, 1, 1), (1, 10, 50), (2, 7, 3), (9999, 10000, 2)]
SCORE_KINDS = ["random", "ties", "clustered", "inf", "nan", "equal"]
VALID_KINDS = ["none", "left", "right", "holes"]
LENGTHS = [1, 2, 3, 5, 100, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097, 8192, 8193, 12289, 40000]


@pytest.fixture(scope="module")
def lib():
    if not torch.cuda.is_available():
        print("SKIP REASON: no CUDA GPU (torch.cuda.is_available() is False)")
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")
    from tokenskip.plugins import build_library

    major, minor = torch.cuda.get_device_capability()
    return build_library(arch=f"{major}{minor}", kernels_only=True)  # the kernels' C entry points; no TensorRT


def make_scores(kind: str, B: int, S: int, rng) -> np.ndarray:
    """[B,S] float32 scores of a given flavour."""
    if kind == "random":
        return rng.standard_normal((B, S)).astype(np.float32)
    if kind == "ties":  # few distinct values: the tie rule decides most of the selection
        return rng.integers(0, 3, (B, S)).astype(np.float32)
    if kind == "clustered":  # router-like: one narrow band, equal top bytes, ties in the last one
        return (np.float32(0.75) + rng.integers(0, 40, (B, S)).astype(np.float32) * np.float32(2 ** -20))
    if kind == "inf":  # forced tokens (+inf), -inf, signed zeros
        s = rng.integers(-2, 3, (B, S)).astype(np.float32)
        s[s == 2] = np.inf
        s[s == -2] = -np.inf
        s[:, ::7] = -0.0
        s[:, 0] = np.inf
        s[:, -1] = np.inf
        return s
    if kind == "nan":  # NaN ranks like -inf; some rows all NaN
        s = rng.standard_normal((B, S)).astype(np.float32)
        s[rng.random((B, S)) < 0.3] = np.nan
        s[rng.random((B, S)) < 0.1] = -np.inf
        s[::3] = np.nan
        return s
    if kind == "equal":
        return np.full((B, S), 0.5, np.float32)
    raise ValueError(kind)


def make_valid(kind: str, B: int, S: int, rng) -> np.ndarray | None:
    """[B,S] bool valid mask (None: no padding); row lengths include 0, 1 and S."""
    if kind == "none":
        return None
    lengths = rng.integers(0, S + 1, B)
    lengths[0] = S
    if B > 1:
        lengths[1] = 0
    if B > 2:
        lengths[2] = min(S, 1)
    pos = np.arange(S)[None, :]
    if kind == "left":
        return pos >= (S - lengths)[:, None]
    if kind == "right":
        return pos < lengths[:, None]
    if kind == "holes":
        v = rng.random((B, S)) < 0.7
        v[0] = True
        return v
    raise ValueError(kind)


def _reference_index(scores, valid, keep):
    B, S = scores.shape
    return R.topk_gather(np.zeros((B, S, 1), np.float32), scores, *keep, valid)[1]


def _gpu(x):
    return None if x is None else torch.from_numpy(x).cuda()


def _check_select(lib, scores, valid, keep, algo, index_dtype="int64"):
    from tokenskip.plugins import kernels

    index = kernels.topk_select(lib, _gpu(scores), keep, _gpu(valid), algo, getattr(torch, index_dtype))
    torch.cuda.synchronize()
    ref = _reference_index(scores, valid, keep)
    got = index.cpu().numpy().astype(np.int64)
    assert got.shape == ref.shape
    if not np.array_equal(got, ref):
        bad = int(np.flatnonzero((got != ref).any(axis=1))[0])
        raise AssertionError(f"{algo}: row {bad} differs (S={scores.shape[1]}, keep={keep}): "
                             f"got {got[bad][:20]}..., expected {ref[bad][:20]}...")


@pytest.mark.parametrize("algo", ["single", "multi", "auto"])
@pytest.mark.parametrize("score_kind", SCORE_KINDS)
def test_select_every_length_and_padding(lib, algo, score_kind):
    rng = np.random.default_rng(len(score_kind))
    for S in LENGTHS:
        B = 3 if S < 20000 else 2
        for valid_kind in VALID_KINDS:
            keep = KEEPS[(S + len(valid_kind)) % len(KEEPS)]
            _check_select(lib, make_scores(score_kind, B, S, rng), make_valid(valid_kind, B, S, rng), keep, algo)


@pytest.mark.parametrize("algo", ["single", "multi"])
@pytest.mark.parametrize("keep", KEEPS)
def test_select_every_keep_fraction(lib, algo, keep):
    rng = np.random.default_rng(keep[0] + keep[2])
    for S, B in ((777, 9), (5000, 4), (32768, 1)):
        for score_kind in ("ties", "clustered", "nan"):
            _check_select(lib, make_scores(score_kind, B, S, rng), make_valid("left", B, S, rng), keep, algo)


@pytest.mark.parametrize("index_dtype", INDEX)
def test_select_index_dtypes_and_batch_8_long_rows(lib, index_dtype):
    rng = np.random.default_rng(5)
    for algo in ("single", "multi", "auto"):
        _check_select(lib, make_scores("random", 8, 32768, rng), make_valid("right", 8, 32768, rng), (3, 5, 2), algo,
                      index_dtype)


def test_auto_path_choice(lib):
    from tokenskip.plugins import kernels

    assert kernels.uses_multi_block(lib, 1, 32768) and kernels.uses_multi_block(lib, 8, 32768)
    assert not kernels.uses_multi_block(lib, 1, 2048)


def test_row_alone_equals_row_in_padded_batch(lib):
    """The per-row rule on the GPU: a row's real tokens do not depend on its batch neighbours."""
    from tokenskip.plugins import kernels

    rng = np.random.default_rng(9)
    S, keep = 20000, (3, 5, 2)
    lengths = [20000, 15000, 9000, 3000, 17]
    scores = make_scores("clustered", len(lengths), S, rng)
    valid = np.arange(S)[None, :] >= (S - np.array(lengths))[:, None]  # left padding
    for algo in ("single", "multi"):
        index = kernels.topk_select(lib, _gpu(scores), keep, _gpu(valid), algo).cpu().numpy()
        for b, n in enumerate(lengths):
            alone = kernels.topk_select(lib, _gpu(np.ascontiguousarray(scores[b:b + 1, S - n:])), keep, None,
                                        algo).cpu().numpy()
            real = [int(i) - (S - n) for i in index[b] if valid[b, i]]
            assert real == alone[0].tolist(), (algo, b)


def _check_topk_gather(lib, B, S, H, keep, dtype, index_dtype, score_kind, valid_kind, seed=0):
    from tokenskip.plugins import kernels

    rng = np.random.default_rng(seed)
    scores = make_scores(score_kind, B, S, rng)
    valid = make_valid(valid_kind, B, S, rng)
    hidden = torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed)).to(getattr(torch, dtype))  # [B,S,H]
    kept, index = kernels.topk_gather(lib, hidden.cuda(), _gpu(scores), keep, _gpu(valid), getattr(torch, index_dtype))
    torch.cuda.synchronize()
    ref_index = _reference_index(scores, valid, keep)
    assert index.dtype == getattr(torch, index_dtype)
    np.testing.assert_array_equal(index.cpu().numpy().astype(np.int64), ref_index)
    ref_kept = torch.gather(hidden, 1, torch.from_numpy(ref_index)[:, :, None].expand(B, ref_index.shape[1], H))
    assert torch.equal(kept.cpu(), ref_kept)  # a pure copy: bit-exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX)
def test_topk_gather_matches_reference(lib, dtype, index_dtype):
    for i, (S, H) in enumerate(((1000, 72), (1001, 5), (9000, 64), (40000, 8))):  # aligned, odd H, multi-block
        for j, score_kind in enumerate(("random", "ties", "inf", "nan")):
            _check_topk_gather(lib, 3, S, H, KEEPS[(i + j) % len(KEEPS)], dtype, index_dtype, score_kind,
                               VALID_KINDS[(i + j) % len(VALID_KINDS)], seed=i * 10 + j)


def test_bad_arguments_return_an_error(lib):
    from tokenskip.plugins import kernels

    scores = torch.zeros(1, 10, device="cuda")
    index = torch.empty(1, 6, dtype=torch.int64, device="cuda")
    ws = kernels.topk_workspace(lib, 1, 10)
    with pytest.raises(RuntimeError, match="cudaError"):
        kernels.topk_select_into(lib, scores, None, (3, 0, 1), index, ws)  # keep_den 0
    handle = kernels.load(lib)
    code = handle.tokenskip_topk_select_i64(scores.data_ptr(), None, 1, 10, 3, 5, 1, 7, index.data_ptr(),
                                            ws.data_ptr(), None)  # algo 7
    assert code != 0
    for S in (0, 1, 7, 40000):
        for num, den, mk in ((3, 5, 1), (0, 1, 4), (1, 1, 1), (2, 7, 3)):
            assert handle.tokenskip_keep_count(S, num, den, mk) == R.keep_count(S, num, den, mk)


# ----------------------------------------------------------------------------------- ScatterTokens
def _check_scatter(lib, B, S, H, k, dtype, index_dtype, seed=0, mode="copy"):
    from tokenskip.plugins import kernels

    g = torch.Generator().manual_seed(seed)
    tdt = getattr(torch, dtype)
    hidden = torch.randn(B, S, H, generator=g).to(tdt)                          # [B,S,H]
    delta = torch.randn(B, k, H, generator=g).to(tdt)                           # [B,k,H]
    index = torch.stack([torch.randperm(S, generator=g)[:k] for _ in range(B)])  # [B,k], unique per row
    if dtype == "bfloat16":  # numpy has no bf16: float32 sum rounded once to bf16 is the same value
        ref = torch.from_numpy(R.scatter_tokens(hidden.float().numpy(), delta.float().numpy(), index.numpy())).to(tdt)
    else:
        ref = torch.from_numpy(R.scatter_tokens(hidden.numpy(), delta.numpy(), index.numpy()))
    h = hidden.cuda()
    idx = index.to(getattr(torch, index_dtype)).cuda()
    if mode == "copy":
        out = kernels.scatter_tokens(lib, h, delta.cuda(), idx)
    elif mode == "out_is_hidden":  # the plugin's dispatch when TensorRT aliased the output
        out = kernels.scatter_tokens(lib, h, delta.cuda(), idx, out=h)
    else:  # the explicit in-place entry point
        kernels.scatter_tokens_inplace(lib, h, delta.cuda(), idx)
        out = h
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ref)
    if mode == "copy":
        assert torch.equal(h.cpu(), hidden)  # input untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX)
@pytest.mark.parametrize("mode", ["copy", "out_is_hidden", "inplace"])
def test_scatter_tokens_matches_reference(lib, dtype, index_dtype, mode):
    for i, (B, S, H, k) in enumerate(((2, 1000, 72, 1), (2, 1000, 72, 600), (2, 1000, 72, 1000), (2, 1001, 5, 333),
                                      (1, 40000, 64, 24000), (8, 4096, 4096 // 64, 2458))):
        _check_scatter(lib, B, S, H, k, dtype, index_dtype, seed=i, mode=mode)


def test_topk_then_in_place_scatter_lands_on_padding_only(lib):
    """The routed block's round trip with padding: fill slots point at padding rows, so the delta
    scattered there never touches a real token."""
    from tokenskip.plugins import kernels

    rng = np.random.default_rng(3)
    B, S, H, keep = 4, 3000, 16, (3, 5, 2)
    valid = make_valid("left", B, S, rng)
    hidden = torch.randn(B, S, H, device="cuda")
    kept, index = kernels.topk_gather(lib, hidden, _gpu(make_scores("random", B, S, rng)), keep, _gpu(valid))
    out = hidden.clone()
    kernels.scatter_tokens_inplace(lib, out, torch.ones_like(kept), index)
    changed = (out != hidden).any(-1).cpu().numpy()  # [B,S]
    assert changed.sum(1).tolist() == [R.keep_count(S, *keep)] * B  # every slot, real or fill, got its delta
    assert (changed & valid).sum(1).tolist() == [R.keep_count(int(n), *keep) for n in valid.sum(1)]
