"""Prometheus metrics of one server (GET /metrics), fed by the scheduler's Stats hooks.

Each server gets its own CollectorRegistry, so several apps (tests, Ray replicas in one process)
never clash. Names follow Prometheus conventions (`_total` counters, `_seconds` histograms).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .model_info import ModelInfo
from .sequence import Sequence, Stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class PromStats(Stats):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, info: ModelInfo, kv_budget: int | None = None) -> None:
        super().__init__()
        self.info = info
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tokenskip_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finish_reasons = Counter("tokenskip_sequences_finished_total",
                                "Sequences ended, by reason (stop, length, abort = cancelled, error)", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter("tokenskip_prompt_tokens_total", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("tokenskip_generation_tokens_total", "Tokens generated", registry=r)
        self.queue_depth = Gauge("tokenskip_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("tokenskip_running_sequences", "Sequences in the running batch", registry=r)
        self.kv_reserved = Gauge("tokenskip_kv_cache_reserved_bytes",
                                 "Analytic KV-cache bytes reserved by running sequences", registry=r)
        kv_gauge = Gauge("tokenskip_kv_cache_budget_bytes", "KV-cache budget (0 = unlimited)", registry=r)
        kv_gauge.set(kv_budget or 0)
        self.ttft = Histogram("tokenskip_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tokenskip_time_per_output_token_seconds", "Time between two tokens of a sequence",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_batch = Histogram("tokenskip_prefill_batch_size", "Sequences per prefill",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.decode_batch = Histogram("tokenskip_decode_batch_size", "Rows per decode step",
                                      buckets=BATCH_BUCKETS, registry=r)
        routed = Gauge("tokenskip_routed_blocks", "Decoder blocks that route tokens (0 = dense model)", registry=r)
        routed.set(len(info.routed_layers))
        layers = Gauge("tokenskip_blocks", "Decoder blocks in the model", registry=r)
        layers.set(info.num_layers or 0)
        self.block_runs = Counter("tokenskip_prefill_block_runs_total",
                                  "Sequence x block executions in prefill, routed or dense blocks", ["routed"],
                                  registry=r)
        self.token_blocks = Counter("tokenskip_prefill_token_blocks_total",
                                    "(token, block) pairs of prefill that ran or were skipped, by the schedule's "
                                    "keep count for each prompt's length", ["outcome"], registry=r)
        self.chunk_counter = Counter("tokenskip_prefill_chunks_total", "Prefill chunks of long prompts",
                                     registry=r)
        self.fault_counter = Counter("tokenskip_engine_faults_total",
                                     "Engine-thread exceptions (the sequences in flight ended with an error)",
                                     registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- Stats hooks (engine thread) ----------------------------------------------------------
    def on_queue(self, waiting: int, running: int, kv_used: int) -> None:
        super().on_queue(waiting, running, kv_used)
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.kv_reserved.set(kv_used)

    def on_prefill(self, seqs: list[Sequence], padded_len: int, seconds: float) -> None:
        super().on_prefill(seqs, padded_len, seconds)
        self.prefill_batch.observe(len(seqs))
        n_routed = len(self.info.routed_layers)
        n_layers = self.info.num_layers or 0
        for seq in seqs:
            self.prompt_tokens.inc(len(seq.prompt))
            run, skipped = self.info.token_blocks(len(seq.prompt))
            self.token_blocks.labels("run").inc(run)
            self.token_blocks.labels("skipped").inc(skipped)
        self.block_runs.labels("true").inc(len(seqs) * n_routed)
        self.block_runs.labels("false").inc(len(seqs) * (n_layers - n_routed))

    def on_chunk(self, seq: Sequence, tokens: int, seconds: float) -> None:
        super().on_chunk(seq, tokens, seconds)
        self.chunk_counter.inc()

    def on_fault(self, message: str) -> None:
        super().on_fault(message)
        self.fault_counter.inc()

    def on_decode(self, rows: int, seconds: float) -> None:
        super().on_decode(rows, seconds)
        self.decode_batch.observe(rows)

    def on_token(self, seq: Sequence, now: float) -> None:
        self.generation_tokens.inc()
        if seq.first_token_at is None:
            self.ttft.observe(now - seq.arrival)
        elif seq.last_token_at is not None:
            self.tpot.observe(now - seq.last_token_at)

    def on_finish(self, seq: Sequence, reason: str) -> None:
        super().on_finish(seq, reason)
        self.finish_reasons.labels(reason).inc()
