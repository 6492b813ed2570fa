"""Log-probabilities: of each generated token (computed by the scheduler from the logits it samples
from), and of each prompt token (`echo` with `logprobs`, by a scoring pass).

Values are the model's own distribution, log_softmax of the raw logits, before temperature and
top-p (what OpenAI reports and vLLM's default `raw_logprobs` mode), clamped at -9999 as vLLM does
so that JSON never carries -inf. An entry is `(token id, log-prob or None, top alternatives)`;
logprob_shapes.py turns entries into the wire format (this module imports torch only: the
scheduler uses it).

Prompt log-probs come from the routed prefill itself: the full-sequence forward of the PyTorch
RoutedModel (`tokenskip.routed.RoutedModel.forward`, the pass `prefill` runs, with logits kept at
every position instead of the last one). So a prompt token's distribution is read from hidden
states in which the routed blocks ran only for the tokens the router kept: a token that skipped a
block carries its residual past it, exactly as in serving. This is not `tokenskip evaluate`'s
scoring, which decodes the continuation through the KV cache (every block runs for it): the server
cannot know where a continuation starts. ONNX Runtime and TensorRT prefill graphs return the last
position's logits only, so there echo with logprobs is a 400 (docs/serving.md says how to add it).
"""

from __future__ import annotations

import torch

FLOOR = -9999.0  # vLLM's clamp for -inf
SCORE_ROWS = 256  # positions per log_softmax chunk: bounds the float32 copy of [S,V]

Entry = tuple[int, "float | None", "list[tuple[int, float]] | None"]


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """logits [V] of one step -> (log-prob of `token`, the top_n (id, log-prob) alternatives)."""
    lp = torch.log_softmax(logits.detach().float().cpu(), dim=-1)  # [V]
    top = lp.topk(top_n) if top_n else None
    alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return max(float(lp[token]), FLOOR), [(i, max(v, FLOOR)) for i, v in alts]


def can_score(backend) -> bool:
    """Whether this backend can give a prompt's log-probs (it holds a RoutedModel: PyTorch)."""
    return getattr(backend, "routed", None) is not None


@torch.no_grad()
def score_prompt(backend, ids: list[int], top_n: int) -> list[Entry]:
    """Per-token log-probs of a prompt under the routed prefill: the first token has none.
    Runs on the engine thread (AsyncEngine.call), between two scheduler steps."""
    routed = backend.routed
    x = torch.tensor([ids], dtype=torch.int64, device=backend.device)  # [1,S]
    logits = routed(x, torch.ones_like(x), padded=False).logits[0, :-1]  # [S-1,V]: position i predicts i+1
    entries: list[Entry] = [(ids[0], None, None)]
    for start in range(0, logits.shape[0], SCORE_ROWS):
        lp = torch.log_softmax(logits[start:start + SCORE_ROWS].float(), dim=-1).cpu()  # [r,V]
        nxt = torch.tensor(ids[start + 1:start + 1 + lp.shape[0]])  # [r]
        chosen = lp.gather(1, nxt[:, None])[:, 0].clamp(min=FLOOR)  # [r]
        top = lp.topk(top_n, dim=-1) if top_n else None
        for r, tok in enumerate(nxt.tolist()):
            alts = [] if top is None else [(i, max(v, FLOOR)) for i, v in
                                           zip(top.indices[r].tolist(), top.values[r].tolist())]
            entries.append((tok, float(chosen[r]), alts))
    return entries
