"""The routed model: a frozen HF causal LM whose blocks run on router-chosen token subsets.

method.md section 1, for real: per routed block, score tokens, keep k_l of them (forced tokens
included), gather them in original order, run the whole block on that subsequence only (original
positions for RoPE, causal + padding mask over the kept tokens), and scatter the block's delta
back. Skipped tokens pass through unchanged.

Two execution modes share every line that decides *which* tokens run:
- "gather": real gather -> block on k rows -> scatter (inference, export, evaluation);
- "mask": the block runs on all rows, skipped keys are masked out and the update is multiplied
  by the hard keep mask (training: gradients reach the router through a straight-through
  estimator on sigmoid scores). Both give the same numbers for the kept tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import attention, fused, ops, placement
from .block import BlockArgs, KeyRows, LayerKV, run_block
from .families import family_of
from .routers import RouteContext, Router
from .schedule import MIN_KEEP, Schedule
from .selection import (block_keep_count, block_keep_counts, default_positions, forced_tokens,  # noqa: F401
                        keep_mask, routing_scores, ste_surrogate, tail_tokens)  # (re-exported: one definition)

KV_POLICIES = ("skip", "dense")
DEFAULT_WINDOW = 64  # query rows used for the attention-score feature (see docs/design.md)


@dataclass
class LayerTrace:
    """What routing did in one block (for tests, training losses and validation)."""

    k: int  # rows that ran through the block
    index: Tensor | None = None  # [B,k] kept positions (gather mode)
    keep_mask: Tensor | None = None  # [B,S] bool hard keep mask
    logits: Tensor | None = None  # [B,S] raw router scores (before forcing)
    forced: Tensor | None = None  # [B,S] bool tokens kept whatever the score


@dataclass
class RoutedOutput:
    logits: Tensor | None  # [B,S,V] or [B,1,V] (last position); None with until_routed
    traces: list[LayerTrace] = field(default_factory=list)
    cache: list[LayerKV] | None = None  # per-layer KV (prefill): past + this call's rows
    new_cache: list[LayerKV] | None = None  # per-layer KV of this call's rows only (what a cache appends)
    table: Tensor | None = None  # [B,S] the attention-score table a first routed block reads (until_routed)


def _home(logits: Tensor, inputs: Tensor) -> Tensor:
    """Logits on the inputs' device: a model split over devices (tokenskip.placement) ends on its
    last block's device; callers get them where they sent the tokens, as from HF's own forward."""
    return logits if logits.device == inputs.device else logits.to(inputs.device)


def _own_scores(res, past: LayerKV | None):
    """With a past cache, keep the window attention scores of this call's keys only ([B,T] -> [B,new])."""
    if past is not None and res.attn_score is not None:
        res.attn_score, res.attn_seen = res.attn_score[:, past.length:], res.attn_seen[:, past.length:]
    return res


