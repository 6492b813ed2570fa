"""Threshold-skip decoding (batch 1): a generated token skips a routed block when the learned
router's keep probability sigmoid(logit) is below 0.5 (the paper's decode-time rule).

Prefill ranks tokens against each other (top-k); a single generated token has nobody to be ranked
against, so the router's probability decides alone. Its four features, for the new token:
- normalised position: 1.0 (it is the last token of the sequence so far, as in prefill);
- attention received: the attention it got from itself in the most recent executed block (in
  prefill the last token's window score is exactly that: no later query sees it);
- its rank: among the attention the new query gave every key of that block (an approximation:
  prefill ranks against a table built from a window of the last 64 queries, and a decode step has
  only one query; cached queries do not exist);
- the block's target sparsity s_l.
A skipped block leaves the hidden state untouched. With kv_policy=skip the token is then not a
key of that block (its cache does not grow, as for a skipped prompt token); with kv_policy=dense
its K/V come from the un-updated hidden state, exactly as in prefill.

Batch 1 only: with several rows the layers' cache lengths would diverge between rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenskip.block import BlockArgs, LayerKV, project_kv, run_block
from tokenskip.routed import RoutedModel
from tokenskip.routers import LearnedRouter, normalized_rank

THRESHOLD = 0.5


def _kv_only(parts, h: Tensor, cos_sin: tuple[Tensor, Tensor], position: Tensor) -> LayerKV:
    """K/V of rows h [B,q,H] from their block input (what kv_policy=dense caches for a skipped token)."""
    k, v = project_kv(parts, parts.input_norm(h), cos_sin)  # [B,nkv,q,d]
    return LayerKV(k, v, position, torch.ones_like(position, dtype=torch.bool))


@torch.no_grad()
def threshold_decode_step(routed: RoutedModel, token: Tensor, position: Tensor, cache: list[LayerKV],
                          threshold: float = THRESHOLD) -> tuple[Tensor, list[LayerKV], list[int]]:
    """decode_step with per-block skipping: token/position [1,1] -> (logits [1,V], cache, skipped layers)."""
    router = routed.router
    if not isinstance(router, LearnedRouter):
        raise ValueError("threshold-skip needs the learned router")
    if token.shape[0] != 1:
        raise ValueError("threshold-skip decodes one sequence at a time (batch 1)")
    parts = routed.parts
    h = parts.embed_tokens(token)  # [1,1,H]
    cos_sin = parts.rotary_emb(h, position)
    valid = torch.ones_like(token, dtype=torch.bool)  # [1,1]
    attn_self = torch.zeros(1, dtype=torch.float32, device=h.device)  # [1] before any block: zero table
    rank_self = torch.ones(1, dtype=torch.float32, device=h.device)  # ties -> the last token ranks last
    skipped: list[int] = []
    new_cache: list[LayerKV] = []
    for li, (layer, past) in enumerate(zip(routed.layers, cache)):
        if li in routed.removed_layers:
            new_cache.append(None)
            continue
        if routed.layer_is_routed(li):
            feats = torch.stack([torch.ones_like(attn_self), attn_self, rank_self,
                                 torch.full_like(attn_self, routed.schedule.sparsity[li])], dim=-1)  # [1,4]
            prob = torch.sigmoid(router(feats.unsqueeze(1)).float())  # [1,1]
            if bool(prob.item() < threshold):
                skipped.append(li)
                if routed.kv_policy == "dense":
                    new_cache.append(past.append(_kv_only(routed.family.layer_parts(layer), h, cos_sin, position)))
                else:
                    new_cache.append(past)
                continue
        res = run_block(routed.family, layer, h, cos_sin, position, valid, BlockArgs(past=past, score_window=1))
        h = res.out
        new_cache.append(res.kv)
        scores = res.attn_score  # [1,T] attention from the new query to every key (itself last)
        attn_self = scores[:, -1]
        rank_self = normalized_rank(scores, res.kv.valid)[:, -1]
    logits = parts.lm_head(parts.norm(h))  # [1,1,V]
    return logits[:, -1], new_cache, skipped
