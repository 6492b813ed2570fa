"""The fast attention paths (tokenskip.attention) against the explicit-mask reference.

CPU: the causal path (SDPA is_causal) runs where run_block is promised unpadded, aligned rows;
FlexAttention runs unfused (mode "flex") with the same block mask the GPU uses. Both must give the
reference's numbers for both kv policies, with and without padding, in prefill and in decode, and
the export must trace the reference. The CUDA tests (compiled FlexAttention, CUDA graphs) skip
here with the reason printed and run in scripts/device_speed.sh.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tokenskip import attention
from tokenskip.block import attention_allowed
from tokenskip.routed import RoutedModel
from tokenskip.routers import LearnedRouter, StaticRouter
from tokenskip.schedule import Schedule

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled FlexAttention / CUDA graphs): "
                                                 "run by scripts/device_speed.sh on the GPU machine")
ATOL = 2e-5  # float32 logits of the tiny model: the kernels sum in different orders


@pytest.fixture(autouse=True)
def one_thread_quiet(one_thread):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


class KernelSpy:
    """Records which kernel every attention call used."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        real = attention.attend

        def spy(kernel, *a, **kw):
            self.calls.append(kernel)
            return real(kernel, *a, **kw)

        monkeypatch.setattr(attention, "attend", spy)

    def take(self) -> set[str]:
        seen, self.calls = set(self.calls), []
        return seen


# ------------------------------------------------------------------------------------ block mask
def tiles(num, idx, nq, nk):
    """BlockMask (counts [B,1,nQ], indices [B,1,nQ,nK]) -> dense [B,nQ,nK] bool."""
    out = torch.zeros(num.shape[0], nq, nk, dtype=torch.bool)
    for b in range(num.shape[0]):
        for i in range(nq):
            out[b, i, idx[b, 0, i, :num[b, 0, i]].long()] = True
    return out


@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_position_block_mask_covers_exactly_the_allowed_pairs(order):
    """Every allowed (query, key) pair lies in a listed tile; a "full" tile holds only allowed pairs."""
    g = torch.Generator().manual_seed(3)
    bsz, seq, nq, blk = 3, 700, 450, attention.FLEX_BLOCK
    valid = torch.ones(bsz, seq, dtype=torch.bool)
    valid[1, :130] = False  # left padding
    valid[2, seq - 200:] = False  # right padding
    k_pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [B,T]
    idx = torch.stack([torch.sort(torch.randperm(seq, generator=g)[:nq]).values for _ in range(bsz)])  # [B,q]
    if order == "shuffled":
        idx = idx[:, torch.randperm(nq, generator=g)]
    q_pos = k_pos.gather(1, idx)
    mask = attention.position_block_mask(q_pos, k_pos, valid)
    n_q, n_k = -(-nq // blk), -(-seq // blk)
    partial = tiles(mask.kv_num_blocks, mask.kv_indices, n_q, n_k)
    full = tiles(mask.full_kv_num_blocks, mask.full_kv_indices, n_q, n_k)
    assert not (partial & full).any()
    allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & valid[:, None, :]  # [B,q,T]
    qb, kb = torch.arange(nq) // blk, torch.arange(seq) // blk
    listed = (partial | full)[:, qb][:, :, kb]  # [B,q,T] the tile of every pair
    assert not (allowed & ~listed).any(), "an allowed pair falls in a skipped tile"
    in_full = full[:, qb][:, :, kb]
    assert not (in_full & ~allowed).any(), "a full tile holds a disallowed pair"
    if order == "ascending":  # the causal shape: about half the tiles are skipped, some are full
        assert partial.sum() + full.sum() < 0.75 * bsz * n_q * n_k and full.any()


def test_block_mask_of_a_plain_causal_square():
    pos = torch.arange(500).expand(1, -1)  # not a whole number of tiles: the last tile row is short
    mask = attention.position_block_mask(pos, pos, torch.ones(1, 500, dtype=torch.bool))
    n = 4
    partial = tiles(mask.kv_num_blocks, mask.kv_indices, n, n)[0]
    full = tiles(mask.full_kv_num_blocks, mask.full_kv_indices, n, n)[0]
    assert torch.equal(partial, torch.eye(n, dtype=torch.bool))  # the diagonal is checked per element
    assert torch.equal(full, torch.ones(n, n, dtype=torch.bool).tril(-1))  # below it, no mask at all


# ---------------------------------------------------------------------------------- kernel level
def random_qkv(bsz=2, nh=4, nkv=2, nq=200, nk=300, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, nh, nq, d, generator=g, dtype=dtype)
    k = torch.randn(bsz, nkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(bsz, nkv, nk, d, generator=g, dtype=dtype)
    return q, k, v


def test_causal_kernel_equals_reference():
    q, k, v = random_qkv(nq=300)
    pos = torch.arange(300).expand(2, -1)
    allowed = attention_allowed(pos, pos, torch.ones(2, 300, dtype=torch.bool))
    ref = attention.attend(attention.REFERENCE, q, k, v, scaling=0.25, allowed=allowed)
    fast = attention.attend(attention.CAUSAL, q, k, v, scaling=0.25)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True])
