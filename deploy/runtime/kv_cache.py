"""A preallocated KV cache written in place, shared by the ONNX Runtime and TensorRT backends.

One buffer per layer and field, sequence-major like the exported graph's I/O (docs/export.md):
key/value `[capacity, B, nkv, d]`, pos `[capacity, B]` int64, valid `[capacity, B]` bool. The
first `length[l]` rows are filled. Because the sequence axis is outermost, `buffer[:n]` (the
past the graph reads) and `buffer[n:n + rows]` (the rows a step adds) are contiguous views:
runtimes bind them as graph inputs and outputs directly, so a decode step copies nothing but the
new rows the graph writes. Layers hold different lengths under kv_policy=skip (a routed layer
cached only its kept prompt tokens), and each layer's capacity follows its own length.

Capacity: `KVCache.reserve(rows)` makes room before a call; a layer that is full grows to twice
its capacity (one copy, amortised O(1) per token). Backends size the first allocation from the
`expect_new_tokens(new)` the generation loop announces, so a generation never grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokenskip.errors import UserError

FIELDS = ("key", "value", "pos", "valid")
DEFAULT_NEW_TOKENS = 64  # decode rows allocated after a prefill when no expect_new_tokens announced more


def check_limit(what: str, prompt: int, new: int, limit: int | None,
                hint: str = "shorten the prompt or lower --max-new-tokens") -> None:
    """The one-line error every backend gives for a generation longer than it can hold."""
    if limit and prompt + new > limit:
        raise UserError(f"prompt of {prompt} tokens + {new} new tokens = {prompt + new} exceeds the {what}'s "
                        f"maximum length {limit}: {hint}")


def host_logits(t: Tensor) -> Tensor:
    """A float32 CPU copy the caller owns (the source buffer is reused by the next step). On the
    CPU the copy goes through numpy: torch's intra-op parallel copy of a [B, V] row took 12 ms
    instead of 7 us on the loaded 2-core machine (thread wake-up next to ONNX Runtime's pool)."""
    if t.device.type == "cpu":
        return t.float() if t.dtype != torch.float32 else torch.from_numpy(t.numpy().copy())
    return t.to("cpu", torch.float32)


class PreallocatedBackend:
    """What the ONNX Runtime and TensorRT backends share (base.Backend): the length check, the
    announced generation length the next prefill sizes its cache for, and the cache's bytes."""

    max_length: int | None = None
    limit_what, limit_hint = "export", "shorten the prompt or lower --max-new-tokens"
    new_tokens = DEFAULT_NEW_TOKENS  # decode rows each prefill's cache preallocates

    def check_length(self, prompt: int, new: int) -> None:
        check_limit(self.limit_what, prompt, new, self.max_length, self.limit_hint)

    def expect_new_tokens(self, new: int) -> None:
        self.new_tokens = max(1, new)

    def cache_nbytes(self, cache: "KVCache") -> int:
        return cache.nbytes()


@dataclass
class KVCache:
    buffers: dict[int, dict[str, Tensor]]  # layer -> field -> [capacity, ...] buffer
    length: dict[int, int]  # layer -> filled rows
    extra: dict = field(default_factory=dict)  # backend-owned reusable buffers (logits, outputs)

    @classmethod
    def allocate(cls, rows: dict[int, int], batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> "KVCache":
        """Empty buffers with `rows[l]` capacity for layer l."""
        bufs = {li: {"key": torch.empty(n, batch, heads, head_dim, dtype=dtype, device=device),
                     "value": torch.empty(n, batch, heads, head_dim, dtype=dtype, device=device),
                     "pos": torch.zeros(n, batch, dtype=torch.int64, device=device),
                     "valid": torch.zeros(n, batch, dtype=torch.bool, device=device)}
                for li, n in rows.items()}
        return cls(bufs, {li: 0 for li in rows})

    @property
    def layers(self) -> list[int]:
        return list(self.buffers)

    @property
    def batch(self) -> int:
        return next(iter(self.buffers.values()))["pos"].shape[1]

    def capacity(self, layer: int) -> int:
        return self.buffers[layer]["pos"].shape[0]

    def past(self, layer: int) -> dict[str, Tensor]:
        """The filled rows (contiguous views): what the graph attends over."""
        n = self.length[layer]
        return {f: b[:n] for f, b in self.buffers[layer].items()}

    def slot(self, layer: int, rows: int) -> dict[str, Tensor]:
        """The next `rows` rows (contiguous views): where a call's new cache rows go."""
        n = self.length[layer]
        if n + rows > self.capacity(layer):
            raise RuntimeError(f"layer {layer}: {rows} rows do not fit (length {n}, capacity {self.capacity(layer)}); "
                               "call reserve() first")
        return {f: b[n:n + rows] for f, b in self.buffers[layer].items()}

    def reserve(self, rows: int) -> None:
        """Make room for `rows` more rows in every layer (grow x2, one copy, only when full)."""
        for li, bufs in self.buffers.items():
            need = self.length[li] + rows
            cap = self.capacity(li)
            if need <= cap:
                continue
            new_cap = max(need, 2 * cap)
            n = self.length[li]
            for f, b in bufs.items():
                grown = torch.zeros((new_cap, *b.shape[1:]), dtype=b.dtype, device=b.device)
                grown[:n].copy_(b[:n])
                bufs[f] = grown

    def write(self, layer: int, rows: dict[str, Tensor]) -> None:
        """Copy new rows (seq-major, one entry per field) in after the filled ones and advance."""
        n = rows["pos"].shape[0]
        for f, dst in self.slot(layer, n).items():
            dst.copy_(rows[f], non_blocking=True)
        self.length[layer] += n

    def advance(self, layer: int, rows: int) -> None:
        """Count `rows` rows a graph wrote in place (into `slot(layer, rows)`) as filled."""
        self.length[layer] += rows

    def nbytes(self) -> int:
        """Bytes of cache data held for the batch (filled rows, all fields)."""
        return sum(b[:self.length[li]].nbytes for li, bufs in self.buffers.items() for b in bufs.values())

    def capacity_nbytes(self) -> int:
        """Bytes allocated (filled or not)."""
        return sum(b.nbytes for bufs in self.buffers.values() for b in bufs.values())
