"""What the scheduler schedules: a request's `Sequence`, the `Event`s it emits, the `Stats` hooks,
and the step plan's arithmetic (per-row cache room, prefill chunks under a token budget).

Kept apart from scheduler.py (which re-exports every name here) so the scheduler module holds
only the loop: admission, prefill, decode, regrouping and fault handling.
"""

from __future__ import annotations

import collections
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

from ..runtime.generation import Sampling, row_generators


class QueueFull(Exception):
    """The waiting queue is at its bound (the server answers 429)."""


class Unavailable(Exception):
    """The engine takes no new work: it failed, or it is draining for a shutdown (the server answers 503)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Event:
    """What a sequence gets from the engine thread: a token, and/or its end."""

    token: int | None = None
    finish: str | None = None  # "stop" | "length" | "abort" | "error" | "timeout"
    error: str | None = None
    logprob: tuple | None = None  # (log-prob of token, [(id, log-prob)] top alternatives) when asked for
    status: int = 500  # HTTP status of an error ("error": 500, "timeout": 504, an engine shut down: 503)
    code: str | None = None  # OpenAI error body's `code` for an error


@dataclass(eq=False)
class Sequence:
    """One request's row. `emit` is called on the engine thread for every Event."""

    rid: str
    prompt: list[int]
    sampling: Sampling  # max_new_tokens = the request's max_tokens
    emit: Callable[[Event], None]
    eos: frozenset[int] = frozenset()
    logprobs: int | None = None  # top alternatives to report per token (None: no log-probs)
    seed_offset: int = 0
    kv_bytes: int = 0  # reserved against the KV budget while the sequence runs
    deadline: float | None = None  # time.perf_counter() past which the request ends with "timeout"
    arrival: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    prefilled: int = 0  # prompt tokens in its cache so far (chunked prefill: < len(prompt) until done)
    reserved: bool = False  # holds kv_bytes of the scheduler's KV budget (admitted, not finished)

    def __post_init__(self) -> None:
        seed = self.sampling.seed
        self.generator = row_generators(seed, [self.seed_offset])[0]

    @property
    def decode_room(self) -> int:
        """Cache rows this sequence's remaining decode steps can add (prefill gives its first token)."""
        return max(0, self.sampling.max_new_tokens - max(1, len(self.tokens)))


def batch_room(seqs: list[Sequence]) -> int:
    """Free cache columns a regrouped batch gets: the decode steps until its next regrouping.

    The cache is rectangular (every row's new column is written at the same index), so any room
    is given to every row. Giving the LARGEST remaining generation (as before) made one request
    with max_tokens 4000 hand all 32 rows 4000 columns. But a regrouping happens anyway whenever a
    row leaves (it reaches its max_tokens, an EOS, an abort: `Scheduler._compact` selects the live
    rows into a new cache), and the row with the SMALLEST remaining room leaves by then at the
    latest. So that smallest room is all the batch needs until the next regrouping gives fresh
    room: allocated bytes follow each row's own need (docs/serving.md, "Memory")."""
    rooms = [s.decode_room for s in seqs if s.finish is None and s.decode_room > 0]
    return min(rooms) if rooms else 0


def chunk_len(remaining: int, budget: int | None, running: int) -> int:
    """Prompt tokens the next prefill call takes of a prompt with `remaining` tokens left, under a
    per-step token budget shared with the `running` rows' decode tokens (None: the whole prompt)."""
    if budget is None:
        return remaining
    return max(1, min(remaining, budget - running))


class Stats:
    """Hooks the scheduler calls (metrics.py fills them in); the base class only counts."""

    def __init__(self) -> None:
        self.max_running = 0
        self.prefills = 0
        self.prefill_chunks = 0
        self.decode_steps = 0
        self.faults = 0
        self.finished: collections.Counter = collections.Counter()

    def on_queue(self, waiting: int, running: int, kv_used: int) -> None:
        self.max_running = max(self.max_running, running)

    def on_prefill(self, seqs: list[Sequence], padded_len: int, seconds: float) -> None:
        self.prefills += 1

    def on_chunk(self, seq: Sequence, tokens: int, seconds: float) -> None:
        self.prefill_chunks += 1

    def on_decode(self, rows: int, seconds: float) -> None:
        self.decode_steps += 1

    def on_token(self, seq: Sequence, now: float) -> None:
        pass

    def on_fault(self, message: str) -> None:
        self.faults += 1

    def on_finish(self, seq: Sequence, reason: str) -> None:
        self.finished[reason] += 1


def random_seed() -> int:
    return secrets.randbits(31)
