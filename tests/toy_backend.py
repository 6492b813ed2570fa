"""A whole runtime backend in one file, registered as "toy": what a new backend needs to provide.

The toy "model" is a fixed rule, so a test knows every token it must produce: after the tokens
t_0..t_p of a row (p = the last one's position), the next token is

    next = 2 + (t_0 + ... + t_p + p) % 95

which is always a printable ASCII character of tests/conftest.py's char tokenizer (ids 2..96), and
never its EOS (id 1). The cache is the backend's own: each row's token history. Decode checks
that it is given the position the history implies, so a scheduler that loses or reorders cache
rows, or sends a wrong position, gets a wrong token or an error, never a lucky pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tokenskip.deploy.runtime.base import (BackendSpec, CacheOps, Created, ModelFacts, load_tokenizer,
                                           register_backend)
from tokenskip.deploy.runtime.kv_cache import check_limit

MAX_LENGTH = 512


def next_token(history: list[int]) -> int:
    """The rule: the token after `history` (its last entry at position len(history) - 1)."""
    return 2 + (sum(history) + len(history) - 1) % 95


def continuation(prompt: list[int], n: int) -> list[int]:
    """The n tokens greedy generation must produce after `prompt`."""
    history, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(history))
        history.append(out[-1])
    return out


@dataclass
class ToyCache:
    rows: list[list[int]]  # per batch row: its tokens so far (padding excluded)


def _select(cache: ToyCache, rows: list[int], room: int) -> ToyCache:
    return ToyCache([list(cache.rows[r]) for r in rows])


def _concat(caches: list[ToyCache], room: int) -> ToyCache:
    return ToyCache([list(r) for c in caches for r in c.rows])


def _fit(cache: ToyCache, room: int) -> ToyCache:
    return cache  # lists grow as needed: any room fits


TOY_OPS = CacheOps("toy history", _select, _concat, _fit)


@register_backend("toy")
class ToyBackend:
    """The Backend protocol (deploy/runtime/base.py) over the rule above."""

    name = "toy"

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.max_length = MAX_LENGTH
        self.stats: dict = {}
        self.new_tokens = 0  # announced by the generation loop; the toy's lists need no room
        self.row_ops: CacheOps | None = TOY_OPS

    @classmethod
    def open(cls, spec: BackendSpec) -> "ToyBackend":
        return cls(vocab=97)

    @classmethod
    def create(cls, spec: BackendSpec) -> Created:
        tok = load_tokenizer(Path(spec.tokenizer_dir), "--tokenizer")
        return Created(cls(vocab=len(tok)), tok, {"backend": "toy", "model": "toy-rule"})

    def _logits(self, cache: ToyCache) -> Tensor:
        logits = torch.zeros(len(cache.rows), self.vocab)  # [B,V]
        for b, history in enumerate(cache.rows):
            logits[b, next_token(history)] = 1.0
        return logits

    def prefill(self, ids: Tensor, mask: Tensor):
        cache = ToyCache([[int(t) for t, m in zip(row, keep) if m] for row, keep in zip(ids.tolist(), mask.tolist())])
        return self._logits(cache), cache

    def decode(self, token: Tensor, position: Tensor, cache: ToyCache):
        if token.shape[0] != len(cache.rows):
            raise RuntimeError(f"toy: {token.shape[0]} tokens for a cache of {len(cache.rows)} rows")
        for b, history in enumerate(cache.rows):
            if int(position[b, 0]) != len(history):
                raise RuntimeError(f"toy: row {b} decodes position {int(position[b, 0])}, its cache holds "
                                   f"{len(history)} tokens")
            history.append(int(token[b, 0]))
        return self._logits(cache), cache

    chunked_prefill = True  # the history lists take any continuation

    def prefill_chunk(self, ids: Tensor, positions: Tensor, cache: ToyCache):
        for b, history in enumerate(cache.rows):
            if int(positions[b, 0]) != len(history):
                raise RuntimeError(f"toy: row {b} continues at position {int(positions[b, 0])}, its cache holds "
                                   f"{len(history)} tokens")
            history.extend(int(t) for t in ids[b])
        return self._logits(cache), cache

    def check_length(self, prompt: int, new: int) -> None:
        check_limit("toy model", prompt, new, self.max_length)

    def expect_new_tokens(self, new: int) -> None:
        self.new_tokens = new

    def cache_nbytes(self, cache: ToyCache) -> int:
        return 8 * sum(len(r) for r in cache.rows)

    def cache_ops(self) -> CacheOps | None:
        return self.row_ops

    def model_facts(self) -> ModelFacts:
        return ModelFacts(max_length=self.max_length)  # no cache geometry: the server runs without a KV budget
