"""Which attention kernel a block runs, and the kernels themselves (called only by run_block).

The reference is SDPA with the explicit boolean mask [B,1,q,T] of `block.attention_allowed`
(causal by original position, padding, skipped keys). It is what torch.export traces and what
every fast path is tested against, but on a GPU an explicit mask rules out the flash kernels and
makes SDPA read a q x T mask. Two fast paths avoid it:

- **causal**: when the caller knows the query rows and the keys are the same tokens in ascending
  position order, with no padding, no past and no masked keys (dense blocks and kv_policy=skip
  routed blocks of an unpadded prefill), "key position <= query position" is exactly "key index
  <= query index", so SDPA(is_causal=True) with no mask computes the same thing and may take the
  flash / memory-efficient kernels. The caller passes the fact as a flag (no host sync here).
- **flex**: otherwise (kv_policy=dense: kept queries over every key; padded batches), PyTorch's
  FlexAttention with a block mask built from the positions (`position_block_mask`): the
  per-element rule is a mask_mod evaluated inside the kernel, blocks that no query of a tile may
  see are skipped, and the q x T mask is never built. Used on CUDA for prefill-sized calls
  (q >= one block of 128 rows) in inference (no grad); a decode step's [B,1,T] mask is tiny, so
  decode keeps the reference (it is also what the static-shape CUDA-graph decode needs).

Modes (`use_kernels` / `set_kernels`): "auto" (the rules above), "reference" (always the explicit
mask), "flex" (FlexAttention for every call, also on the CPU where it runs unfused: for tests).
Export is detected (torch.export, TorchScript tracing, ONNX export) and always gets the reference's
math, traced as `graph_attend`: the same attention written the way ONNX Runtime runs it fastest
(no expanded keys, a finite additive mask, no NaN guard; docs/export.md "Attention in the graph").
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("auto", "reference", "flex")
REFERENCE, CAUSAL, FLEX = "reference", "causal", "flex"
FLEX_BLOCK = 128  # FlexAttention's default sparse block size (rows and keys)

_mode = os.environ.get("TOKENSKIP_ATTENTION", "auto")
if _mode not in MODES:  # pragma: no cover - a typo in the environment
    raise ValueError(f"TOKENSKIP_ATTENTION={_mode!r}: choose from {', '.join(MODES)}")


def set_kernels(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"attention kernels must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_kernels() -> str:
    return _mode


@contextlib.contextmanager
def use_kernels(mode: str):
    """Run the body with another kernel mode (e.g. "reference" around an export)."""
    saved = _mode
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(saved)


def exporting() -> bool:
    """True while torch.export / TorchScript / the ONNX exporter traces the model."""
    return bool(torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def fast_enabled() -> bool:
    """Whether fast paths may be used at all (callers use it to skip work only they need)."""
    return _mode != "reference" and not exporting()


def choose(*, causal: bool, q_rows: int, device: torch.device, masked_keys: bool) -> str:
    """The kernel for one call. causal: the caller's promise (see the module docstring);
    masked_keys: training's key-removal mask (k_active) is in play (reference only)."""
    if masked_keys or not fast_enabled():
        return REFERENCE
    if _mode == "flex":
        return FLEX
    if causal:
        return CAUSAL
    if device.type == "cuda" and q_rows >= FLEX_BLOCK and not torch.is_grad_enabled() and flex_available():
        return FLEX  # inference only: training keeps the reference it was validated with
    return REFERENCE


@functools.lru_cache(maxsize=None)
def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return True


def expand_kv(x: Tensor, groups: int) -> Tensor:
    """[B,nkv,T,d] -> [B,nkv*groups,T,d] (GQA), with ops every exporter understands."""
    if groups == 1:
        return x
    b, n, t, d = x.shape
    return x[:, :, None].expand(b, n, groups, t, d).reshape(b, n * groups, t, d)


def attend(kernel: str, q: Tensor, key: Tensor, value: Tensor, *, scaling: float, allowed: Tensor | None = None,
           q_pos: Tensor | None = None, k_pos: Tensor | None = None, k_valid: Tensor | None = None,
           rows_are_keys: bool = False) -> Tensor:
    """q [B,nh,q,d], key/value [B,nkv,T,d] (not expanded) -> [B,nh,q,d].

    reference: needs `allowed` [B,q,T]; flex: needs q_pos [B,q], k_pos/k_valid [B,T].
    rows_are_keys: the last q keys are the query rows themselves, in ascending position order,
    after a past (graph_attend then skips the key blocks no query of a chunk may see)."""
    groups = q.shape[1] // key.shape[1]
    if kernel == REFERENCE and exporting():
        return graph_attend(q, key, value, allowed, scaling, rows_are_keys=rows_are_keys)
    if kernel == REFERENCE:
        keys, values = expand_kv(key, groups), expand_kv(value, groups)  # [B,nh,T,d]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed.unsqueeze(1), scale=scaling)
    if kernel == CAUSAL:
        keys, values = expand_kv(key, groups), expand_kv(value, groups)
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scaling)
    if kernel == FLEX:
        return flex_attend(q, key, value, q_pos, k_pos, k_valid, scaling)
    raise ValueError(f"unknown attention kernel {kernel!r}")


