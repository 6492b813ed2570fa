"""A preallocated per-layer KV cache that decode writes in place (the PyTorch backend's cache).

(Not tokenskip.kv_bytes, which computes cache sizes analytically for the server's admission.)

`LayerKV.append` concatenates, so every decode step copies the whole cache of every layer. A
`KVBuffer` is a LayerKV whose fields are views of one preallocated storage per layer (capacity =
prefill length + the tokens still to generate, `pos`/`valid` per row kept): `append` writes the new
keys into the storage and returns a buffer one step longer over the same memory, so a decode step
allocates no cache storage. run_block, the decode graph wrappers and the threshold-skip step see
an ordinary LayerKV (key/value [B,nkv,T,d], pos/valid [B,T]); nothing else changes.

Semantics kept from LayerKV: appending never changes what an existing object shows (its views end
at its own length). Should an older state be extended a second time (a branch, e.g. several
answer choices decoded from one prompt cache), the storage is already taken, and that append
falls back to concatenation (correct, just not in place). Past capacity the storage grows (a new
storage, amortised), so the capacity is a hint, never a limit.

Static mode (`make_static`, for CUDA-graph decode): the buffer shows its whole capacity (static
shapes; unwritten slots are valid=False, zero keys) and `append` writes at a device-side slot
counter that the step itself advances, so a captured step replays with no host work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .block import LayerKV

DEFAULT_NEW_TOKENS = 64  # room reserved when the caller does not say how many tokens will follow


class KVStore:
    """The storage of one layer's cache: key/value [B,nkv,C,d], pos [B,C] int64, valid [B,C] bool."""

    def __init__(self, like: LayerKV, capacity: int) -> None:
        b, n, t, d = like.key.shape
        if capacity < t:
            raise ValueError(f"capacity {capacity} < cache length {t}")
        # zeros, not empty: static mode attends over unwritten slots (masked), and 0 * NaN garbage is NaN
        self.key = like.key.new_zeros(b, n, capacity, d)
        self.value = like.value.new_zeros(b, n, capacity, like.value.shape[-1])
        self.pos = like.pos.new_zeros(b, capacity)
        self.valid = like.valid.new_zeros(b, capacity)
        self.key[:, :, :t] = like.key
        self.value[:, :, :t] = like.value
        self.pos[:, :t] = like.pos
        self.valid[:, :t] = like.valid
        self.length = t  # columns written (host-side; a CUDA-graph replay advances it explicitly)
        self.slot: Tensor | None = None  # static mode: [1] int64 on the device, == length

    @property
    def capacity(self) -> int:
        return self.key.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.key, self.value, self.pos, self.valid))

    def write(self, new: LayerKV) -> None:
        """Write `new` (n columns) at the current length, in place."""
        n, at = new.key.shape[2], self.length
        if self.slot is None:
            self.key[:, :, at:at + n] = new.key
            self.value[:, :, at:at + n] = new.value
            self.pos[:, at:at + n] = new.pos
            self.valid[:, at:at + n] = new.valid
        else:  # the column comes from the device counter, so a replayed graph writes the next one
            cols = self.slot + torch.arange(n, device=self.slot.device)  # [n]
            self.key.index_copy_(2, cols, new.key)
            self.value.index_copy_(2, cols, new.value)
            self.pos.index_copy_(1, cols, new.pos)
            self.valid.index_copy_(1, cols, new.valid)
            self.slot.add_(n)
        self.length = at + n

    def make_static(self) -> None:
        if self.slot is None:
            self.slot = torch.tensor([self.length], dtype=torch.int64, device=self.key.device)

    def snapshot(self) -> tuple:
        """What a trial step changes (restore it after CUDA-graph warm-up and capture)."""
        return self.length, self.pos.clone(), self.valid.clone(), None if self.slot is None else self.slot.clone()

    def restore(self, snap: tuple) -> None:
        self.length = snap[0]
        self.pos.copy_(snap[1])
        self.valid.copy_(snap[2])
        if snap[3] is not None:
            self.slot.copy_(snap[3])


class KVBuffer(LayerKV):
    """A LayerKV over a KVStore: its first `length` columns (all of them in static mode)."""

    def __init__(self, store: KVStore, length: int) -> None:
        self.store, self.upto = store, length
        end = store.capacity if store.slot is not None else length
        super().__init__(store.key[:, :, :end], store.value[:, :, :end], store.pos[:, :end], store.valid[:, :end])

    def append(self, other: LayerKV) -> LayerKV:
        st = self.store
        need = st.length + other.key.shape[2]
        if st.slot is None and self.upto != st.length:  # this state was already extended: branch by copying
            return LayerKV.append(self, other)
        if need > st.capacity:  # grow into a new (dynamic) store; amortised
            used = LayerKV(st.key[:, :, :st.length], st.value[:, :, :st.length], st.pos[:, :st.length],
                           st.valid[:, :st.length])
            st = KVStore(used, need + max(DEFAULT_NEW_TOKENS, st.length // 2))
        st.write(other)  # static mode: the store is the state, advanced in place
        return KVBuffer(st, st.length)

    @property
    def length(self) -> int:
        """Columns written (in static mode the store's current length: every view shows the state)."""
        return self.store.length if self.store.slot is not None else self.upto

    @property
    def nbytes(self) -> int:
        """The storage held (capacity, not just the used columns)."""
        return self.store.nbytes


def preallocate(cache: list[LayerKV | None], new_tokens: int = DEFAULT_NEW_TOKENS) -> list[KVBuffer | None]:
    """A prefill cache (per-layer LayerKV, None for removed blocks) copied into buffers with room
    for `new_tokens` more tokens per layer (each layer keeps its own length: kv_policy=skip caches
    only kept tokens)."""
    return [None if kv is None else KVBuffer(KVStore(kv, kv.length + max(0, new_tokens)), kv.length)
            for kv in cache]


def stores(cache) -> list[KVStore]:
    """The KVStores behind a cache (empty when it holds plain LayerKVs)."""
    return [kv.store for kv in cache if isinstance(kv, KVBuffer)]

