"""The batching scheduler: many requests, one backend, one thread.

Every request becomes a `Sequence`. The scheduler owns the backend (prefill/decode through the
interface of deploy/runtime/torch_backend.py) and runs on a single engine thread; other threads only `submit`
and `abort`. Two modes share every line but the admission rule:

- dynamic batching (`continuous=False`): when no batch is running, the waiting sequences (up to
  `max_batch`, within the KV budget) are left-padded into one prefill, then decoded together,
  one step for all rows; a finished row leaves the batch (its cache rows are dropped) and new
  requests wait until the whole batch is done;
- continuous batching (`continuous=True`): between two decode steps, waiting sequences are
  prefilled as a batch of their own and their cache rows joined to the running batch
  (kv_rows.CacheOps.concat), so a new request waits at most one decode step.

Continuous batching needs the backend's cache row operations (`Backend.cache_ops()`, e.g.
deploy/runtime/kv_rows.py's for PyTorch's LayerKV list and the ONNX Runtime / TensorRT KVCache);
for a backend without them it falls back to dynamic batching, and finished rows then decode
padding until their batch ends (as deploy/runtime/generation.py
does). Every regrouping (a join, a row leaving, a fresh prefill) leaves a preallocated cache with
room for the longest remaining generation in the batch (`Sequence.decode_room`), so the decode
steps in between write in place and allocate nothing. Sampling is deploy/runtime/generation.py's (`sample`,
`row_generators`, `left_pad`): a greedy request gives the same tokens batched or alone.

Admission is against a KV budget: each sequence reserves the analytic bytes of its cache at its
longest (prompt + max_tokens, tokenskip.kv_bytes), released when it finishes. Under
kv_policy=skip a routed model's sequences reserve less, so more of them run at once.
"""

from __future__ import annotations

import collections
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..runtime.generation import Sampling, left_pad, row_generators, sample
from ..runtime.base import CacheOps
from .logprobs import token_logprobs


class QueueFull(Exception):
    """The waiting queue is at its bound (the server answers 429)."""


@dataclass
class Event:
    """What a sequence gets from the engine thread: a token, and/or its end."""

    token: int | None = None
    finish: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    logprob: tuple | None = None  # (log-prob of token, [(id, log-prob)] top alternatives) when asked for


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
    arrival: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    def __post_init__(self) -> None:
        seed = self.sampling.seed
        self.generator = row_generators(seed, [self.seed_offset])[0]

    @property
    def decode_room(self) -> int:
        """Cache rows this sequence's remaining decode steps can add (prefill gives its first token)."""
        return max(0, self.sampling.max_new_tokens - max(1, len(self.tokens)))


class Stats:
    """Hooks the scheduler calls (metrics.py fills them in); the base class only counts."""

    def __init__(self) -> None:
        self.max_running = 0
        self.prefills = 0
        self.decode_steps = 0
        self.finished: collections.Counter = collections.Counter()

    def on_queue(self, waiting: int, running: int, kv_used: int) -> None:
        self.max_running = max(self.max_running, running)

    def on_prefill(self, seqs: list[Sequence], padded_len: int, seconds: float) -> None:
        self.prefills += 1

    def on_decode(self, rows: int, seconds: float) -> None:
        self.decode_steps += 1

    def on_token(self, seq: Sequence, now: float) -> None:
        pass

    def on_finish(self, seq: Sequence, reason: str) -> None:
        self.finished[reason] += 1


def random_seed() -> int:
    return secrets.randbits(31)