class RoutedModel(nn.Module):
    """Wraps a frozen *ForCausalLM of a tokenskip.families family. `router=None` or an all-zero schedule is dense."""

    def __init__(self, model: nn.Module, schedule: Schedule, router: Router | None, kv_policy: str = "skip",
                 score_window: int = DEFAULT_WINDOW, removed_layers: frozenset[int] = frozenset()) -> None:
        super().__init__()
        if kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
        self.family = family_of(model)  # where this model keeps its modules (UserError if unsupported)
        layers = self.family.model_parts(model).layers
        if schedule.num_layers != len(layers):
            raise ValueError(f"schedule has {schedule.num_layers} blocks, model has {len(layers)}")
        self.model = model
        self.schedule = schedule
        self.router = router
        self.kv_policy = kv_policy
        own = getattr(router, "score_window", None)  # a router may fix its own window (hybrid: part of its rule)
        self.score_window = own if own is not None else score_window
        # ShortGPT-style baseline: whole blocks removed for every token (not routing; no router call)
        self.removed_layers = frozenset(removed_layers)
        self.ste_keys = False  # training: straight-through gradient over the key mask too (run_block k_soft)

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def parts(self):  # the wrapped model's blocks, embedding, rotary embedding, final norm, LM head
        return self.family.model_parts(self.model)

    @property
    def layers(self):
        return self.parts.layers

    def layer_is_routed(self, layer: int) -> bool:
        return self.router is not None and self.schedule.is_routed(layer)

    def _router_scores(self, ctx: RouteContext) -> Tensor:
        """The router's scores [B,S] on the block's device. The router lives on one device; with a
        model split over several (accelerate device_map) its inputs go there and the scores come
        back. Never a copy in a normal (one-device) run."""
        here = ctx.positions.device
        there = placement.module_device(self.router, here)
        if there == here:
            return self.router.scores(ctx)
        moved = dataclasses.replace(ctx, positions=ctx.positions.to(there), valid=ctx.valid.to(there),
                                    attn=None if ctx.attn is None else ctx.attn.to(there))
        return self.router.scores(moved).to(here)

    def _needs_scores(self) -> bool:
        return self.router is not None and self.router.needs_attention

    def _score_window(self, li: int) -> int:
        """Window rows block `li` spends on the attention-score table (0: it leaves it alone). With
        score_refresh=False the table is what the last dense block before the first routed one
        computed (one selection layer, GemFilter-style; Schedule.window_runs)."""
        if not self._needs_scores() or not self.schedule.window_runs(li, self.router.score_refresh):
            return 0
        return self.score_window

    def _score_heads(self) -> str:
        return self.router.score_heads if self.router is not None else "mean"

    # -- full-sequence forward (prefill, evaluation, training) ------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, n_tail: int = 0,
                mode: str = "gather", position_ids: Tensor | None = None, last_only: bool = False,
                num_logits: int | None = None, return_cache: bool = False, trace: bool = False,
                ste: bool | float = False, padded: bool | None = None,
                past: list[LayerKV | None] | None = None, until_routed: bool = False) -> RoutedOutput:
        """input_ids [B,S] -> logits. n_tail: the last n_tail valid tokens run every block (the
        scored continuation, training's fast one-pass form); keep counts are computed over the
        other tokens.

        Causality: nothing that decides the routing of the first S - n_tail tokens reads the tail.
        Router features see only the routed part (positions and ranks normalised over it), and the
        attention-score window takes its query rows from it. So this one pass computes exactly
        what deployment computes: prefill of the first S - n_tail tokens, then decode of the tail
        through the KV cache (tested to 1e-7 in float64 for every router and kv_policy).

        padded: whether any row has padding, if the caller knows (None: read once from the mask).
        An unpadded batch lets attention take the causal kernels (tokenskip.attention).

        past: per-layer caches of earlier tokens (gather mode, explicit position_ids): the S tokens
        are routed among themselves and attend to the cache too; the returned cache is past + new.
        The exported graph serves prefill (empty past) and decode (S = 1: k = S, nothing skipped)
        with this one path.

        until_routed: stop before the first routed block and return only the attention-score table
        it would read (`RoutedOutput.table`, logits None): what training a one-selection router
        (train/select.py) needs, at the cost of the dense blocks before it."""
        if mode not in ("gather", "mask"):
            raise ValueError(f"mode must be 'gather' or 'mask', got {mode!r}")
        if past is not None and (mode != "gather" or position_ids is None):
            raise ValueError("past needs mode='gather' and explicit position_ids")
        bsz, seq = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = default_positions(valid) if position_ids is None else position_ids
        unpadded = position_ids is None and attention.rows_unpadded(attention_mask, padded)
        parts = self.parts
        h = parts.embed_tokens(input_ids)  # [B,S,H]
        cos_sin = parts.rotary_emb(h, positions)  # cos, sin [B,S,d]
        forced = forced_tokens(valid, n_tail)
        routable = valid & ~tail_tokens(valid, n_tail)  # [B,S] the routed part (the prompt)
        want_scores = self._needs_scores()
        table = torch.zeros(bsz, seq, dtype=torch.float32, device=h.device)  # latest attention score
        traces: list[LayerTrace] = []
        cache: list[LayerKV] = []
        new_cache: list[LayerKV] = []
        for li, layer in enumerate(parts.layers):
            if li in self.removed_layers:
                cache.append(None)
                new_cache.append(None)
                if trace:
                    traces.append(LayerTrace(k=0))
                continue
            lp = None if past is None else past[li]
            # accelerate-dispatched models (device_map / offload): this block's weights in, tensors on its device
            h, cos_sin, positions, valid, routable, forced, table = placement.enter(
                layer, h, cos_sin, positions, valid, routable, forced, table)
            if not self.layer_is_routed(li):
                window = self._score_window(li)
                args = BlockArgs(q_active=routable, past=lp, score_window=window, score_heads=self._score_heads(),
                                 causal=unpadded)
                res = _own_scores(run_block(self.family, layer, h, cos_sin, positions, valid, args), lp)
                h = res.out
                if window:
                    table = torch.where(res.attn_seen, res.attn_score, table)
                cache.append(res.kv)
                new_cache.append(res.new_kv)
                placement.leave(layer)
                if trace:
                    traces.append(LayerTrace(k=seq))
                continue
            if until_routed:
                return RoutedOutput(logits=None, table=table)
            ctx = RouteContext(layer=li, sparsity=self.schedule.sparsity[li], positions=positions, valid=routable,
                               attn=table if want_scores else None)
            raw = self._router_scores(ctx)  # [B,S]
            sel = routing_scores(raw.detach(), valid, forced)  # [B,S]
            # gather with n_tail = 0 takes k from the op itself (a SymInt expression of S when traced);
            # an int k here would specialise the exported graph to the example length
            k = block_keep_count(self.schedule, li, seq, n_tail) if (mode == "mask" or n_tail) else None
            if mode == "gather":
                h, table, res, tr = self._gather_block(li, layer, h, sel, k, n_tail, cos_sin, positions, valid, routable,
                                                      table, unpadded, lp)
            else:
                h, table, res, tr = self._mask_block(li, layer, h, sel, raw, k, cos_sin, positions, valid, routable, table,
                                                    ste, n_tail=n_tail)
            cache.append(res.kv)
            new_cache.append(res.new_kv)
            placement.leave(layer)
            if trace:
                tr.logits, tr.forced = raw, forced
                traces.append(tr)
        if last_only:
            h = h[:, -1:]  # [B,1,H] (callers left-pad so the last position is real)
        elif num_logits is not None:
            h = h[:, -num_logits:]  # [B,n,H] only the positions the caller scores
        logits = _home(parts.lm_head(parts.norm(h)), input_ids)
        return RoutedOutput(logits=logits, traces=traces, cache=cache if return_cache else None,
                            new_cache=new_cache if return_cache else None)

    def _gather_block(self, li, layer, h, sel, k, n_tail, cos_sin, positions, valid, routable, table, unpadded=False,
                      past=None):
        lean = unpadded and past is None and not torch.is_grad_enabled()  # inference, unpadded rows (fused.py)
        kept_norm = None
        if lean:  # the ops' rule without padding (every row keeps k): fewer kernels than the padding-aware op
            k = block_keep_count(self.schedule, li, h.shape[1], n_tail) if k is None else k
            index = ops.select_topk(sel, k)  # [B,k]
            kept, kept_norm = fused.gather_norm(h, index, self.family.layer_parts(layer).input_norm, self.family)
        elif n_tail == 0:  # exactly the exported op: k from the keep fraction and S, per-row counts from L_b
            num, den = self.schedule.keep_fraction(li)
            kept, index = ops.topk_gather(h, sel, valid, num, den, MIN_KEEP)  # [B,k,H], [B,k]
        else:
            index = ops.select_topk(sel, k, valid, block_keep_counts(self.schedule, li, valid, n_tail))  # [B,k]
            kept = ops.gather_rows(h, index)  # [B,k,H]
        kpos = positions.gather(1, index)  # [B,k] original positions -> RoPE
        kvalid = valid.gather(1, index)  # [B,k]
        krows = routable.gather(1, index)  # [B,k] kept rows of the routed part (score-window queries)
        kcos_sin = tuple(t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in cos_sin)
        window, heads = self._score_window(li), self._score_heads()
        if self.kv_policy == "skip":
            args = BlockArgs(q_active=krows, past=past, score_window=window, score_heads=heads, causal=unpadded,
                             x_norm=kept_norm)
        else:  # skipped tokens stay keys, from their un-updated hidden state
            args = BlockArgs(keys=KeyRows(h, cos_sin, positions, valid), q_active=krows, past=past,
                             score_window=window, score_heads=heads, x_norm=kept_norm)
        res = _own_scores(run_block(self.family, layer, kept, kcos_sin, kpos, kvalid, args), past)
        if lean:
            h = fused.scatter_delta_(h, res.out, kept, index)  # [B,S,H] in place
        else:
            h = ops.scatter_tokens(h, res.out - kept, index)  # [B,S,H]: skipped rows unchanged
        if window:
            if self.kv_policy == "skip":  # keys are the kept tokens: scatter their scores back
                old = table.gather(1, index)
                table = table.scatter(1, index, torch.where(res.attn_seen, res.attn_score, old))
            else:
                table = torch.where(res.attn_seen, res.attn_score, table)
        return h, table, res, LayerTrace(k=index.shape[1], index=index)

    def _mask_block(self, li, layer, h, sel, raw, k, cos_sin, positions, valid, routable, table, ste, *, n_tail: int):
        counts = block_keep_counts(self.schedule, li, valid, n_tail)  # [B] real tokens each row keeps
        index, hard = keep_mask(sel, k, valid, counts)  # [B,k], [B,S] 1 = keep
        keep = hard.bool()
        window = self._score_window(li)
        k_active = keep if self.kv_policy == "skip" else None
        soft = None
        if ste:  # forward value = hard mask, gradient = d soft / d logit (none for forced tokens)
            soft = ste_surrogate(raw, sel, routable, counts, None if ste is True else float(ste))
            free = routable & (sel != float("inf"))  # [B,S] tokens the router decides
            soft = torch.where(free, soft, soft.detach())
        k_soft = None
        if soft is not None and self.ste_keys and k_active is not None:  # keys too (kv_policy=skip)
            k_soft = torch.where(free, soft, torch.ones_like(soft))  # forced/tail keys: weight 1
        args = BlockArgs(k_active=k_active, q_active=keep & routable, score_window=window,
                         score_heads=self._score_heads(), k_soft=k_soft)
        res = run_block(self.family, layer, h, cos_sin, positions, valid, args)
        gate = hard
        if soft is not None:
            gate = hard + soft - soft.detach()
        h = h + gate.unsqueeze(-1).to(h.dtype) * (res.out - h)  # [B,S,H]
        if window:
            seen = res.attn_seen & keep if self.kv_policy == "skip" else res.attn_seen
            table = torch.where(seen, res.attn_score, table)
        return h, table, res, LayerTrace(k=k, index=index, keep_mask=keep)

    def dense_forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw) -> RoutedOutput:
        """The unrouted model through the same block code (bit-identical to HF's forward)."""
        saved = self.router, self.removed_layers
        self.router, self.removed_layers = None, frozenset()
        try:
            return self.forward(input_ids, attention_mask, **kw)
        finally:
            self.router, self.removed_layers = saved

    # -- cached decoding -------------------------------------------------------------------------
    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None, padded: bool | None = None
                ) -> tuple[Tensor, list[LayerKV]]:
        """Routed prefill: logits of the last position [B,V] and the per-layer KV cache.

        With kv_policy=skip a routed layer's cache holds only its kept tokens (lengths differ per
        layer, equal across the batch). Left-pad batches so the last position is real.
        """
        out = self.forward(input_ids, attention_mask, last_only=True, return_cache=True, padded=padded)
        return out.logits[:, -1], out.cache

    def decode_step(self, token: Tensor, position: Tensor, cache: list[LayerKV], all_logits: bool = False
                    ) -> tuple[Tensor, list[LayerKV]]:
        """Decode token/position [B,n] (n = 1 in generation): every block runs for every new token,
        which attends to each layer's cached keys and, causally, to the new tokens before it
        (method.md section 5). n > 1 is teacher-forced decoding in one call (evaluation): equal to
        n single steps (tested). Returns logits [B,V] of the last token (or [B,n,V] with
        all_logits) and the extended cache; the input cache is not modified."""
        graphed = getattr(cache, "graphed_step", None)  # a CUDA-graphed step bound to this cache (cuda_graphs)
        if graphed is not None and graphed.accepts(token, position, all_logits):
            return graphed(token, position)
        parts = self.parts
        h = parts.embed_tokens(token)  # [B,1,H]
        cos_sin = parts.rotary_emb(h, position)  # cos, sin [B,1,d]
        valid = torch.ones_like(token, dtype=torch.bool)
        extended = []  # past + this step's rows, per layer
        for li, (layer, past) in enumerate(zip(parts.layers, cache)):
            if li in self.removed_layers:
                extended.append(None)
                continue
            h, cos_sin, position, valid = placement.enter(layer, h, cos_sin, position, valid)
            res = run_block(self.family, layer, h, cos_sin, position, valid, BlockArgs(past=past))
            placement.leave(layer)
            h = res.out
            extended.append(res.kv)
        logits = _home(parts.lm_head(parts.norm(h)), token)  # [B,n,V]
        return (logits if all_logits else logits[:, -1]), extended