# query chunks of a causal graph_attend call (1: one q x T rectangle). 1 by default: 4 make ONNX
# Runtime prefill ~1.4x faster at 1-2k tokens but quadruple the trace time and double the
# TensorRT-RTX build (the pipeline went over its 20 minutes); `tokenskip export --attention-chunks 4`
GRAPH_CAUSAL_CHUNKS = 1


@contextlib.contextmanager
def graph_chunks(n: int):
    """Trace the body with `n` causal chunks (the export's decode branch uses 1: at S = 1 chunks
    only add nodes, and their key slices stop ONNX Runtime from fusing the cache's transposes)."""
    global GRAPH_CAUSAL_CHUNKS
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"graph_chunks: n must be an integer >= 1, got {n!r}")
    saved, GRAPH_CAUSAL_CHUNKS = GRAPH_CAUSAL_CHUNKS, n
    try:
        yield
    finally:
        GRAPH_CAUSAL_CHUNKS = saved


# the export's decode branch attends to the cache and the new rows apart (graph_attend_past): set by
# graph_split_past() while tracing it, never for prefill (see graph_attend_past for why)
GRAPH_SPLIT_PAST = False


@contextlib.contextmanager
def graph_split_past():
    """Trace the body with the past and the new rows attended apart (graph_attend_past): the export
    traces its decode branch (S = 1) under it."""
    global GRAPH_SPLIT_PAST
    saved, GRAPH_SPLIT_PAST = GRAPH_SPLIT_PAST, True
    try:
        yield
    finally:
        GRAPH_SPLIT_PAST = saved


def splits_past(kernel: str) -> bool:
    """Whether run_block hands a cached call's past and new rows to graph_attend_past unjoined."""
    return GRAPH_SPLIT_PAST and kernel == REFERENCE and exporting()


def graph_attend_past(q: Tensor, past_key: Tensor, past_value: Tensor, key: Tensor, value: Tensor,
                      allowed: Tensor, scaling: float) -> Tensor:
    """graph_attend over the keys past + new without joining them: q [B,nh,q,d], past_key/value
    [B,nkv,Tp,d] (the cache), key/value [B,nkv,q',d] (this call's rows), allowed [B,q,Tp+q'] ->
    [B,nh,q,d].

    Joining the cache to a decode step's one new row copies the whole cache, keys and values, in
    every block at every step (ONNX Runtime CPU, smollm2-135m at 2k tokens of context: the Concat
    took 8 of 58 ms a step). Here the scores of the two parts are computed apart and joined (q x T
    per head: 1 x T at decode, 1/(2d/g) of the cache's size), one softmax runs over both, and the
    output is the sum of the two parts' weighted values. Only for small q (the decode branch): with
    q rows the joined scores and their two slices are q*nh x T, which outgrows the cache at q >~ 40
    (a chunked prefill keeps graph_attend). Same math as graph_attend up to float order."""
    bsz, nh, nq, d = q.shape
    nkv, t_past = past_key.shape[1], past_key.shape[2]
    groups = nh // nkv
    qg = (q * scaling).reshape(bsz, nkv, groups * nq, d)  # [B,nkv,g*q,d]
    scores = torch.cat([torch.matmul(qg, past_key.transpose(2, 3)),  # [B,nkv,g*q,Tp]
                        torch.matmul(qg, key.transpose(2, 3))], dim=-1)  # [B,nkv,g*q,T]
    nkeys = scores.shape[-1]
    p = torch.softmax(scores.view(bsz, nkv, groups, nq, nkeys) + _graph_bias(allowed, scores), dim=-1)
    p = p.view(bsz, nkv, groups * nq, nkeys)  # [B,nkv,g*q,T]
    out = torch.matmul(p[..., :t_past], past_value) + torch.matmul(p[..., t_past:], value)  # [B,nkv,g*q,d]
    return out.view(bsz, nh, nq, d)


