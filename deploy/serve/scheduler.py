"""The batching scheduler: many requests, one backend, one thread.

Every request becomes a `Sequence` (sequence.py). The scheduler owns the backend (the
deploy/runtime/base.py protocol) and runs on a single engine thread; other threads only `submit`,
`abort` and `call` (a function to run on the engine thread, e.g. a prompt-scoring pass): nothing
else ever touches the backend. Two modes share every line but the admission rule:

- dynamic batching (`continuous=False`): when no batch is running, the waiting sequences (up to
  `max_batch`, within the KV budget) are left-padded into one prefill, then decoded together,
  one step for all rows; a finished row leaves the batch (its cache rows are dropped) and new
  requests wait until the whole batch is done;
- continuous batching (`continuous=True`): between two decode steps, waiting sequences are
  prefilled as a batch of their own and their cache rows joined to the running batch
  (CacheOps.concat), so a new request waits at most one decode step.

Token budget and chunked prefill (`max_step_tokens`, continuous batching only): without it a
prefill always wins over decode, so a 3,000-token prompt stalls every running stream for the
whole prefill. With it, prefill and decode alternate, and the prefill between two decode steps
takes at most `max_step_tokens - running rows` prompt tokens: short prompts are grouped up to
that, and a longer one is prefilled in chunks (`Backend.prefill_chunk`, each chunk routed over
itself, attending to the earlier chunks' cache) when its backend says `chunked_prefill`; it joins
the batch after its last chunk. A backend that cannot prefill with a past prefills the prompt
whole (docs/serving.md, "Chunked prefill").

Continuous batching needs the backend's `cache_ops()`; without them it falls back to dynamic batching.
Every regrouping (a join, a row leaving, a fresh prefill) leaves a preallocated cache with room
for the decode steps until the next regrouping (`sequence.batch_room`), so the steps in between
write in place and allocate nothing.

Admission is against a KV budget: each sequence reserves the analytic bytes of its cache at its
longest (prompt + max_tokens, tokenskip.kv_bytes; a routed model's are smaller under kv_policy=skip).

Faults: any exception on the engine thread (reaping, a cache operation, prefill, decode) ends
the sequences in flight with an error and leaves a fresh, empty cache; the waiting ones go on.
`fault_limit` faults within `FAULT_WINDOW_S` mark the engine failed: every sequence ends with a
503 error and new work is refused (`Unavailable`) until the process is restarted.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Callable

import torch

from ..runtime.base import CacheOps
from ..runtime.generation import left_pad, sample
from .logprobs import token_logprobs
from .sequence import Event, QueueFull, Sequence, Stats, Unavailable, batch_room, chunk_len, random_seed  # noqa

FAULT_WINDOW_S = 60.0


class Scheduler:
    def __init__(self, backend, *, pad_id: int, max_batch: int = 32, max_waiting: int = 256,
                 kv_budget: int | None = None, continuous: bool = True, batch_wait_s: float = 0.005,
                 max_step_tokens: int | None = None, fault_limit: int = 3, stats: Stats | None = None) -> None:
        if max_batch < 1 or max_waiting < 1:
            raise ValueError("max_batch and max_waiting must be >= 1")
        if max_step_tokens is not None and max_step_tokens < 1:
            raise ValueError("max_step_tokens must be >= 1 (None: no token budget)")
        self.backend, self.pad_id = backend, pad_id
        self.max_batch, self.max_waiting, self.kv_budget = max_batch, max_waiting, kv_budget
        self.continuous, self.batch_wait_s = continuous, batch_wait_s
        self.max_step_tokens = max_step_tokens if continuous else None
        self.fault_limit = fault_limit
        self.stats = stats or Stats()
        self.ops: CacheOps | None = None
        self.ops_known = False  # the backend's row operations, read on the engine thread's first step
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._aborted: dict[str, str] = {}  # rid -> reason ("abort", or "stop" for a stop string)
        self._calls: collections.deque[tuple[Callable, Future]] = collections.deque()
        self.state = "ok"  # ok | draining (no new work) | failed (no new work, nothing runs)
        self.last_fault: str | None = None
        self._fault_times: list[float] = []
        # engine-thread state: the running batch, row b <-> rows[b]
        self.rows: list[Sequence] = []
        self.cache = None
        self.positions: list[int] = []  # next decode position per row
        self.partial: Sequence | None = None  # a long prompt between two of its prefill chunks
        self.partial_cache = None
        self._admitted: list[Sequence] = []  # the group a prefill is running for
        self._prefilled_last = False  # with a token budget, prefill and decode alternate
        self.kv_used = 0

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if self.state != "ok":
            raise self.unavailable()
        if self.kv_budget is not None and seq.kv_bytes > self.kv_budget:
            raise ValueError(f"this request needs {seq.kv_bytes / 2**20:.2f} MiB of KV cache "
                             f"(prompt + max_tokens), more than the server's whole budget of "
                             f"{self.kv_budget / 2**20:.2f} MiB: lower max_tokens or shorten the prompt")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the server's queue is full ({self.max_waiting} waiting requests): retry later")
            self._waiting.append(seq)
        self._wake.set()

    def unavailable(self) -> Unavailable:
        if self.state == "draining":
            return Unavailable("the server is shutting down: it finishes the requests in flight and takes no "
                               "new ones", "draining")
        return Unavailable(f"the engine has failed ({self.last_fault or 'it stopped'}): this server cannot "
                           "generate any more (see its log)", "engine_failed")

    def abort(self, rid: str, reason: str = "abort") -> None:
        with self._lock:
            self._aborted.setdefault(rid, reason)  # the first reason wins
        self._wake.set()

    def call(self, fn: Callable, *args) -> Future:
        """Run fn(*args) on the engine thread between two steps (the backend is only touched there)."""
        future: Future = Future()
        if self.state == "failed":
            future.set_exception(self.unavailable())
            return future
        self._calls.append((lambda: fn(*args), future))
        self._wake.set()
        return future

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s.finish is None for s in self.rows) + (self.partial is not None)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self.running and not self._calls

    # -- engine thread ------------------------------------------------------------------------
    def serve_forever(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                if not self.step():
                    self._wake.wait(0.05 if not self._waiting else max(self.batch_wait_s / 2, 0.001))
                    self._wake.clear()
            self._fail_all("abort", None)
        except BaseException as exc:  # the last guard: never leave requests hanging on a dead thread
            self.state, self.last_fault = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._fail_all("error", f"engine stopped: {self.last_fault}", 503, "engine_failed")
            raise

    def step(self) -> bool:
        """One prefill (or prefill chunk) or one decode step. False when there was nothing to do."""
        self._run_calls()
        try:
            did = self._step()
        except Exception as exc:  # a fault ends the sequences in flight, never the engine thread
            self._fault(exc)
            did = True
        self.stats.on_queue(len(self._waiting), self.running, self.kv_used)
        return did

    def _step(self) -> bool:
        self._reap()
        if self.state == "failed":
            return False
        if not self.ops_known:
            self.ops, self.ops_known = self.backend.cache_ops(), True
        if self.rows and self._prefilled_last:
            self._prefilled_last = False
            self._decode()
            return True
        if self._prefill_step():
            self._prefilled_last = self.max_step_tokens is not None  # no budget: prefill keeps winning
            return True
        if self.rows:
            self._decode()
            return True
        return False

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:  # the caller gets it; the engine goes on
                    future.set_exception(exc)

    @property
    def chunking(self) -> bool:
        return (self.max_step_tokens is not None and self.ops is not None
                and bool(getattr(self.backend, "chunked_prefill", False)))

    def _prefill_step(self) -> bool:
        if self.partial is not None:
            self._chunk()
            return True
        if not ((self.continuous and self.ops is not None) or not self.rows):
            return False
        room = None if self.max_step_tokens is None else max(1, self.max_step_tokens - len(self.rows))
        admit = self._admit(room)
        if not admit:
            return False
        if len(admit) == 1 and room is not None and len(admit[0].prompt) > room and self.chunking:
            self.partial = admit[0]
            self._chunk()
        else:
            self._prefill(admit)
        return True

    def _admit(self, tokens: int | None) -> list[Sequence]:
        """FIFO within max_batch, the KV budget and `tokens` prompt tokens (the head always goes:
        chunked, or whole when the backend cannot chunk)."""
        with self._lock:
            if not self._waiting:
                return []
            if not self.rows and len(self._waiting) < self.max_batch and \
                    time.perf_counter() - self._waiting[0].arrival < self.batch_wait_s:
                return []  # gather the requests arriving together into one prefill
            admit, used, prompt = [], self.kv_used, 0
            while self._waiting and len(self.rows) + len(admit) < self.max_batch:
                seq = self._waiting[0]
                if self.kv_budget is not None and used + seq.kv_bytes > self.kv_budget:
                    break  # FIFO: the head waits for budget, nobody overtakes it
                if admit and tokens is not None and prompt + len(seq.prompt) > tokens:
                    break
                admit.append(self._waiting.popleft())
                used += seq.kv_bytes
                prompt += len(seq.prompt)
        for seq in admit:
            seq.reserved = True
        self.kv_used = used
        return admit

    def _reap(self) -> None:
        """Aborted sequences and those past their deadline end here, between two steps."""
        now = time.perf_counter()
        late = lambda s: s.deadline is not None and now > s.deadline  # noqa: E731
        with self._lock:
            gone, self._aborted = self._aborted, {}
            dropped = [s for s in self._waiting if s.rid in gone or late(s)]
            if dropped:
                self._waiting = collections.deque(s for s in self._waiting if s not in dropped)
        live = self.rows + ([self.partial] if self.partial is not None else [])
        for seq in dropped + [s for s in live if s.finish is None and (s.rid in gone or late(s))]:
            if seq.rid in gone:
                self._finish(seq, gone[seq.rid])
            else:
                self._finish(seq, "timeout", f"the request ran past the server's --request-timeout "
                             f"({now - seq.arrival:.1f} s since it arrived)", 504, "request_timeout")
        if self.partial is not None and self.partial.finish is not None:
            self.partial = self.partial_cache = None
        self._compact()

    def _chunk(self) -> None:
        """The next chunk of the partial sequence's prompt; after the last, it joins the batch."""
        seq = self.partial
        start = seq.prefilled
        n = chunk_len(len(seq.prompt) - start, self.max_step_tokens, len(self.rows))
        ids = torch.tensor([seq.prompt[start:start + n]], dtype=torch.int64)  # [1,n]
        t0 = time.perf_counter()
        if start == 0:
            logits, cache = self.backend.prefill(ids, torch.ones_like(ids))  # [1,V]
        else:
            positions = torch.arange(start, start + n, dtype=torch.int64)[None]  # [1,n]
            logits, cache = self.backend.prefill_chunk(ids, positions, self.partial_cache)  # [1,V]
        seq.prefilled += n
        self.stats.on_chunk(seq, n, time.perf_counter() - t0)
        if seq.prefilled < len(seq.prompt):
            self.partial_cache = cache
            return
        self.partial, self.partial_cache = None, None
        self._admitted = [seq]
        self._join([seq], logits, cache, len(seq.prompt), t0)

    def _prefill(self, admit: list[Sequence]) -> None:
        self._admitted = admit
        ids, mask = left_pad([s.prompt for s in admit], self.pad_id)  # [b,S]
        t0 = time.perf_counter()
        logits, cache = self.backend.prefill(ids, mask)  # [b,V]
        self._join(admit, logits, cache, ids.shape[1], t0)

    def _join(self, admit: list[Sequence], logits: torch.Tensor, cache, padded_len: int, t0: float) -> None:
        """Prefilled sequences join the running batch (continuous) or start one."""
        for seq in admit:
            seq.prefilled = len(seq.prompt)
        nxt = self._sample(logits, admit)
        if self.ops is None:
            self.cache = cache
        else:  # room for the decode steps until the next regrouping, so decode never reallocates
            room = batch_room(self.rows + admit)
            self.cache = self.ops.concat([self.cache, cache], room) if self.rows else self.ops.fit(cache, room)
        self.stats.on_prefill(admit, padded_len, time.perf_counter() - t0)
        self.rows += admit
        self.positions += [len(s.prompt) for s in admit]
        self._admitted = []
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

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, status: int = 500,
                code: str | None = None, emitted: bool = False) -> None:
        if seq.finish is not None:
            return
        seq.finish = reason
        if seq.reserved:
            seq.reserved = False
            self.kv_used -= seq.kv_bytes
        self.stats.on_finish(seq, reason)
        if not emitted:
            seq.emit(Event(finish=reason, error=error, status=status, code=code))

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
            self.cache = self.ops.select(self.cache, live, batch_room(self.rows))
            self.positions = [self.positions[b] for b in live]

    def _fault(self, exc: Exception) -> None:
        """An engine-thread exception: the sequences in flight end with a 500 error and the cache
        is dropped (the next prefill starts a fresh one); too many faults in a row: failed."""
        traceback.print_exc(file=sys.stderr)
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.stats.on_fault(message)
        now = time.perf_counter()
        self._fault_times = [t for t in self._fault_times if now - t < FAULT_WINDOW_S] + [now]
        self.last_fault = message
        victims = self.rows + self._admitted + ([self.partial] if self.partial is not None else [])
        for seq in victims:
            self._finish(seq, "error", f"the engine failed while running this request: {message}", 500,
                         "engine_fault")
        self.rows, self.cache, self.positions, self._admitted = [], None, [], []
        self.partial, self.partial_cache, self._prefilled_last = None, None, False
        if len(self._fault_times) >= self.fault_limit:
            self.state = "failed"
            self._fail_all("error", f"the engine failed ({len(self._fault_times)} faults within "
                           f"{FAULT_WINDOW_S:.0f} s, the last: {message}): restart the server", 503, "engine_failed")

    def _fail_all(self, reason: str, error: str | None, status: int = 503, code: str | None = None) -> None:
        """Shutdown or failure: every running and waiting sequence ends with `reason`."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        rest = self.rows + self._admitted + ([self.partial] if self.partial is not None else [])
        for seq in rest + waiting:
            self._finish(seq, reason, error, status, code)
        self.rows, self.cache, self.positions, self._admitted = [], None, [], []
        self.partial, self.partial_cache = None, None
        while self._calls:
            _, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(self.unavailable() if self.state != "ok" else RuntimeError("engine stopped"))
        self.kv_used = 0