class Scheduler:
    def __init__(self, backend, *, pad_id: int, max_batch: int = 32, max_waiting: int = 256,
                 kv_budget: int | None = None, continuous: bool = True, batch_wait_s: float = 0.005,
                 stats: Stats | None = None) -> None:
        if max_batch < 1 or max_waiting < 1:
            raise ValueError("max_batch and max_waiting must be >= 1")
        self.backend, self.pad_id = backend, pad_id
        self.max_batch, self.max_waiting, self.kv_budget = max_batch, max_waiting, kv_budget
        self.continuous, self.batch_wait_s = continuous, batch_wait_s
        self.stats = stats or Stats()
        self.ops: CacheOps | None = None
        self.ops_known = False  # cache layout probed on the first prefill
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._aborted: dict[str, str] = {}  # rid -> reason ("abort", or "stop" for a stop string)
        # engine-thread state: the running batch, row b <-> rows[b]
        self.rows: list[Sequence] = []
        self.cache = None
        self.positions: list[int] = []  # next decode position per row
        self.kv_used = 0

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if self.kv_budget is not None and seq.kv_bytes > self.kv_budget:
            raise ValueError(f"this request needs {seq.kv_bytes / 2**20:.2f} MiB of KV cache "
                             f"(prompt + max_tokens), more than the server's whole budget of "
                             f"{self.kv_budget / 2**20:.2f} MiB: lower max_tokens or shorten the prompt")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the server's queue is full ({self.max_waiting} waiting requests): retry later")
            self._waiting.append(seq)
        self._wake.set()

    def abort(self, rid: str, reason: str = "abort") -> None:
        with self._lock:
            self._aborted.setdefault(rid, reason)  # the first reason wins
        self._wake.set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s.finish is None for s in self.rows)

    # -- engine thread ------------------------------------------------------------------------
    def serve_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.step():
                self._wake.wait(0.05 if not self._waiting else max(self.batch_wait_s / 2, 0.001))
                self._wake.clear()
        self._fail_all("abort", None)

    def step(self) -> bool:
        """One prefill or one decode step. False when there was nothing to do."""
        self._reap_aborted()
        admit: list[Sequence] = []
        try:
            if (self.continuous and self.ops is not None) or not self.rows:
                admit = self._admit()
            if admit:
                self._prefill(admit)
            elif self.rows:
                self._decode()
            else:
                return False
        except Exception as exc:  # a backend failure ends its batch, never the engine thread
            traceback.print_exc(file=sys.stderr)
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            for seq in self.rows + [s for s in admit if s not in self.rows]:
                self._finish(seq, "error", message)
            self.rows, self.cache, self.positions, self.kv_used = [], None, [], 0
        self.stats.on_queue(len(self._waiting), self.running, self.kv_used)
        return True

    def _admit(self) -> list[Sequence]:
        with self._lock:
            if not self._waiting:
                return []
            if not self.rows and len(self._waiting) < self.max_batch and \
                    time.perf_counter() - self._waiting[0].arrival < self.batch_wait_s:
                return []  # gather the requests arriving together into one prefill
            admit, used = [], self.kv_used
            while self._waiting and len(self.rows) + len(admit) < self.max_batch:
                seq = self._waiting[0]
                if self.kv_budget is not None and used + seq.kv_bytes > self.kv_budget:
                    break  # FIFO: the head waits for budget, nobody overtakes it
                admit.append(self._waiting.popleft())
                used += seq.kv_bytes
        self.kv_used = used
        return admit

    def _reap_aborted(self) -> None:
        with self._lock:
            if not self._aborted:
                return
            gone, self._aborted = self._aborted, {}
            dropped = [s for s in self._waiting if s.rid in gone]
            self._waiting = collections.deque(s for s in self._waiting if s.rid not in gone)
        for seq in dropped:
            self._finish(seq, gone[seq.rid])
        for seq in self.rows:
            if seq.rid in gone and seq.finish is None:
                self._finish(seq, gone[seq.rid])
        self._compact()

    def _prefill(self, admit: list[Sequence]) -> None:
        ids, mask = left_pad([s.prompt for s in admit], self.pad_id)  # [b,S]
        t0 = time.perf_counter()
        logits, cache = self.backend.prefill(ids, mask)  # [b,V]
        if not self.ops_known:
            self.ops, self.ops_known = self.backend.cache_ops(), True
        nxt = self._sample(logits, admit)
        if self.ops is None:
            self.cache = cache
        else:  # room for every decode step the batch still needs, so decode never reallocates
            room = max(s.decode_room for s in self.rows + admit)
            # continuous: join the running batch between two decode steps
            self.cache = self.ops.concat([self.cache, cache], room) if self.rows else self.ops.fit(cache, room)
        self.stats.on_prefill(admit, ids.shape[1], time.perf_counter() - t0)
        self.rows += admit
        self.positions += [len(s.prompt) for s in admit]
        for seq, (tok, lp) in zip(admit, nxt):
            self._append(seq, tok, lp)
        self._compact()

    def _decode(self) -> None:
        token = torch.tensor([[s.tokens[-1] if s.finish is None else self.pad_id] for s in self.rows])  # [B,1]
        position = torch.tensor([[p] for p in self.positions], dtype=torch.int64)  # [B,1]
        t0 = time.perf_counter()
        logits, self.cache = self.backend.decode(token, position, self.cache)  # [B,V]
        live = [b for b, s in enumerate(self.rows) if s.finish is None]
        nxt = self._sample(logits[live], [self.rows[b] for b in live])
        self.stats.on_decode(len(self.rows), time.perf_counter() - t0)
        self.positions = [p + 1 for p in self.positions]
        for b, (tok, lp) in zip(live, nxt):
            self._append(self.rows[b], tok, lp)
        self._compact()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, tuple | None]]:
        """One `sample` call per group of rows with the same temperature/top-p -> (token, log-probs)."""
        out = [0] * len(seqs)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault((s.sampling.temperature, s.sampling.top_p), []).append(i)
        for rows in groups.values():
            picked = sample(logits[rows], seqs[rows[0]].sampling, [seqs[i].generator for i in rows])  # [g]
            for i, tok in zip(rows, picked.tolist()):
                out[i] = int(tok)
        return [(t, None if s.logprobs is None else token_logprobs(logits[i], t, s.logprobs))
                for i, (t, s) in enumerate(zip(out, seqs))]

    def _append(self, seq: Sequence, tok: int, logprob: tuple | None = None) -> None:
        now = time.perf_counter()
        seq.tokens.append(tok)
        self.stats.on_token(seq, now)
        seq.first_token_at = seq.first_token_at or now
        seq.last_token_at = now
        finish = "stop" if tok in seq.eos else ("length" if len(seq.tokens) >= seq.sampling.max_new_tokens else None)
        seq.emit(Event(token=tok, finish=finish, logprob=logprob))
        if finish:
            self._finish(seq, finish, emitted=True)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, emitted: bool = False) -> None:
        if seq.finish is not None:
            return
        seq.finish = reason
        if seq in self.rows:
            self.kv_used -= seq.kv_bytes
        self.stats.on_finish(seq, reason)
        if not emitted:
            seq.emit(Event(finish=reason, error=error))

    def _compact(self) -> None:
        """Drop finished rows from the batch (their cache rows too); keep them as padding rows
        when the cache layout has no row operations."""
        live = [b for b, s in enumerate(self.rows) if s.finish is None]
        if len(live) == len(self.rows):
            return
        if not live:
            self.rows, self.cache, self.positions = [], None, []
        elif self.ops is not None:
            self.rows = [self.rows[b] for b in live]
            self.cache = self.ops.select(self.cache, live, max(s.decode_room for s in self.rows))
            self.positions = [self.positions[b] for b in live]

    def _fail_all(self, reason: str, error: str | None) -> None:
        """Shutdown: every running and waiting sequence ends with `reason`."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in self.rows + waiting:
            self._finish(seq, reason, error)
        self.rows, self.cache, self.positions, self.kv_used = [], None, [], 0