def test_flex_kernel_equals_reference(padded):
    """kv_policy=dense's rectangle: kept queries over every key, GQA, with left/right padding."""
    q, k, v = random_qkv(seed=1)
    valid = torch.ones(2, 300, dtype=torch.bool)
    if padded:
        valid[0, :41] = False
        valid[1, 250:] = False
    k_pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    q_idx = torch.sort(torch.randperm(300, generator=torch.Generator().manual_seed(2))[:200]).values
    q_pos = k_pos[:, q_idx]
    q_valid = valid[:, q_idx]
    allowed = attention_allowed(q_pos, k_pos, valid)
    ref = attention.attend(attention.REFERENCE, q, k, v, scaling=0.25, allowed=allowed)
    fast = attention.attend(attention.FLEX, q, k, v, scaling=0.25, q_pos=q_pos, k_pos=k_pos, k_valid=valid)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast.transpose(1, 2)[q_valid], ref.transpose(1, 2)[q_valid], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_graph_kernel_equals_reference(dtype):
    """What the export traces (graph_attend: GQA without expanded keys, a finite additive mask, no
    NaN guard) equals the reference on every row with an allowed key, padded rows included, and
    stays finite on the rows with none (left padding: their queries see no valid key)."""
    q, k, v = random_qkv(nh=6, nkv=2, seed=3)
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[0, :41] = False
    k_pos = valid.long().cumsum(-1) - 1  # padding at -1: its queries see no valid key
    q_idx = torch.sort(torch.randperm(300, generator=torch.Generator().manual_seed(4))[:200]).values
    q_pos, q_valid = k_pos[:, q_idx], valid[:, q_idx]
    guarded = attention_allowed(q_pos, k_pos, valid)
    bare = attention_allowed(q_pos, k_pos, valid, guard_empty_rows=False)
    assert (~bare.any(-1)).any() and not (~guarded.any(-1)).any()  # some rows have no allowed key
    ref = attention.attend(attention.REFERENCE, q, k, v, scaling=0.25, allowed=guarded)
    got = attention.graph_attend(q.to(dtype), k.to(dtype), v.to(dtype), bare, 0.25)
    assert got.dtype == dtype and torch.isfinite(got).all()
    rows = bare.any(-1)  # [B,q]
    assert torch.equal(rows, q_valid)
    atol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got.double().transpose(1, 2)[rows], ref.transpose(1, 2)[rows], rtol=0, atol=atol)


