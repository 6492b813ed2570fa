"""Run one Llama-shaped decoder block on a subset of the sequence's tokens.

This is the only place a decoder block is executed, in every mode: dense, routed with real
gather/scatter, routed by mask emulation (training), prefill and cached decode. We call the HF
layer's own modules (norms, projections, MLP; tokenskip.families says where each family keeps
them) but drive attention ourselves, because routing needs
what HF's layer does not offer: queries and keys from different token sets (kv_policy=dense),
per-layer ragged KV caches, and the attention-score window for the learned router.

Shapes: B batch, q query rows, T keys, H hidden, nh/nkv query/KV heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention
from .attention import expand_kv
from .families import Family, LayerParts
from .precision import fp32_region


@dataclass
class LayerKV:
    """Keys/values a block attended over, post-RoPE: what a KV cache stores for that block."""

    key: Tensor  # [B,nkv,T,d]
    value: Tensor  # [B,nkv,T,d]
    pos: Tensor  # [B,T] int64 original positions
    valid: Tensor  # [B,T] bool (False: padding)

    def append(self, other: "LayerKV") -> "LayerKV":
        """A new LayerKV with `other`'s columns after these (a copy; KVBuffer writes in place)."""
        return LayerKV(torch.cat([self.key, other.key], 2), torch.cat([self.value, other.value], 2),
                       torch.cat([self.pos, other.pos], 1), torch.cat([self.valid, other.valid], 1))

    @property
    def length(self) -> int:
        return self.key.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes this cache entry holds (a preallocated tokenskip.kv_buffer.KVBuffer: its capacity)."""
        return sum(t.nbytes for t in (self.key, self.value, self.pos, self.valid))


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B,n,q,d], cos/sin [B,q,d] for the tokens' original positions."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def attention_allowed(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor, k_active: Tensor | None = None,
                      guard_empty_rows: bool = True) -> Tensor:
    """Causal-by-original-position mask [B,q,T] (True = attend), intersected with padding/skipping.

    A row with no allowed key (a padding query) would give NaN in softmax; with guard_empty_rows
    it attends to every key instead. Its output is garbage by construction but finite, and is
    never used. The exported graph's attention (attention.graph_attend) masks with a finite bias,
    which keeps such rows finite by itself, so the export leaves the guard out: in the graph it is
    an any() over [B,q,T] (a Cast to int64 and a ReduceMax per block, ~0.2 s of a 2k-token
    prefill on ONNX Runtime CPU)."""
    allowed = (k_pos.unsqueeze(1) <= q_pos.unsqueeze(2)) & k_valid.unsqueeze(1)  # [B,q,T]
    if k_active is not None:
        allowed = allowed & k_active.unsqueeze(1)
    return allowed | ~allowed.any(dim=-1, keepdim=True) if guard_empty_rows else allowed


def window_attention_scores(q: Tensor, k: Tensor, allowed: Tensor, row_ok: Tensor, window: int,
                            scaling: float, heads: str = "mean") -> tuple[Tensor, Tensor]:
    """Attention each key received from the last `window` usable query rows, without a q x T matrix.

    q [B,nh,q,d] (post-RoPE), k [B,nkv,T,d] (GQA: not expanded; nh = nkv x groups), allowed [B,q,T],
    row_ok [B,q] (rows that are real, kept tokens). Returns (score [B,T], seen [B,T]): the mean
    (heads="mean") or the max (heads="max": the few retrieval heads are not averaged away) over
    heads of the attention probability, averaged over the window queries that may see the key;
    `seen` is False for keys no window query can see (the caller keeps their previous score).
    Cost: window x T per head. The groups' queries share their KV head's matmul (query heads
    kv*groups .. kv*groups+groups-1 read KV head kv, as HF's repeat_kv), so the keys are never
    copied to nh heads: a decode step would otherwise copy the whole cache once per block. As in
    attention.graph_attend, the mask is a finite bias made once for all heads ([B,w,T], not
    [B,nh,w,T]) and the scale multiplies q: in ONNX Runtime the two masked fills over
    [B,nh,w,T] (-inf, then the NaN guard) were 29 of the four-feature router's 85 ms at S = 1024.
    A masked key's probability underflows to exactly 0 wherever the row has an allowed key; a row
    with none (padding, or not a usable window row) gets finite weights and weight 0 in the sum
    over rows, which is a [1,w] x [w,T] product per head.
    """
    nrows = q.shape[2]
    w = min(window, nrows)
    ar = torch.arange(nrows, device=q.device).expand_as(row_ok)  # [B,q]
    rank_key = torch.where(row_ok, ar, torch.full_like(ar, -1))
    rows = torch.topk(rank_key, w, dim=-1).indices  # [B,w] the last w usable rows
    rows_ok = row_ok.gather(1, rows)  # [B,w]
    qw = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # [B,nh,w,d]
    # the window rows of allowed, whole rows copied (a Gather over [B*q,T]; gather() along dim 1
    # would need a [B,w,T] int64 index: an Expand and an element-wise GatherElements in the graph)
    flat_rows = (rows + torch.arange(rows.shape[0], device=rows.device)[:, None] * nrows).reshape(-1)  # [B*w]
    mask = allowed.reshape(-1, allowed.shape[2]).index_select(0, flat_rows).view(rows.shape[0], w, -1)  # [B,w,T]
    mask = mask & rows_ok.unsqueeze(-1)
    bsz, nh, _, d = qw.shape
    nkv, nkeys = k.shape[1], k.shape[2]
    with fp32_region(q):  # the score is a router feature: fp32 even when the LLM runs in bf16/fp16
        qg = (qw.float() * scaling).reshape(bsz, nkv, -1, d)  # [B,nkv,groups*w,d]
        logits = torch.matmul(qg, k.float().transpose(2, 3)).reshape(bsz, nh, -1, nkeys)  # [B,nh,w,T]
        low = torch.finfo(torch.float32).min / 2
        bias = torch.where(mask, 0.0, low)  # [B,w,T] finite: a row with no allowed key stays finite
        probs = torch.softmax(logits + bias.unsqueeze(1), dim=-1)  # [B,nh,w,T]
        row_weight = mask.any(dim=-1).float()  # [B,w] rows with no allowed key add nothing
        per_head = torch.matmul(row_weight[:, None, None, :], probs).squeeze(2)  # [B,nh,T]
        total = per_head.amax(dim=1) if heads == "max" else per_head.mean(dim=1)  # [B,T]
        count = mask.sum(dim=1)  # [B,T] window queries that see each key
        score = total / count.clamp(min=1).to(total.dtype)
    return score, count > 0


@dataclass
class BlockResult:
    out: Tensor  # [B,q,H] the block's output for the query rows
    kv: LayerKV  # what the rows attended over (this call's keys, past included)
    new_kv: LayerKV  # this call's keys only (kv without the past): the rows a cache appends
    attn_score: Tensor | None = None  # [B,T] window attention score per key
    attn_seen: Tensor | None = None  # [B,T] bool


@dataclass(frozen=True)
class KeyRows:
    """Rows that give a block its keys/values when they are not the query rows (kv_policy=dense:
    the block input of every token, skipped ones included)."""

    x: Tensor  # [B,T,H] block input
    cos_sin: tuple[Tensor, Tensor]  # [B,T,d] each, at the rows' original positions
    pos: Tensor  # [B,T] int64 original positions
    valid: Tensor  # [B,T] bool


@dataclass(frozen=True)
class BlockArgs:
    """How one block call attends, beyond its query rows (run_block's docstring says what each does).
    The default is a plain dense block: the rows are their own keys, no cache, no masks."""

    keys: KeyRows | None = None  # None: keys/values from the query rows themselves
    past: LayerKV | None = None  # a cache prepended to the keys
    k_active: Tensor | None = None  # [B,T] bool keys removed by mask (training, kv_policy=skip)
    k_soft: Tensor | None = None  # [B,T] soft key weights: straight-through gradient (training)
    q_active: Tensor | None = None  # [B,q] bool rows that are real kept tokens (score window)
    score_window: int = 0  # >0: return the window attention score per key
    score_heads: str = "mean"  # how the score window reduces over heads: "mean" or "max"
    causal: bool = False  # the caller's promise that SDPA(is_causal=True) may run
    x_norm: Tensor | None = None  # [B,q,H] the input norm of x, when the caller has it (tokenskip.fused)


DENSE = BlockArgs()


def project_kv(parts: LayerParts, src: Tensor, cos_sin: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Keys (per-head normed if the family has k_norm, then RoPE) and values [B,nkv,T,d] of the
    normed block inputs src [B,T,H]: what a cache stores for these rows."""
    bsz, nkv_tok, _ = src.shape
    head_dim = parts.attn.head_dim
    k = parts.k_proj(src).view(bsz, nkv_tok, -1, head_dim).transpose(1, 2)  # [B,nkv,T,d]
    v = parts.v_proj(src).view(bsz, nkv_tok, -1, head_dim).transpose(1, 2)  # [B,nkv,T,d]
    if parts.k_norm is not None:  # Qwen3-style per-head norms
        k = parts.k_norm(k)
    return apply_rope(k, *cos_sin), v


def run_block(family: Family, layer, x: Tensor, cos_sin: tuple[Tensor, Tensor], q_pos: Tensor, q_valid: Tensor,
              args: BlockArgs = DENSE) -> BlockResult:
    """One decoder block (`layer`, of model family `family`) for the query rows x [B,q,H] at
    positions q_pos [B,q], cos_sin [B,q,d] each, q_valid [B,q].

    Keys/values come from `args.keys` (the block input of other tokens: kv_policy=dense) or, by
    default, from x itself; `past` (a cache) is prepended. `k_active` [B,T] removes keys by mask
    (training emulation of kv_policy=skip); `q_active` [B,q] says which rows are real kept tokens
    (for the score window). RoPE uses each token's original position. `k_soft` [B,T] (training,
    with k_active): soft key weights in (0,1] whose gradient reaches the router through a
    straight-through path over the key mask: the output is the hard-masked attention's, the
    gradient that of attention with log(k_soft) added to every key's logit, so a skipped key's
    value as a key is seen (a hard mask gives it no gradient at all).

    causal=True is the caller's promise that the rows are their own keys, in ascending position
    order, with no padding (q_valid all True) and no past: then attention may run as
    SDPA(is_causal=True) (tokenskip.attention picks the kernel; the explicit-mask reference is
    used whenever the promise cannot apply or while exporting). x_norm: the input norm of x when
    the caller already has it (tokenskip.fused computes it together with the gather).
    """
    parts = family.layer_parts(layer)
    attn = parts.attn
    past, k_active = args.past, args.k_active
    bsz, nq, _ = x.shape
    residual = x
    xn = parts.input_norm(x) if args.x_norm is None else args.x_norm  # [B,q,H]
    q = parts.q_proj(xn).view(bsz, nq, -1, attn.head_dim).transpose(1, 2)  # [B,nh,q,d]
    if parts.q_norm is not None:  # Qwen3-style per-head norms
        q = parts.q_norm(q)
    q = apply_rope(q, *cos_sin)
    if args.keys is None:
        k, v = project_kv(parts, xn, cos_sin)  # [B,nkv,q,d]
        kv_pos, kv_valid = q_pos, q_valid
    else:
        rows = args.keys
        k, v = project_kv(parts, parts.input_norm(rows.x), rows.cos_sin)  # [B,nkv,T,d]
        kv_pos, kv_valid = rows.pos, rows.valid
    kv = new_kv = LayerKV(k, v, kv_pos, kv_valid)
    if past is not None:
        kv = past.append(new_kv)
        if k_active is not None:
            k_active = torch.cat([torch.ones_like(past.valid), k_active], 1)
    kernel = attention.choose(causal=args.causal and args.keys is None and past is None, q_rows=nq, device=q.device,
                              masked_keys=k_active is not None)
    allowed = None
    if kernel == attention.REFERENCE or args.score_window > 0:
        allowed = attention_allowed(q_pos, kv.pos, kv.valid, k_active,
                                    guard_empty_rows=not attention.exporting())  # [B,q,T]
    if past is not None and attention.splits_past(kernel):  # the export's decode branch: no cache copy
        o = attention.graph_attend_past(q, past.key, past.value, new_kv.key, new_kv.value, allowed,
                                        attn.scaling)  # [B,nh,q,d]
    else:
        o = attention.attend(kernel, q, kv.key, kv.value, scaling=attn.scaling, allowed=allowed, q_pos=q_pos,
                             k_pos=kv.pos, k_valid=kv.valid,
                             rows_are_keys=args.keys is None and k_active is None)  # [B,nh,q,d]
    # a padding query's output is garbage that no valid row reads; make it 0 on every kernel, so
    # that the exported graph (causal chunks: it sees fewer keys) and PyTorch agree on every row
    o = o.masked_fill(~q_valid[:, None, :, None], 0.0)
    if args.k_soft is not None:  # straight-through over the key mask (training; the reference kernel ran)
        groups = q.shape[1] // k.shape[1]
        keys, values = expand_kv(kv.key, groups), expand_kv(kv.value, groups)  # [B,nh,T,d]
        reach = attention_allowed(q_pos, kv.pos, kv.valid)  # [B,q,T] without the key mask
        bias = torch.log(args.k_soft.clamp(min=1e-6)).to(q.dtype).unsqueeze(1).expand(-1, nq, -1)  # [B,q,T]
        bias = bias.masked_fill(~reach, float("-inf")).unsqueeze(1)  # [B,1,q,T]
        o_soft = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=attn.scaling)
        o = o + (o_soft - o_soft.detach())
    o = parts.o_proj(o.transpose(1, 2).reshape(bsz, nq, -1))  # [B,q,H]
    h = residual + o
    out = h + parts.mlp(parts.post_attn_norm(h))  # [B,q,H]
    result = BlockResult(out=out, kv=kv, new_kv=new_kv)
    if args.score_window > 0:
        row_ok = q_valid if args.q_active is None else (q_valid & args.q_active)
        result.attn_score, result.attn_seen = window_attention_scores(q, kv.key, allowed, row_ok, args.score_window,
                                                                      attn.scaling, args.score_heads)
    return result
