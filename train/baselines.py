"""ShortGPT-style layer removal at matched FLOPs (Men et al., 2024), the coarse-grained baseline.

Block Influence BI_l = 1 - mean over tokens of cos(block input, block output), measured on
calibration windows with the dense model. The least influential blocks are removed for every token,
as many as brings the analytic FLOPs (core/flops.py, `removed=`) closest to the FLOPs of the token
router at the target sparsity (uniform schedule, the same window and continuation lengths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenskip.block import run_block
from tokenskip.families import family_of
from tokenskip.flops import flops_ratio
from tokenskip.routed import RoutedModel, default_positions
from tokenskip.schedule import Schedule

CALIB_WINDOWS = 4  # calibration windows (of the evaluation length) for Block Influence


@torch.no_grad()
def block_influence(model, windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """BI per block on windows [N,L] (dense forward through the same block code as routing)."""
    n_layers = model.config.num_hidden_layers
    family = family_of(model)
    total = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(model.device)  # [B,L]
        valid = torch.ones_like(ids, dtype=torch.bool)
        positions = default_positions(valid)
        parts = family.model_parts(model)
        h = parts.embed_tokens(ids)  # [B,L,H]
        cos_sin = parts.rotary_emb(h, positions)
        for li, layer in enumerate(parts.layers):
            out = run_block(family, layer, h, cos_sin, positions, valid).out  # [B,L,H]
            total[li] += float((1 - F.cosine_similarity(h.float(), out.float(), dim=-1)).double().sum())
            h = out
        count += ids.numel()
    return (total / count).tolist()


def removal_for_flops(config, influence: list[float], target_ratio: float, seq: int) -> frozenset[int]:
    """Remove blocks in increasing BI order; the count whose FLOPs ratio is closest to the target."""
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    best, best_gap = frozenset(), abs(1.0 - target_ratio)
    for m in range(1, len(order)):
        removed = frozenset(order[:m])
        gap = abs(flops_ratio(config, None, seq, removed=removed) - target_ratio)
        if gap < best_gap:
            best, best_gap = removed, gap
    return best


def target_flops(config, sparsity: float, seq: int, cont_len: int, kv_policy: str = "skip") -> float:
    """Prefill FLOPs ratio of the token router at `sparsity` (uniform schedule) on the prompts
    (seq - cont_len tokens) of evaluation windows: what routing saves, as in the quality table."""
    return flops_ratio(config, Schedule.uniform(config.num_hidden_layers, sparsity), seq - cont_len, 0, kv_policy)


def shortgpt_model(model, calib: torch.Tensor, sparsity: float, seq: int, cont_len: int, kv_policy: str = "skip",
                   batch_size: int = 4) -> tuple[RoutedModel, dict]:
    """A RoutedModel with the least influential blocks removed, FLOPs matched to `sparsity`."""
    bi = block_influence(model, calib, batch_size)
    target = target_flops(model.config, sparsity, seq, cont_len, kv_policy)
    removed = removal_for_flops(model.config, bi, target, seq - cont_len)
    n = model.config.num_hidden_layers
    routed = RoutedModel(model, Schedule.dense(n), None, kv_policy=kv_policy, removed_layers=removed)
    info = {"block_influence": [round(b, 6) for b in bi], "removed": sorted(removed), "target_flops": target,
            "flops": flops_ratio(model.config, None, seq - cont_len, removed=removed)}
    return routed, info


def shortgpt_for(lm, sparsity: float, seq: int, cont_len: int, kv_policy: str = "skip", batch_size: int = 4,
                 calib_text: str | None = None) -> tuple[RoutedModel, dict, str]:
    """The ShortGPT baseline of a loaded model, Block Influence on CALIB_WINDOWS calibration windows
    of length `seq`: (routed model, info, method name). `tokenskip eval` and the quality table share it."""
    from .common import windows

    calib = windows(lm.tokenizer, "calib", calib_text, seq, CALIB_WINDOWS, seed=0)
    routed, info = shortgpt_model(lm.model, calib, sparsity, seq, cont_len, kv_policy, batch_size)
    return routed, info, f"shortgpt (-{len(info['removed'])} blocks)"