@pytest.mark.parametrize("past,nq", [(0, 203), (37, 203), (37, 1), (5, 2), (0, 3)])
def test_graph_kernel_causal_chunks_equal_one_rectangle(past, nq):
    """rows_are_keys: chunk [a, b) of the query rows reads only the keys before past + b; with the
    rows' own keys last and ascending (a prefill, a chunk or a decode step after a past), that is
    exactly the one-rectangle result, down to q = 1 (empty leading chunks) and q < chunks."""
    q, k, v = random_qkv(bsz=2, nh=6, nkv=2, nq=nq, nk=past + nq, seed=5)
    valid = torch.ones(2, past + nq, dtype=torch.bool)
    valid[1, : min(3, past + nq - 1)] = False  # left padding in one row
    k_pos = valid.long().cumsum(-1) - 1
    q_pos = k_pos[:, past:]
    allowed = attention_allowed(q_pos, k_pos, valid, guard_empty_rows=False)
    one = attention.graph_attend(q, k, v, allowed, 0.25, rows_are_keys=True)  # 1 chunk: the default
    with attention.graph_chunks(4):
        chunked = attention.graph_attend(q, k, v, allowed, 0.25, rows_are_keys=True)
    assert chunked.shape == one.shape and torch.isfinite(chunked).all()
    rows = allowed.any(-1)  # padding queries' outputs are never read
    torch.testing.assert_close(chunked.transpose(1, 2)[rows], one.transpose(1, 2)[rows], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("past,nq", [(37, 1), (40, 2), (0, 1), (1, 3)])
def test_graph_kernel_with_past_apart_equals_joined(past, nq, dtype):
    """graph_attend_past (the export's decode branch: cache and new rows attended apart, no Concat of
    the cache) equals graph_attend over the joined keys on every row with an allowed key, with a
    left-padded row, an empty past and a past of one."""
    q, k, v = random_qkv(bsz=2, nh=6, nkv=2, nq=nq, nk=past + nq, seed=6)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    valid = torch.ones(2, past + nq, dtype=torch.bool)
    valid[1, : min(3, past + nq - 1)] = False
    k_pos = valid.long().cumsum(-1) - 1
    allowed = attention_allowed(k_pos[:, past:], k_pos, valid, guard_empty_rows=False)
    joined = attention.graph_attend(q, k, v, allowed, 0.25)
    apart = attention.graph_attend_past(q, k[:, :, :past], v[:, :, :past], k[:, :, past:], v[:, :, past:],
                                        allowed, 0.25)
    assert apart.shape == joined.shape and apart.dtype == dtype and torch.isfinite(apart).all()
    rows = allowed.any(-1)
    atol = 1e-12 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(apart.transpose(1, 2)[rows], joined.transpose(1, 2)[rows], rtol=0, atol=atol)


def test_graph_split_past_only_while_exporting(monkeypatch):
    """The split is a tracing choice of the decode branch: off by default, off outside export,
    restored after the context."""
    assert not attention.splits_past(attention.REFERENCE)
    with attention.graph_split_past():
        assert not attention.splits_past(attention.REFERENCE)  # eager: PyTorch joins the cache as before
        monkeypatch.setattr(attention, "exporting", lambda: True)
        assert attention.splits_past(attention.REFERENCE) and not attention.splits_past(attention.CAUSAL)
    assert not attention.splits_past(attention.REFERENCE)


def test_export_traces_the_graph_kernel(monkeypatch):
    """While exporting, the reference kernel runs as graph_attend (what makes the dense ONNX
    baseline fast: docs/export.md, "Attention in the graph")."""
    calls = []
    monkeypatch.setattr(attention, "exporting", lambda: True)
    monkeypatch.setattr(attention, "graph_attend", lambda *a, **kw: calls.append(a) or a[0])
    q, k, v = random_qkv(nq=3, nk=5)
    allowed = torch.ones(2, 3, 5, dtype=torch.bool)
    assert attention.attend(attention.REFERENCE, q, k, v, scaling=1.0, allowed=allowed) is q and len(calls) == 1


def test_kernel_choice_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.choose(causal=True, q_rows=512, device=cpu, masked_keys=False) == attention.CAUSAL
    assert attention.choose(causal=False, q_rows=512, device=cpu, masked_keys=False) == attention.REFERENCE
    assert attention.choose(causal=False, q_rows=1, device=cuda, masked_keys=False) == attention.REFERENCE  # decode
    assert attention.choose(causal=True, q_rows=512, device=cuda, masked_keys=True) == attention.REFERENCE  # training
    with torch.enable_grad():  # flex is for inference
        assert attention.choose(causal=False, q_rows=512, device=cuda, masked_keys=False) == attention.REFERENCE
    with torch.no_grad():
        assert attention.choose(causal=False, q_rows=512, device=cuda, masked_keys=False) == attention.FLEX
    with attention.use_kernels("reference"):
        assert attention.choose(causal=True, q_rows=512, device=cuda, masked_keys=False) == attention.REFERENCE
        assert not attention.rows_unpadded(None)
    with attention.use_kernels("flex"):
        assert attention.choose(causal=True, q_rows=1, device=cpu, masked_keys=False) == attention.FLEX
    assert attention.rows_unpadded(None) and attention.rows_unpadded(torch.ones(2, 3))
    assert not attention.rows_unpadded(torch.tensor([[0, 1, 1]]))
    assert attention.rows_unpadded(torch.tensor([[0, 1, 1]]), padded=False)  # the caller's word wins
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert attention.choose(causal=True, q_rows=512, device=cuda, masked_keys=False) == attention.REFERENCE
    assert not attention.rows_unpadded(None)
    with pytest.raises(ValueError, match="attention kernels"):
        attention.set_kernels("fast")


# ----------------------------------------------------------------------------------- model level
def batch(vocab: int, padded: bool, seq: int = 36):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (3, seq), generator=g)
    mask = torch.ones(3, seq, dtype=torch.long)
    if padded:
        mask[1, :9] = 0  # left padding, as generation pads
        mask[2, :20] = 0
    return ids, mask