def graph_attend(q: Tensor, key: Tensor, value: Tensor, allowed: Tensor, scaling: float,
                 rows_are_keys: bool = False) -> Tensor:
    """The reference's math as the exported graph runs it: q [B,nh,q,d], key/value [B,nkv,T,d]
    (not expanded), allowed [B,q,T] -> [B,nh,q,d].

    rows_are_keys (the caller's promise: the last q keys are the query rows, ascending, after a
    past of T - q keys): the rows are split into GRAPH_CAUSAL_CHUNKS chunks, and chunk [a, b)
    attends only to the keys before past + b, the rest of its rectangle being masked anyway. An
    exported graph has no causal kernel, so this is how it skips the upper triangle: 4 chunks
    compute 5/8 of the q x T scores (the mask decides within a chunk, as before). Bounds are
    floor(q c / n), so at q = 1 the first chunks are empty and the last is the whole call (exports
    trace their decode branch with one chunk: attention.graph_chunks). Cost: torch.export reasons
    about the chunks' symbolic bounds, ~3 s more per 4 blocks (smollm2-135m dense: 10 -> 40 s).

    SDPA with a boolean mask exports (torch.onnx) as Where(mask, 0, -inf) + Add + Softmax +
    Where(IsNaN(p), 0, p) over [B,nh,q,T], and GQA's expanded keys/values as an Expand that copies
    the whole cache per block. On ONNX Runtime CPU, smollm2-135m at S = 2048, those elementwise ops
    took 5.2 s of an 8.1 s dense prefill and the Expand 15 ms of a 120 ms decode step (measured
    with the ORT profiler, docs/export.md "Attention in the graph"): the dense baseline was far from
    the fastest dense path, and routed speed-ups read above their FLOP ideal. Here:
    - the query heads sharing a KV head are one batch of rows ([B,nkv,g*q,d]), so keys and values
      are read where they are, never expanded (head h = kv*g + j, as HF's repeat_kv);
    - the mask is an additive bias [B,1,1,q,T] computed once per block for every head, finite
      (half the dtype's lowest value): a masked key's weight underflows to exactly 0 in every row
      that has an allowed key, and a row with none (a padding query) gets finite weights instead
      of NaN, so no NaN guard is needed (run_block then sets padding rows' output to 0);
    - the scale multiplies q ([q,d]), not the scores ([q,T]).
    Same math as the reference up to the order of float operations (tests/test_export_*)."""
    if rows_are_keys and GRAPH_CAUSAL_CHUNKS > 1:
        nq, past, n = q.shape[2], key.shape[2] - q.shape[2], GRAPH_CAUSAL_CHUNKS
        outs = []
        for c in range(n - 1):
            a, b = nq * c // n, nq * (c + 1) // n
            outs.append(_graph_rectangle(q[:, :, a:b], key[:, :, :past + b], value[:, :, :past + b],
                                         allowed[:, a:b, :past + b], scaling))  # [B,nh,b-a,d]
        a = nq * (n - 1) // n  # the last chunk reads every key, unsliced (a decode step is all of it)
        outs.append(_graph_rectangle(q[:, :, a:], key, value, allowed[:, a:], scaling))
        return torch.cat(outs, dim=2)  # [B,nh,q,d]
    return _graph_rectangle(q, key, value, allowed, scaling)


def _graph_bias(allowed: Tensor, scores: Tensor) -> Tensor:
    """allowed [B,q,T] -> the additive mask [B,1,1,q,T] in the scores' dtype: 0 where allowed, half
    the dtype's lowest value elsewhere (finite: see graph_attend)."""
    zero = torch.scalar_tensor(0.0, dtype=scores.dtype, device=scores.device)
    low = torch.scalar_tensor(torch.finfo(scores.dtype).min / 2, dtype=scores.dtype, device=scores.device)
    return torch.where(allowed, zero, low)[:, None, None]


def _graph_rectangle(q: Tensor, key: Tensor, value: Tensor, allowed: Tensor, scaling: float) -> Tensor:
    """graph_attend over the whole q x T rectangle."""
    bsz, nh, nq, d = q.shape
    nkv, nkeys = key.shape[1], key.shape[2]
    groups = nh // nkv
    qg = (q * scaling).reshape(bsz, nkv, groups * nq, d)  # [B,nkv,g*q,d]
    scores = torch.matmul(qg, key.transpose(2, 3)).view(bsz, nkv, groups, nq, nkeys)  # [B,nkv,g,q,T]
    p = torch.softmax(scores + _graph_bias(allowed, scores), dim=-1)
    p = p.view(bsz, nkv, groups * nq, nkeys)  # [B,nkv,g*q,T]
    return torch.matmul(p, value).view(bsz, nh, nq, d)  # [B,nh,q,d]


# ------------------------------------------------------------------------------------ FlexAttention
def _pad_to(x: Tensor, multiple: int, value) -> Tensor:
    """Pad the last dim of [B,n] to a multiple of `multiple` (mask_mod reads in whole blocks)."""
    extra = (-x.shape[-1]) % multiple
    return F.pad(x, (0, extra), value=value) if extra else x


