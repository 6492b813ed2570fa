"""Free-running text: what a user sees from greedy `generate`, measured over many prompts.

Teacher-forced KL says how close each next-token distribution stays to dense; it does not say
whether free-running text degenerates. So we also generate greedily from the prompts of the
evaluation windows with exactly the generation functions (routed prefill, then one decode step per
token through the KV cache) and report, per method, against dense from the same prompts:
- agreement: the fraction of positions where the greedy token equals dense's, and the mean length
  of the identical prefix;
- repetition: the fraction of 4-grams of the generated text that already occurred earlier in it
  (0 = no repeats; looping text approaches 1), next to dense's own rate;
all with paired bootstrap 95% CIs over prompts.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from . import stats
from .precision import model_device
from .routed import RoutedModel

NGRAM = 4


@torch.no_grad()
def greedy_tokens(routed: RoutedModel, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """prompt [B,p] -> greedy continuation [B,n], exactly as `generate` computes it."""
    bsz, p = prompt.shape
    logits, cache = routed.prefill(prompt, torch.ones_like(prompt))
    out = [logits.argmax(-1)]  # [B]
    for i in range(n - 1):
        position = torch.full((bsz, 1), p + i, dtype=torch.int64, device=prompt.device)
        logits, cache = routed.decode_step(out[-1].view(bsz, 1), position, cache)
        out.append(logits.argmax(-1))
    return torch.stack(out, 1)  # [B,n]


def prefix_len(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B,n] x [B,n] -> [B] length of the identical prefix."""
    return (a == b).long().cumprod(-1).sum(-1)


def repetition_rate(tokens: list[int], n: int = NGRAM) -> float:
    """Fraction of the n-grams of `tokens` that occurred earlier in `tokens`."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


@torch.no_grad()
def free_running(methods: list[tuple[str, RoutedModel]], dense_model: RoutedModel, prompts: torch.Tensor,
                 n_new: int, batch_size: int = 8, progress: bool = True, seed: int = 0) -> list[dict]:
    """Greedy continuations of prompts [N,p] for dense and every method -> one dict per method
    (dense first): agreement with dense, identical-prefix length, repetition rate, with CIs."""
    n = prompts.shape[0]
    gens: dict[str, list[torch.Tensor]] = {"dense": []}
    models = [("dense", dense_model), *methods]
    bar = tqdm(total=n * len(models), desc="free-running", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        p = prompts[start:start + batch_size].to(model_device(dense_model.model))
        for name, m in models:
            gens.setdefault(name, []).append(greedy_tokens(m, p, n_new).cpu())
            bar.update(len(p))
    bar.close()
    toks = {k: torch.cat(v) for k, v in gens.items()}  # [N,n_new]
    idx = stats.resample_indices(n, seed=seed) if n > 1 else None
    dense_rep = np.array([repetition_rate(row.tolist()) for row in toks["dense"]])
    out = []
    for name, _ in models:
        t = toks[name]
        agree = (t == toks["dense"]).float().mean(-1).numpy()  # [N]
        prefix = prefix_len(t, toks["dense"]).float().numpy()
        rep = np.array([repetition_rate(row.tolist()) for row in t])
        row = {"method": name, "prompts": n, "new_tokens": n_new, "greedy_agree": float(agree.mean()),
               "greedy_prefix": float(prefix.mean()), "rep4": float(rep.mean()), "rep4_dense": float(dense_rep.mean())}
        if idx is not None:
            row["greedy_agree_ci"] = list(stats.mean_ci(agree, idx))
            row["rep4_ci"] = list(stats.mean_ci(rep, idx))
            diff = stats.diff_ci(rep, dense_rep, idx)
            row["rep4_minus_dense_ci"] = [diff[1], diff[2]]
        row["per_prompt"] = {"greedy_agree": agree.tolist(), "rep4": rep.tolist()}
        out.append(row)
    return out


def format_free_running(rows: list[dict]) -> str:
    head = ("| method | greedy agreement with dense [95% CI] | identical prefix (tokens) | "
            "4-gram repetition [95% CI] | repetition - dense [95% CI] |")
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        ci = r.get("greedy_agree_ci")
        rci, dci = r.get("rep4_ci"), r.get("rep4_minus_dense_ci")
        agree = f"{r['greedy_agree']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        rep = f"{r['rep4']:.3f}" + (f" [{rci[0]:.3f}, {rci[1]:.3f}]" if rci else "")
        diff = f"{r['rep4'] - r['rep4_dense']:+.3f}" + (f" [{dci[0]:+.3f}, {dci[1]:+.3f}]" if dci else "")
        lines.append(f"| {r['method']} | {agree} | {r['greedy_prefix']:.1f} | {rep} | {diff} |")
    return "\n".join(lines)
