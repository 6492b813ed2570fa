"""Analytic FLOPs of a forward pass, dense vs routed, as the blocks are actually executed.

Counted per block: Q/O projections and the MLP for every query row, K/V projections for every
key-producing token, and attention as q_rows x keys (QK^T and PV). Attention is counted over the
full q x T rectangle, not a causal triangle, because that is what SDPA with an explicit mask and
the exported MatMul+Softmax graphs compute. Embedding and the LM head are excluded (they do not
change with routing). A router that reads attention scores (`needs_attention`: the learned and the
attention routers) adds its score window, window x keys per block; callers pass `score_window` for it.
The hybrid router refreshes the window in every executed block too (its default); one built with
score_refresh=False computes it only in the last dense block before the first routed one, its
selection layer (`score_refresh=False` here; left True the count is an upper bound).
"""

from __future__ import annotations

from .schedule import Schedule


def _dims(config) -> tuple[int, int, int, int, int]:
    h = config.hidden_size
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", nh) or nh
    d = getattr(config, "head_dim", None) or h // nh
    return h, nh, nkv, d, config.intermediate_size


def block_flops(config, n_q: int, n_kv: int, n_keys: int, score_window: int = 0) -> float:
    h, nh, nkv, d, inter = _dims(config)
    per_q = 2 * h * nh * d + 2 * nh * d * h + 3 * 2 * h * inter  # q, o, gate/up/down
    per_kv = 2 * 2 * h * nkv * d  # k, v
    attn = 2 * 2 * nh * d * n_q * n_keys
    window = 2 * 2 * nh * d * min(score_window, n_q) * n_keys if score_window else 0
    return float(per_q * n_q + per_kv * n_kv + attn + window)


def forward_flops(config, schedule: Schedule | None, seq: int, n_tail: int = 0, kv_policy: str = "skip",
                  score_window: int = 0, removed: frozenset[int] = frozenset(), score_refresh: bool = True) -> float:
    """FLOPs of one sequence of length `seq` through all blocks (schedule None = dense);
    `removed` blocks (ShortGPT baseline) cost nothing. score_refresh=False: the score window runs
    only in the block before the first routed one (a router's one selection layer)."""
    total = 0.0
    for layer in range(config.num_hidden_layers):
        if layer in removed:
            continue
        runs = schedule is None or schedule.window_runs(layer, score_refresh)
        window = score_window if runs else 0
        if schedule is None or not schedule.is_routed(layer):
            total += block_flops(config, seq, seq, seq, window)
            continue
        k = schedule.keep_count(layer, seq - n_tail) + n_tail
        if kv_policy == "skip":
            total += block_flops(config, k, k, k, window)
        else:
            total += block_flops(config, k, seq, seq, window)
    return total


def flops_ratio(config, schedule: Schedule | None, seq: int, n_tail: int = 0, kv_policy: str = "skip",
                score_window: int = 0, removed: frozenset[int] = frozenset(), score_refresh: bool = True) -> float:
    """Routed FLOPs / dense FLOPs (the ideal speed-up is its inverse)."""
    routed = forward_flops(config, schedule, seq, n_tail, kv_policy, score_window, removed, score_refresh)
    return routed / forward_flops(config, None, seq)


def routed_flops_ratio(routed, seq: int) -> float:
    """flops_ratio of a RoutedModel's prefill of `seq` tokens, everything read from the model: its
    schedule (none while its router is off), its router's score window where that runs
    (Schedule.window_runs), removed blocks."""
    router = routed.router
    window = routed.score_window if router is not None and router.needs_attention else 0
    return flops_ratio(routed.model.config, routed.schedule if router is not None else None, seq, 0, routed.kv_policy,
                       window, routed.removed_layers, True if router is None else router.score_refresh)
