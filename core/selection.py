"""Which tokens a routed block keeps: forced tokens, per-row keep counts, the top-k selection and
the straight-through surrogate that lets training's gradient reach the ranking.

Shared by the routed model's gather mode (inference, export, evaluation) and mask mode (training),
and by the trainer's guide target, so every path selects the same tokens (docs/design.md, "Keep
counts"). `tokenskip.routed` re-exports these names.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .schedule import MIN_KEEP, Schedule


def default_positions(valid: Tensor) -> Tensor:
    """Position ids that skip left padding: 0 at each row's first valid token."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def tail_tokens(valid: Tensor, n_tail: int) -> Tensor:
    """[B,S] bool: the last n_tail valid tokens of each row (the scored continuation, which runs
    every block as decoding would). Everything before them is the routed part (the prompt)."""
    rank_from_end = valid.long().flip(-1).cumsum(-1).flip(-1)  # [B,S] 1 at the last valid token
    return valid & (rank_from_end <= n_tail)


def forced_tokens(valid: Tensor, n_tail: int) -> Tensor:
    """[B,S] bool: the first valid token (attention sink), the last valid token of the routed part
    (it makes the next-token logits), and the last n_tail valid tokens (the scored continuation)."""
    idx = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)  # [B,S]
    big = valid.shape[1]
    first = torch.where(valid, idx, torch.full_like(idx, big)).min(-1, keepdim=True).values  # [B,1]
    last = torch.where(valid, idx, torch.full_like(idx, -1)).max(-1, keepdim=True).values  # [B,1]
    # the last n_tail+1 valid tokens: the continuation plus the prompt's last token
    tail = tail_tokens(valid, n_tail + 1)
    return (idx == first) | (idx == last) | tail


def routing_scores(raw: Tensor, valid: Tensor, forced: Tensor) -> Tensor:
    """Router scores -> selection scores: forced tokens +inf, padding -inf ([B,S] float32)."""
    s = raw.to(torch.float32)
    s = torch.where(forced, torch.full_like(s, float("inf")), s)
    return torch.where(valid, s, torch.full_like(s, float("-inf")))


def block_keep_count(schedule: Schedule, layer: int, seq: int, n_tail: int = 0) -> int:
    """Tokens block `layer` runs on in a sequence of `seq`: the schedule's keep count over the
    routable part, plus the n_tail continuation tokens that run every block."""
    return schedule.keep_count(layer, seq - n_tail) + n_tail


def block_keep_counts(schedule: Schedule, layer: int, valid: Tensor, n_tail: int = 0) -> Tensor:
    """[B] int64: real tokens each row keeps in block `layer`, from its own valid length L_b (the
    per-row rule of docs/ops.md): n_tail + keep(L_b - n_tail), at most L_b. A full row keeps
    block_keep_count(schedule, layer, S, n_tail), the batch's output width."""
    lengths = valid.sum(-1)  # [B]
    num, den = schedule.keep_fraction(layer)
    routable = (lengths - n_tail).clamp(min=0)
    return torch.minimum(lengths, ops.keep_count(routable, num, den, MIN_KEEP) + n_tail)


def ste_surrogate(raw: Tensor, sel: Tensor, routable: Tensor, counts: Tensor, temperature: float | None) -> Tensor:
    """The soft gate whose gradient the straight-through estimator passes to the router ([B,S]).

    temperature None: sigmoid(logit), FTP as written. A number T: a soft top-k,
    sigmoid((logit - t) / (T * sd)), centred on the row's decision threshold t (halfway between the
    last kept and the first skipped logit; row b keeps counts[b] tokens) and scaled by the spread
    sd of the row's routable logits. The threshold moves with the logits as a soft top-k's would
    (dt/dlogit_i = w_i = sigmoid'_i / sum sigmoid'), so the soft gates' sum is constant to first
    order: raising one token's score lowers the others', as the hard top-k's fixed budget does.
    The tokens whose decision could flip get the most gradient, and logits pushed to saturation do
    not silence the signal. The value is only used for its gradient.
    """
    if temperature is None:
        return torch.sigmoid(raw.float())
    logits = raw.float()
    order = torch.sort(sel, dim=-1, descending=True, stable=True).indices  # [B,S] selection order
    ranked = logits.detach().gather(1, order)  # [B,S] logits in selection order
    s = sel.shape[1]
    last = (counts.to(order.device) - 1).clamp(0, s - 1).unsqueeze(1)  # [B,1]
    t = 0.5 * (ranked.gather(1, last) + ranked.gather(1, (last + 1).clamp(max=s - 1))).squeeze(1)  # [B]
    m = (routable & (sel != float("inf"))).float()  # [B,S] the tokens the router decides
    n = m.sum(-1).clamp(min=2)
    mean = (logits.detach() * m).sum(-1) / n
    sd = (((logits.detach() - mean[:, None]) ** 2 * m).sum(-1) / (n - 1)).sqrt().clamp(min=1e-6)  # [B]
    scale = (temperature * sd)[:, None]  # [B,1]
    with torch.no_grad():
        p = torch.sigmoid((logits - t[:, None]) / scale)
        w = p * (1 - p) * m
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)  # [B,S] dt / dlogit
    t_eff = t[:, None] + (w * (logits - logits.detach())).sum(-1, keepdim=True)  # value t, gradient w
    return torch.sigmoid((logits - t_eff) / scale)


def keep_mask(sel: Tensor, k: int, valid: Tensor | None = None, counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Selection scores [B,S] -> (index [B,k] ascending, mask [B,S] float with 1 on the kept tokens):
    the same selection that gather execution runs (row b keeps counts[b] real tokens, padding fills
    the rest of its k slots; None: no padding, k each)."""
    index = ops.select_topk(sel, k, valid, counts)  # [B,k]
    return index, torch.zeros_like(sel).scatter(1, index, 1.0)