def routed_for(model, kv_policy: str, router) -> RoutedModel:
    n = model.config.num_hidden_layers
    return RoutedModel(model, Schedule((0.0,) + (0.4,) * (n - 2) + (0.0,)), router, kv_policy=kv_policy)


def run_all(routed, ids, mask):
    """Routed prefill (logits, cache, routing) + two single decode steps + a 3-token teacher-forced step."""
    with torch.no_grad():
        out = routed(ids, mask, last_only=True, return_cache=True, trace=True)
        logits, cache = out.logits[:, -1], out.cache
        lengths = mask.sum(-1, keepdim=True)  # [B,1] next positions
        steps = [logits]
        tok = logits.argmax(-1, keepdim=True)
        for i in range(2):
            logits, cache = routed.decode_step(tok, lengths + i, cache)
            steps.append(logits)
            tok = logits.argmax(-1, keepdim=True)
        multi, _ = routed.decode_step(ids[:, :3], lengths + 2 + torch.arange(3, device=ids.device), cache,
                                      all_logits=True)
    index = [t.index for t in out.traces if t.index is not None]
    return torch.stack(steps, 1), multi, cache, index


@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("mode", ["auto", "flex"])
def test_model_paths_equal_reference(tiny_llama, monkeypatch, kv_policy, padded, mode):
    """Prefill logits, the KV cache, routing, single and multi-token decode: fast = reference."""
    model, _ = tiny_llama
    routed = routed_for(model, kv_policy, StaticRouter())
    ids, mask = batch(model.config.vocab_size, padded)
    with attention.use_kernels("reference"):
        ref = run_all(routed, ids, mask)
    spy = KernelSpy(monkeypatch)
    with attention.use_kernels(mode):
        got = run_all(routed, ids, mask)
    used = spy.take()
    if mode == "flex":
        assert used == {attention.FLEX}
    elif padded:  # the CPU's auto: padding rules out the causal kernel; flex is for CUDA
        assert used == {attention.REFERENCE}
    else:  # dense blocks (and kv_policy=skip routed blocks) on the causal kernel; decode on the reference
        assert attention.CAUSAL in used and attention.REFERENCE in used
    for a, b in zip(got[3], ref[3]):
        assert torch.equal(a, b)  # the same tokens kept in every block
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=ATOL)
    for kv_got, kv_ref in zip(got[2], ref[2]):
        assert torch.equal(kv_got.valid, kv_ref.valid) and torch.equal(kv_got.pos, kv_ref.pos)
        v = kv_ref.valid[:, None, :, None]  # padding columns hold garbage by design
        torch.testing.assert_close(kv_got.key * v, kv_ref.key * v, rtol=0, atol=ATOL)


def test_causal_path_taken_and_exact_in_float64(tiny_llama, monkeypatch):
    """Unpadded kv_policy=skip: every prefill block (dense and routed) on the causal kernel; equal
    to the reference to float64 rounding."""
    model, _ = tiny_llama
    m64 = type(model)(model.config).double().eval()
    m64.load_state_dict(model.state_dict())
    routed = routed_for(m64, "skip", StaticRouter())
    ids, mask = batch(model.config.vocab_size, False)
    spy = KernelSpy(monkeypatch)
    with torch.no_grad():
        fast = routed(ids, mask).logits
        assert spy.take() == {attention.CAUSAL}
        with attention.use_kernels("reference"):
            ref = routed(ids, mask).logits
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_learned_router_window_unchanged(tiny_llama, kv_policy):
    """The attention-score window still sees the reference mask: same routing, same logits."""
    model, _ = tiny_llama
    torch.manual_seed(0)
    router = LearnedRouter()
    for p in router.parameters():
        torch.nn.init.normal_(p, std=1.0)
    routed = routed_for(model, kv_policy, router)
    for padded in (False, True):
        ids, mask = batch(model.config.vocab_size, padded)
        with attention.use_kernels("reference"):
            ref = run_all(routed, ids, mask)
        for mode in ("auto", "flex"):
            with attention.use_kernels(mode):
                got = run_all(routed, ids, mask)
            for a, b in zip(got[3], ref[3]):
                assert torch.equal(a, b)
            torch.testing.assert_close(got[0], ref[0], rtol=0, atol=ATOL)