def position_block_mask(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor, block: int = FLEX_BLOCK):
    """BlockMask for "key valid and key position <= query position", built from positions only.

    q_pos [B,q], k_pos/k_valid [B,T]. Per tile of `block` query rows x `block` keys (O(B q T /
    block^2) work, no q x T tensor): a tile is skipped when no valid key in it has a position <=
    the tile's largest query position; it is "full" (no per-element check) when all its keys are
    valid and its largest key position <= its smallest query position; otherwise the mask_mod
    decides per element. Conservative for any order; with ascending positions (gathered tokens
    always are) about half the tiles of a causal rectangle are skipped. Capturable in a CUDA
    graph (no host reads).
    """
    from torch.nn.attention.flex_attention import BlockMask

    bsz, nq = q_pos.shape
    nk = k_pos.shape[1]
    big = 1 << 40  # above any position; exact through F.pad's float fill value
    qp = _pad_to(q_pos, block, 0).view(bsz, -1, block)  # [B,nQ,blk]
    q_max = qp.amax(-1)  # [B,nQ] (padding rows at 0 never raise it)
    q_min = _pad_to(q_pos, block, big).view(bsz, -1, block).amin(-1)  # [B,nQ]
    kv = _pad_to(k_valid, block, False).view(bsz, -1, block)  # [B,nK,blk]
    kp = _pad_to(k_pos, block, 0).view(bsz, -1, block)
    k_min = torch.where(kv, kp, torch.full_like(kp, big)).amin(-1)  # [B,nK] smallest valid key position
    k_max = kp.amax(-1)  # [B,nK]
    k_full = kv.all(-1)  # [B,nK]
    any_pair = k_min[:, None, :] <= q_max[:, :, None]  # [B,nQ,nK]
    full = k_full[:, None, :] & (k_max[:, None, :] <= q_min[:, :, None])  # [B,nQ,nK]
    partial = any_pair & ~full

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:  # [B,nQ,nK] bool -> counts [B,1,nQ], indices
        counts = dense.sum(-1, dtype=torch.int32)  # [B,nQ]
        idx = torch.sort(dense.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
        return counts[:, None], idx[:, None]  # [B,1,nQ], [B,1,nQ,nK]

    qp_pad = _pad_to(q_pos, block, 0)  # [B,q'] the mask_mod reads whole blocks
    kp_pad = _pad_to(k_pos, block, 0)
    kv_pad = _pad_to(k_valid, block, False)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_pad[b, kv_idx] & (kp_pad[b, kv_idx] <= qp_pad[b, q_idx])

    num, idx = ordered(partial)
    fnum, fidx = ordered(full)
    extra = {}
    if _takes_compute_q_blocks() and not torch.is_grad_enabled():
        extra["compute_q_blocks"] = False  # the q-major tables serve only the backward pass
    return BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(nq, nk), **extra)


@functools.lru_cache(maxsize=None)
def _takes_compute_q_blocks() -> bool:
    import inspect

    from torch.nn.attention.flex_attention import BlockMask

    return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """FlexAttention compiled once (fused Triton kernel on CUDA). Shapes that change (new S or k)
    recompile once, then automatic dynamic shapes take over."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attend(q: Tensor, key: Tensor, value: Tensor, q_pos: Tensor, k_pos: Tensor, k_valid: Tensor,
                scaling: float) -> Tensor:
    """FlexAttention with the position block mask; GQA without expanding K/V. A query row with no
    allowed key gets zeros (the reference gives it a finite average; such rows are padding and
    their output is never used)."""
    from torch.nn.attention.flex_attention import flex_attention

    mask = position_block_mask(q_pos, k_pos, k_valid)
    fn = _compiled_flex() if q.is_cuda else flex_attention  # CPU: unfused (tests and dry runs)
    groups = q.shape[1] // key.shape[1]
    return fn(q, key, value, block_mask=mask, scale=scaling, enable_gqa=groups > 1)


def rows_unpadded(attention_mask: Tensor | None, padded: bool | None = None) -> bool:
    """Whether every row of a prefill is fully valid, known as cheaply as possible: the caller's
    flag (`padded`), or no mask at all, or one host read of the mask per forward (never per block).
    Where the mask cannot be read (fast paths off, export, CUDA-graph capture, torch.compile) the
    answer is False: the general path, which is always correct."""
    if not fast_enabled():
        return False
    if padded is not None:
        return not padded
    if attention_mask is None:
        return True
    if torch.compiler.is_compiling() or (attention_mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    return bool(attention_mask.all())
