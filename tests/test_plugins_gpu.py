"""GPU tests of the plugin kernels' C entry points against the numpy references (docs/ops.md).

Every (dtype, index dtype) entry point on: random scores, k = 1, k = S, heavy ties, +inf/-inf and
-0.0/+0.0, odd hidden sizes and unaligned rows (scalar copy paths), and S = 40000. Skipped, with
the reason, where there is no CUDA GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokenskip import ops_reference as R  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPES = ["float32", "float16", "bfloat16"]
INDEX = ["int32", "int64"]


@pytest.fixture(scope="module")
def lib():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False")
    from tokenskip.plugins import build_library

    major, minor = torch.cuda.get_device_capability()
    return build_library(arch=f"{major}{minor}")


def _scores(kind: str, B: int, S: int, rng) -> np.ndarray:
    """[B,S] float32 scores of a given flavour."""
    if kind == "random":
        return rng.standard_normal((B, S)).astype(np.float32)
    if kind == "ties":  # few distinct values: the tie rule decides most of the selection
        return rng.integers(0, 3, (B, S)).astype(np.float32)
    if kind == "inf":  # forced tokens (+inf), padding (-inf), signed zeros
        s = rng.integers(-2, 3, (B, S)).astype(np.float32)
        s[s == 2] = np.inf
        s[s == -2] = -np.inf
        s[:, ::7] = -0.0
        s[:, 0] = np.inf
        s[:, -1] = np.inf
        return s
    raise ValueError(kind)


def _check_topk(lib, B, S, H, k, dtype, index_dtype, kind, seed=0):
    from tokenskip.plugins import kernels

    rng = np.random.default_rng(seed)
    scores = _scores(kind, B, S, rng)                        # [B,S]
    hidden = torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed)).to(getattr(torch, dtype))  # [B,S,H]
    kept, index = kernels.topk_gather(lib, hidden.cuda(), torch.from_numpy(scores).cuda(), k,
                                      getattr(torch, index_dtype))
    torch.cuda.synchronize()
    # reference on float32 copies (bit-exact for fp16/bf16 values); kept is a pure copy
    _, ref_index = R.topk_gather(hidden[:, :, :1].float().numpy(), scores, k, S, 1)
    assert ref_index.shape == (B, k)
    assert index.dtype == getattr(torch, index_dtype)
    np.testing.assert_array_equal(index.cpu().numpy().astype(np.int64), ref_index)
    ref_kept = torch.gather(hidden, 1, torch.from_numpy(ref_index)[:, :, None].expand(B, k, H))
    assert torch.equal(kept.cpu(), ref_kept)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX)
@pytest.mark.parametrize("kind", ["random", "ties", "inf"])
def test_topk_gather_matches_reference(lib, dtype, index_dtype, kind):
    _check_topk(lib, B=3, S=1000, H=72, k=601, dtype=dtype, index_dtype=index_dtype, kind=kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 1001])
def test_topk_gather_edge_k_unaligned_rows(lib, dtype, k):
    # S = 1001: rows are not 16-byte aligned; H = 5: odd row size, scalar copies
    _check_topk(lib, B=2, S=1001, H=5, k=k, dtype=dtype, index_dtype="int64", kind="ties", seed=k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties", "inf"])
def test_topk_gather_long_sequence(lib, dtype, kind):
    _check_topk(lib, B=2, S=40000, H=64, k=R.keep_count(40000, 3, 5, 1), dtype=dtype, index_dtype="int64", kind=kind)


def test_topk_select_all_equal_and_sign_of_zero(lib):
    from tokenskip.plugins import kernels

    scores = torch.zeros(2, 4099)
    scores[0, ::2] = -0.0  # -0.0 == +0.0: a pure tie, lowest positions win
    index = kernels.topk_select(lib, scores.cuda(), 100)
    expected = torch.arange(100).expand(2, 100)
    assert torch.equal(index.cpu(), expected)


def _check_scatter(lib, B, S, H, k, dtype, index_dtype, seed=0, in_place=False):
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
    out = kernels.scatter_tokens(lib, h, delta.cuda(), index.to(getattr(torch, index_dtype)).cuda(),
                                 out=h if in_place else None)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ref)
    if not in_place:
        assert torch.equal(h.cpu(), hidden)  # input untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX)
@pytest.mark.parametrize("k", [1, 600, 1000])
def test_scatter_tokens_matches_reference(lib, dtype, index_dtype, k):
    _check_scatter(lib, B=2, S=1000, H=72, k=k, dtype=dtype, index_dtype=index_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_tokens_odd_hidden_long_and_in_place(lib, dtype):
    _check_scatter(lib, B=2, S=1001, H=5, k=333, dtype=dtype, index_dtype="int64", seed=1)
    _check_scatter(lib, B=1, S=40000, H=64, k=24000, dtype=dtype, index_dtype="int32", seed=2)
    _check_scatter(lib, B=2, S=513, H=64, k=100, dtype=dtype, index_dtype="int64", seed=3, in_place=True)


def test_bad_arguments_return_an_error(lib):
    from tokenskip.plugins import kernels

    scores = torch.zeros(1, 10, device="cuda")
    with pytest.raises(RuntimeError, match="cudaError"):
        kernels.topk_select(lib, scores, 11)  # k > S
    handle = kernels.load(lib)
    for S in (0, 1, 7, 40000):
        for num, den, mk in ((3, 5, 1), (0, 1, 4), (1, 1, 1), (2, 7, 3)):
            assert handle.tokenskip_keep_count(S, num, den, mk) == R.keep_count(S, num, den, mk)