def test_export_traces_the_reference(tiny_llama, monkeypatch):
    """torch.export of the exported graph's wrapper (the exporter's entry point) records only
    reference attention: no is_causal SDPA, no FlexAttention in the graph, whatever the kernel mode."""
    wrappers = pytest.importorskip("tokenskip.export.wrappers")
    exporter = pytest.importorskip("tokenskip.export.exporter")
    model, _ = tiny_llama
    routed = routed_for(model, "skip", StaticRouter()).eval()
    spy = KernelSpy(monkeypatch)
    with attention.use_kernels("flex"), torch.no_grad():
        ep = torch.export.export(wrappers.StepGraph(routed), exporter.example_inputs(routed))
    assert spy.take() == {attention.REFERENCE}
    code = ep.graph_module.code
    assert "flex_attention" not in code and "is_causal = True" not in code
    assert "topk_gather" in code and "scatter_tokens" in code  # the custom ops, as before


# ------------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_cuda_fast_paths_equal_reference(tiny_llama, monkeypatch, kv_policy):
    """On the GPU: compiled FlexAttention (padded batch, kv_policy=dense) and the causal kernel,
    float32, against the explicit-mask reference."""
    model, _ = tiny_llama
    gpu = type(model)(model.config).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    routed = routed_for(gpu, kv_policy, StaticRouter())
    spy = KernelSpy(monkeypatch)
    for padded in (False, True):
        ids, mask = (t.cuda() for t in batch(model.config.vocab_size, padded, seq=300))
        with attention.use_kernels("reference"):
            ref = run_all(routed, ids, mask)
        spy.take()
        got = run_all(routed, ids, mask)
        used = spy.take()
        assert attention.FLEX in used if (padded or kv_policy == "dense") else attention.CAUSAL in used
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------- fused helpers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_helpers_equal_the_ops_they_replace(tiny_llama, dtype):
    """rms_gather = gather + HF's LlamaRMSNorm; scatter_delta = ops.scatter_tokens, in place."""
    from tokenskip import fused, ops

    model, _ = tiny_llama
    norm = type(model.model.layers[0].input_layernorm)(64, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 30, 64, generator=g).to(dtype)
    index = torch.sort(torch.randperm(30, generator=g)[:17]).values.expand(2, -1).contiguous()
    kept, normed = fused.rms_gather(h, index, norm.weight, norm.variance_epsilon)
    assert torch.equal(kept, ops.gather_rows(h, index)) and torch.equal(normed, norm(kept))
    out = torch.randn(2, 17, 64, generator=g).to(dtype)
    ref = ops.scatter_tokens(h, out - kept, index)
    ptr = h.data_ptr()
    got = fused.scatter_delta_(h, out, kept, index)
    assert got.data_ptr() == ptr and torch.equal(got, ref)


def test_fused_path_wiring(tiny_llama, monkeypatch):
    """With fusion on (compiled on CUDA; here the same functions uncompiled), the routed model
    hands the fused norm to run_block and gives the reference's logits, both kv policies."""
    from tokenskip import fused

    model, _ = tiny_llama
    calls = []

    def plain(name):
        fn = {"scatter": fused.scatter_delta, "gather": fused.rms_gather}[name]
        return lambda *a: calls.append(name) or fn(*a)

    monkeypatch.setattr(fused, "_compiled", plain)
    monkeypatch.setattr(fused, "enabled", lambda t: bool(fused._override))  # as if on CUDA
    for kv_policy in ("skip", "dense"):
        routed = routed_for(model, kv_policy, StaticRouter())
        ids, mask = batch(model.config.vocab_size, False)
        with torch.no_grad():
            with fused.use_fused(False):
                ref = routed(ids, mask).logits
            with fused.use_fused(True):
                got = routed(ids, mask).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert calls.count("gather") == calls.count("scatter") == 2 * 2  # two routed blocks, two policies
    real = fused.rms_gather  # the block really uses the norm it is handed: a wrong one changes the logits
    monkeypatch.setattr(fused, "rms_gather", lambda *a: (lambda kept, normed: (kept, 2 * normed))(*real(*a)))
    with torch.no_grad(), fused.use_fused(True):
        wrong = routed(ids, mask).logits
    assert (wrong - ref).abs().max() > 1e-3


@needs_cuda
def test_cuda_fused_equals_unfused(tiny_llama):
    """The torch.compile'd gather+norm and delta+scatter (TOKENSKIP_FUSED) against the plain code."""
    from tokenskip import fused

    model, _ = tiny_llama
    gpu = type(model)(model.config).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    for kv_policy in ("skip", "dense"):
        routed = routed_for(gpu, kv_policy, StaticRouter())
        ids, mask = (t.cuda() for t in batch(model.config.vocab_size, False, seq=300))
        with torch.no_grad():
            with fused.use_fused(False):
                ref = routed(ids, mask).logits
            with fused.use_fused(True):
                got = routed(ids, mask).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
