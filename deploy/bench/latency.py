"""Routed vs dense speed, measured side by side in one process (benchmarks.md, Speed).

For every (sequence length, batch, sparsity): dense and routed prefill are timed alternately
(dense, routed, routed, dense, ...) after warm-up (tokenskip.timing.alternate), so drift and noise
hit both alike. Reported:
median and p90 latency, tokens/s, measured speed-up (dense / routed), the ideal speed-up from the
FLOP count (tokenskip.flops, prefill, no scored tail) and efficiency = measured / ideal. Decode:
time per output token through the KV cache after a dense or a routed prefill.

The router + feature overhead (learned router: its MLP, the feature computation and the
attention-score window inside each executed block) is timed by instrumenting those calls during
routed prefills, and reported as a fraction of dense prefill time.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from tokenskip.flops import routed_flops_ratio
from tokenskip.timing import Timer, alternate, median, self_timed

from ..quality.decode_eval import as_dense


@dataclass
class BenchRow:
    backend: str
    seq: int
    batch: int
    sparsity: float  # requested overall sparsity (uniform schedule) or the routers folder's
    achieved: float  # skipped (token, block) pairs / all, exact integer keep counts at this S
    kv_policy: str
    router: str
    dense_ms: float  # median prefill latency
    dense_p90_ms: float
    routed_ms: float
    routed_p90_ms: float
    dense_tok_s: float
    routed_tok_s: float
    speedup: float  # dense / routed, medians
    ideal: float  # 1 / (routed FLOPs / dense FLOPs)
    efficiency: float  # speedup / ideal
    dense_decode_ms: float = float("nan")  # per output token, KV cache, after dense prefill
    routed_decode_ms: float = float("nan")  # per output token after routed prefill
    repeats: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def ideal_speedup(routed, seq: int) -> float:
    return 1.0 / routed_flops_ratio(routed, seq)


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)  # [B,S]
    return ids, torch.ones_like(ids)


def _decode_loop(backend, ids, mask, steps: int, timer: Timer) -> Callable[[], float]:
    """A callable that prefills once (untimed), then returns the mean time of `steps` decode steps."""
    def run() -> float:
        logits, cache = backend.prefill(ids, mask)
        bsz, seq = ids.shape

        def decode():
            nonlocal logits, cache
            for i in range(steps):
                token = logits.argmax(-1).view(bsz, 1)
                position = torch.full((bsz, 1), seq + i, dtype=torch.int64)
                logits, cache = backend.decode(token, position, cache)

        return timer(decode) / steps
    return run


def measure(backend_name: str, dense, routed, routed_model, seq: int, batch: int, sparsity: float, repeats: int,
            warmup: int, decode_steps: int = 8, sync: Callable[[], None] | None = None) -> BenchRow:
    """Time dense vs routed `backends` (objects with prefill/decode) at one shape. `sync` drains the
    device around every timed call (torch.cuda.synchronize on a GPU)."""
    vocab = routed_model.model.config.vocab_size
    ids, mask = random_batch(vocab, batch, seq)
    timer = Timer(sync)
    times = alternate({"dense": lambda: dense.prefill(ids, mask), "routed": lambda: routed.prefill(ids, mask)},
                      repeats, warmup, timer)
    d, r = times.median("dense"), times.median("routed")
    ideal = ideal_speedup(routed_model, seq)
    row = BenchRow(backend=backend_name, seq=seq, batch=batch, sparsity=sparsity,
                   achieved=routed_model.schedule.overall(seq) if routed_model.router is not None else 0.0,
                   kv_policy=routed_model.kv_policy,
                   router=type(routed_model.router).__name__.replace("Router", "").lower() or "dense",
                   dense_ms=1e3 * d, dense_p90_ms=1e3 * times.p90("dense"), routed_ms=1e3 * r,
                   routed_p90_ms=1e3 * times.p90("routed"), dense_tok_s=batch * seq / d,
                   routed_tok_s=batch * seq / r, speedup=d / r, ideal=ideal, efficiency=(d / r) / ideal,
                   repeats=repeats)
    if decode_steps > 0:  # each round prefills (untimed) and times its decode steps itself
        loops = {"dense": _decode_loop(dense, ids, mask, decode_steps, timer),
                 "routed": _decode_loop(routed, ids, mask, decode_steps, timer)}
        dec = alternate(loops, max(1, min(3, repeats)), 0, self_timed)
        row.dense_decode_ms = 1e3 * dec.median("dense")
        row.routed_decode_ms = 1e3 * dec.median("routed")
    return row


# ------------------------------------------------------------------------- torch backend helpers
class DenseTorch:
    """The routed model's own code path with routing off (router None): a fair dense baseline."""

    name = "torch-dense"

    def __init__(self, routed) -> None:
        self.routed = routed
        self.device = next(routed.model.parameters()).device

    @torch.no_grad()
    def prefill(self, ids, mask):
        with as_dense(self.routed):
            return self.routed.prefill(ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def decode(self, token, position, cache):
        return self.routed.decode_step(token.to(self.device), position.to(self.device), cache)


class RoutedTorch(DenseTorch):
    name = "torch-routed"

    @torch.no_grad()
    def prefill(self, ids, mask):
        return self.routed.prefill(ids.to(self.device), mask.to(self.device))


# -------------------------------------------------------------------- router + feature overhead
@contextlib.contextmanager
def time_router_calls(routed, sync: Callable[[], None] | None = None):
    """Accumulate wall time spent in router.scores (features + MLP) and in the attention-score
    window of executed blocks, while the block is active. Yields a dict of seconds."""
    import tokenskip.block as block

    spent = {"router": 0.0, "window": 0.0}
    orig_scores = routed.router.scores
    orig_window = block.window_attention_scores
    timer = Timer(sync)

    def scores(ctx):
        out, seconds = timer.measure(lambda: orig_scores(ctx))
        spent["router"] += seconds
        return out

    def window(*args, **kw):
        out, seconds = timer.measure(lambda: orig_window(*args, **kw))
        spent["window"] += seconds
        return out

    routed.router.scores = scores
    block.window_attention_scores = window
    try:
        yield spent
    finally:
        del routed.router.scores
        block.window_attention_scores = orig_window


@torch.no_grad()
def router_overhead(routed, seq: int, batch: int = 1, repeats: int = 5, warmup: int = 1,
                    sync: Callable[[], None] | None = None) -> dict:
    """Router + feature time per routed prefill, as a fraction of the dense prefill median.

    `routed` should carry the learned router (its cost does not depend on the weights)."""
    ids, mask = random_batch(routed.model.config.vocab_size, batch, seq)
    device = next(routed.model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    dense, rt = DenseTorch(routed), RoutedTorch(routed)
    times = alternate({"dense": lambda: dense.prefill(ids, mask), "routed": lambda: rt.prefill(ids, mask)},
                      repeats, warmup, Timer(sync))
    parts = {"router": [], "window": []}
    for _ in range(repeats):
        with time_router_calls(routed, sync) as spent:
            rt.prefill(ids, mask)
        for k in parts:
            parts[k].append(spent[k])
    d = times.median("dense")
    router_s, window_s = median(parts["router"]), median(parts["window"])
    return {"seq": seq, "batch": batch, "router": type(routed.router).__name__, "dense_ms": 1e3 * d,
            "routed_ms": 1e3 * times.median("routed"), "router_ms": 1e3 * router_s,
            "window_ms": 1e3 * window_s, "overhead": (router_s + window_s) / d,
            "router_only": router_s / d, "window_only": window_s / d}


def format_table(rows: list[BenchRow]) -> str:
    head = ("| backend | S | B | sparsity | kv | router | dense ms (p90) | routed ms (p90) | dense tok/s | "
            "routed tok/s | speed-up | ideal | efficiency | decode ms/tok dense | routed |")
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    out = [head, sep]
    for r in rows:
        out.append(f"| {r.backend} | {r.seq} | {r.batch} | {r.sparsity:.2f} ({r.achieved:.3f}) | {r.kv_policy} | "
                   f"{r.router} | {r.dense_ms:.1f} ({r.dense_p90_ms:.1f}) | {r.routed_ms:.1f} ({r.routed_p90_ms:.1f}) | "
                   f"{r.dense_tok_s:.0f} | {r.routed_tok_s:.0f} | {r.speedup:.2f}x | {r.ideal:.2f}x | "
                   f"{r.efficiency:.2f} | {r.dense_decode_ms:.2f} | {r.routed_decode_ms:.2f} |")
    return "\n".join(out)
