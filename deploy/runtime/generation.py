"""The one generation loop: routed prefill, then cached decode (method.md section 5).

Every backend (PyTorch, ONNX Runtime, TensorRT, or any registered one) plugs into the same loop
through the `Backend` protocol of `base.py`: prefill(ids, mask) -> (logits [B,V], cache) and
decode(token [B,1], position [B,1], cache) -> (logits [B,V], cache). The cache is opaque to the
loop, so sampling, stopping, batching and streaming are written once and behave the same on every
backend.

Batches are left-padded so the last prefill position is real for every row. A row's position ids
skip its padding (0 at its first real token), so a generated token's position is the row's
prompt length plus the tokens generated before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from tokenskip.errors import UserError

from .base import Backend


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / T) restricted to the top-p nucleus."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> "Sampling":
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if not self.temperature >= 0.0:
            raise UserError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")
        return self


def row_generators(seed: int, offsets: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row, seeded seed + the prompt's index, so sampling a prompt gives the
    same tokens whether it runs alone or inside a batch."""
    return [torch.Generator(device="cpu").manual_seed(seed + int(o)) for o in offsets]


def sample(logits: Tensor, sampling: Sampling, generators: Sequence[torch.Generator]) -> Tensor:
    """logits [B,V] -> next tokens [B] int64 (on CPU)."""
    logits = logits.detach().float().cpu()  # [B,V]
    if sampling.temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)  # [B,V]
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [B,V]
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= sampling.top_p  # [B,V]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    out = [torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(probs.shape[0])]
    return torch.cat(out)  # [B]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> ids [B,S] int64 and mask [B,S] int64, padded on the left."""
    seq = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), seq), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), seq), dtype=torch.int64)
    for b, p in enumerate(prompts):
        if p:
            ids[b, seq - len(p):] = torch.tensor(list(p), dtype=torch.int64)
            mask[b, seq - len(p):] = 1
    return ids, mask


@dataclass
class Generation:
    """What one call of `generate_tokens` produced, with timings for --json."""

    tokens: list[list[int]]  # generated ids per row (EOS included when hit)
    prompt_lengths: list[int]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    stats: dict = field(default_factory=dict)  # backend extras (e.g. threshold-skip counts)

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")


def generate_tokens(backend: Backend, prompts: Sequence[Sequence[int]], sampling: Sampling, *, pad_id: int,
                    eos_ids: Sequence[int] = (), on_token: Callable[[int, int], None] | None = None,
                    seed_offsets: Sequence[int] | None = None) -> Generation:
    """Prefill every prompt (one left-padded batch), then decode until each row hits EOS or
    max_new_tokens. on_token(row, token) is called as each token is chosen (streaming).
    seed_offsets: each row's prompt index (default 0..B-1), which seeds its sampler."""
    sampling.check()
    if not prompts:
        raise UserError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i + 1} is empty (0 tokens): give at least one token of text")
    backend.check_length(max(len(p) for p in prompts), sampling.max_new_tokens)
    backend.expect_new_tokens(sampling.max_new_tokens)  # the prefill cache gets room for every new token
    ids, mask = left_pad(prompts, pad_id)  # [B,S]
    rows = ids.shape[0]
    gens = row_generators(sampling.seed, range(rows) if seed_offsets is None else seed_offsets)
    eos = set(int(e) for e in eos_ids)
    lengths = [len(p) for p in prompts]
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows

    t0 = time.perf_counter()
    logits, cache = backend.prefill(ids, mask)  # [B,V]
    nxt = sample(logits, sampling, gens)  # [B]
    t1 = time.perf_counter()
    steps = 0
    for step in range(sampling.max_new_tokens):
        for b in range(rows):
            if not done[b]:
                tok = int(nxt[b])
                out[b].append(tok)
                if on_token is not None:
                    on_token(b, tok)
                done[b] = tok in eos
        if all(done) or step == sampling.max_new_tokens - 1:
            break
        # finished rows keep decoding a pad token; their outputs are ignored
        token = torch.where(torch.tensor(done), torch.full_like(nxt, pad_id), nxt).view(rows, 1)  # [B,1]
        position = torch.tensor([[n + step] for n in lengths], dtype=torch.int64)  # [B,1]
        logits, cache = backend.decode(token, position, cache)
        nxt = sample(logits, sampling, gens)
        steps += 1
    t2 = time.perf_counter()
    return Generation(tokens=out, prompt_lengths=lengths, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=steps,
                      stats=dict(backend.stats))
