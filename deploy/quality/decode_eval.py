"""Decode-time quality: what generation really computes, scored against dense.

Each window of L tokens gives a prompt (its first `prompt_len` tokens) and a true continuation
(the next `new_tokens`). The routed model prefills the prompt with routing and then decodes the
continuation token by token through its KV cache (teacher forcing through decode_step): every
generated token runs every block and attends to each layer's cached (kept) keys, method.md
section 5. The reference is dense prefill + dense decode through the same code.

Reported: perplexity of the continuation (and its ratio to dense), KL(dense || routed) and top-1
agreement at the teacher-forced positions, and agreement of free-running greedy decoding with
dense greedy (position by position, and the mean length of the identical prefix).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from tokenskip.flops import routed_flops_ratio
from tokenskip.freerun import greedy_tokens, prefix_len
from tokenskip.routed import RoutedModel


@contextlib.contextmanager
def as_dense(routed: RoutedModel):
    """The same model with routing switched off (router None: every block dense)."""
    saved = routed.router, routed.removed_layers
    routed.router, routed.removed_layers = None, frozenset()
    try:
        yield routed
    finally:
        routed.router, routed.removed_layers = saved


@torch.no_grad()
def teacher_forced_logprobs(routed: RoutedModel, prompt: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """prompt [B,p], cont [B,n] -> log-probs [B,n,V]: row i predicts cont[:, i] (prefill, then one
    decode step per token, exactly generation's calls; tokenskip.evaluate does it in one decode call)."""
    bsz, p = prompt.shape
    logits, cache = routed.prefill(prompt, torch.ones_like(prompt))  # [B,V]
    steps = [logits.float()]
    for i in range(cont.shape[1] - 1):
        position = torch.full((bsz, 1), p + i, dtype=torch.int64, device=prompt.device)  # [B,1]
        logits, cache = routed.decode_step(cont[:, i:i + 1], position, cache)
        steps.append(logits.float())
    return F.log_softmax(torch.stack(steps, 1), dim=-1)  # [B,n,V]


@torch.no_grad()
def decode_quality(routed: RoutedModel, windows: torch.Tensor, prompt_len: int, new_tokens: int,
                   batch_size: int = 4, progress: bool = False) -> dict:
    """windows [N,L] with L >= prompt_len + new_tokens -> decode-time quality vs dense (a dict)."""
    n, seq = windows.shape
    if prompt_len < 2 or new_tokens < 1 or prompt_len + new_tokens > seq:
        raise ValueError(f"need 2 <= prompt_len and prompt_len + new_tokens <= {seq}, "
                         f"got {prompt_len} + {new_tokens}")
    device = next(routed.model.parameters()).device
    nll_r, nll_d, kls, top1, agree, prefix = [], [], [], [], [], []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="decode-eval", leave=False)
    for start in starts:
        w = windows[start:start + batch_size].to(device)
        prompt, cont = w[:, :prompt_len], w[:, prompt_len:prompt_len + new_tokens]  # [B,p], [B,n]
        lp_r = teacher_forced_logprobs(routed, prompt, cont)  # [B,n,V]
        g_r = greedy_tokens(routed, prompt, new_tokens)
        with as_dense(routed):
            lp_d = teacher_forced_logprobs(routed, prompt, cont)
            g_d = greedy_tokens(routed, prompt, new_tokens)
        nll_r.append(-lp_r.gather(-1, cont.unsqueeze(-1)).squeeze(-1))  # [B,n]
        nll_d.append(-lp_d.gather(-1, cont.unsqueeze(-1)).squeeze(-1))
        kls.append((lp_d.exp() * (lp_d - lp_r)).sum(-1))  # [B,n] KL(dense || routed)
        top1.append((lp_d.argmax(-1) == lp_r.argmax(-1)).float())
        agree.append((g_r == g_d).float())
        prefix.append(prefix_len(g_r, g_d).float())
    routed_nll, dense_nll = torch.cat(nll_r).mean().item(), torch.cat(nll_d).mean().item()
    router = routed.router
    sched = routed.schedule if router is not None else None
    return {
        "windows": n, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "router": type(router).__name__ if router is not None else "dense", "kv_policy": routed.kv_policy,
        "sparsity": sched.overall(prompt_len) if sched is not None else 0.0,
        "prefill_flops": routed_flops_ratio(routed, prompt_len),
        "dense_ppl": math.exp(dense_nll), "routed_ppl": math.exp(routed_nll),
        "ppl_ratio": math.exp(routed_nll - dense_nll),
        "kl": torch.cat(kls).mean().item(), "top1": torch.cat(top1).mean().item(),
        "greedy_agree": torch.cat(agree).mean().item(), "greedy_prefix": torch.cat(prefix).mean().item(),
    }
