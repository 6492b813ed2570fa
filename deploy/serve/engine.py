"""The engine: one backend, one scheduler on one thread, and an asyncio face for the HTTP layer.

Backends run blocking numerical code (PyTorch, ONNX Runtime, TensorRT all release the GIL
inside their kernels), so the scheduler gets a thread of its own and the event loop stays free to
accept requests and stream tokens. Each request's events cross back to the loop through
`call_soon_threadsafe` onto its own asyncio.Queue. Leaving the async iterator early (the client
disconnected, a stop string matched) aborts the sequence: the scheduler drops its cache rows
before the next step. Anything else that needs the backend (a prompt-scoring pass) runs on the
engine thread too (`AsyncEngine.call`): the event loop never touches backend state.

Health: "ok"; "draining" after `drain()` (a SIGTERM: the requests in flight finish, new ones get
503); "failed" after repeated faults or a dead engine thread (503 until the process restarts).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from ..runtime.generation import Sampling
from .metrics import PromStats
from .model_info import ModelInfo
from .protocol import ServeError
from .scheduler import Event, Scheduler, Sequence, Unavailable


@dataclass(frozen=True)
class EngineSettings:
    """Batching and admission knobs (the `tokenskip serve` flags of the same names)."""

    max_batch: int = 32  # rows in the running batch
    max_waiting: int = 256  # bounded queue: one more request gets a 429
    kv_cache_gb: float | None = None  # KV budget (analytic bytes, tokenskip.kv_bytes); None = unlimited
    continuous: bool = True  # join new requests between decode steps (else dynamic batching)
    batch_wait_ms: float = 5.0  # gather requests arriving together into one prefill
    max_tokens_default: int = 256  # cap when a chat request gives no max_tokens
    max_body_bytes: int | None = None  # request bodies past this get a 413; None: api_server.body_limit's default
    max_step_tokens: int | None = 512  # prompt + decode tokens per step (chunked prefill); None: off
    request_timeout_s: float | None = None  # a request past this ends with a 504 error; None: no deadline
    fault_limit: int = 3  # engine faults within a minute that mark the engine failed

    @property
    def kv_budget(self) -> int | None:
        return None if self.kv_cache_gb is None else int(self.kv_cache_gb * 2**30)


class AsyncEngine:
    def __init__(self, backend, tokenizer, info: ModelInfo, settings: EngineSettings = EngineSettings()) -> None:
        self.backend, self.tokenizer, self.info, self.settings = backend, tokenizer, info, settings
        self.stats = PromStats(info, settings.kv_budget)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)
        self.scheduler = Scheduler(backend, pad_id=self.pad_id, max_batch=settings.max_batch,
                                   max_waiting=settings.max_waiting, kv_budget=settings.kv_budget,
                                   continuous=settings.continuous, batch_wait_s=settings.batch_wait_ms / 1000,
                                   max_step_tokens=settings.max_step_tokens, fault_limit=settings.fault_limit,
                                   stats=self.stats)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self.scheduler.serve_forever, args=(self._stop,),
                                            name="tokenskip-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.scheduler._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        """The engine takes new work: its thread runs, it has not failed and is not draining."""
        return self.state == "ok"

    @property
    def state(self) -> str:
        """ok | draining | failed | stopped (no engine thread)."""
        if self._thread is None or not self._thread.is_alive():
            return "failed" if self.scheduler.state == "failed" else "stopped"
        return self.scheduler.state

    def refusal(self) -> ServeError:
        """The 503 a request gets while the engine takes no new work."""
        if self.state == "stopped":
            return ServeError(503, "the engine has stopped: this server cannot generate any more (see its log)",
                              "server_error", code="engine_stopped")
        exc = self.scheduler.unavailable()
        return ServeError(503, str(exc), "server_error", code=exc.code)

    def drain(self) -> None:
        """Take no new work (503); the requests in flight and in the queue run to their end."""
        if self.scheduler.state == "ok":
            self.scheduler.state = "draining"

    def wait_idle(self, timeout: float) -> bool:
        """After drain(): True once nothing runs or waits, False at the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.scheduler.idle or self.state in ("failed", "stopped"):
                return True
            time.sleep(0.02)
        return False

    async def call(self, fn, *args):
        """fn(*args) on the engine thread, between two steps; awaited here."""
        if not self.alive and self.state != "draining":
            raise self.refusal()
        return await asyncio.wrap_future(self.scheduler.call(fn, *args))

    # -- requests -----------------------------------------------------------------------------
    def submit(self, rid: str, prompt: list[int], sampling: Sampling, eos: frozenset[int],
               kv_bytes: int = 0, logprobs: int | None = None) -> "RequestHandle":
        """Queue one sequence (call on the event loop). Raises QueueFull / ValueError / a 503
        ServeError (draining, failed) at once."""
        if self.state == "stopped":
            raise self.refusal()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        timeout = self.settings.request_timeout_s
        seq = Sequence(rid=rid, prompt=list(prompt), sampling=sampling, emit=emit, eos=eos, kv_bytes=kv_bytes,
                       logprobs=logprobs)
        seq.deadline = None if timeout is None else seq.arrival + timeout
        try:
            self.scheduler.submit(seq)
        except Unavailable as exc:
            raise ServeError(503, str(exc), "server_error", code=exc.code) from None
        return RequestHandle(self.scheduler, seq, queue)

    def health(self) -> dict:
        s = self.scheduler
        return {"status": self.state, "pid": os.getpid(), "waiting": s.waiting, "running": s.running,
                "max_batch": s.max_batch, "max_waiting": s.max_waiting, "kv_reserved_bytes": s.kv_used,
                "kv_budget_bytes": s.kv_budget, "batching": self.batching, "max_step_tokens": s.max_step_tokens,
                "chunked_prefill": s.chunking if s.ops_known else None, "faults": s.stats.faults,
                "last_fault": s.last_fault}

    @property
    def batching(self) -> str:
        s = self.scheduler
        if not s.continuous:
            return "dynamic"
        if s.ops_known and s.ops is None:
            return "dynamic (this backend's cache has no row operations)"
        return "continuous"


class RequestHandle:
    """One submitted sequence: iterate its events; leaving early (disconnect, stop string) aborts it."""

    def __init__(self, scheduler: Scheduler, seq: Sequence, queue: "asyncio.Queue[Event]") -> None:
        self.scheduler, self.seq, self.queue = scheduler, seq, queue

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self.queue.get()
                yield event
                if event.finish is not None:
                    return
        finally:
            self.abort()

    def abort(self, reason: str = "abort") -> None:
        """Free the row: "abort" when the client left, "stop" when a stop string ended the text."""
        if self.seq.finish is None:
            self.scheduler.abort(self.seq.rid, reason)
