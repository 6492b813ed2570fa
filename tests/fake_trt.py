"""A stand-in for the TensorRT 10 Python API (the calls deploy/runtime/trt_backend.py makes), for testing the
runtime on a machine with no GPU.

The fake engine really runs: `execute_async_v3` reads its inputs and writes its outputs through the
raw addresses and shapes the runtime bound (CPU memory here, via ctypes), like TensorRT does with
device memory. Its toy model: in every layer the last k(S) tokens of a call are "kept" and become
that layer's new cache rows (key = token id + 100 * layer, value = 2 * key, pos, valid = mask);
the logits one-hot the sum of every valid cached key (past and new) modulo the vocabulary. A
reference with plain growing lists (`ToyReference`) computes the same, so the runtime's cache
handling (which past it feeds, where the new rows land) can be checked step by step. Every
execution and every copy the runtime makes through the device is logged with the stream it was on.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import math
import types

import numpy as np
import torch

NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    INT64 = 5
    BF16 = 6


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


def memory(ptr: int, shape, dtype) -> np.ndarray:
    """A writable numpy view of `shape` elements of `dtype` at address `ptr`."""
    shape = tuple(int(d) for d in shape)
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype)
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class Spec:
    """The toy engine's shape: layers, KV heads, head dim, vocabulary, keep fraction per layer."""

    def __init__(self, layers=(0, 1, 2), heads=2, head_dim=4, vocab=97, keep=None, max_seq=64, max_batch=4,
                 profiles=("prefill", "decode")):
        self.layers, self.heads, self.head_dim, self.vocab = list(layers), heads, head_dim, vocab
        self.profiles = list(profiles)
        self.keep = keep or {li: (1, 1) for li in self.layers}  # (num, den)
        self.max_seq, self.max_batch = max_seq, max_batch

    def kept(self, layer: int, seq: int) -> int:
        num, den = self.keep[layer]
        return min(seq, max(1, -(-num * seq // den)))


class FakeEngine:
    def __init__(self, spec: Spec, log: list, module) -> None:
        self.spec, self.log, self.module = spec, log, module
        s = spec
        self.io = {"input_ids": ("INPUT", "INT64", [-1, -1]), "attention_mask": ("INPUT", "INT64", [-1, -1]),
                   "position_ids": ("INPUT", "INT64", [-1, -1])}
        for li in s.layers:
            self.io.update({f"past.{li}.key": ("INPUT", "FLOAT", [-1, -1, s.heads, s.head_dim]),
                            f"past.{li}.value": ("INPUT", "FLOAT", [-1, -1, s.heads, s.head_dim]),
                            f"past.{li}.pos": ("INPUT", "INT64", [-1, -1]),
                            f"past.{li}.valid": ("INPUT", "BOOL", [-1, -1])})
        self.io["logits"] = ("OUTPUT", "FLOAT", [-1, s.vocab])
        for li in s.layers:
            self.io.update({f"new.{li}.key": ("OUTPUT", "FLOAT", [-1, -1, s.heads, s.head_dim]),
                            f"new.{li}.value": ("OUTPUT", "FLOAT", [-1, -1, s.heads, s.head_dim]),
                            f"new.{li}.pos": ("OUTPUT", "INT64", [-1, -1]),
                            f"new.{li}.valid": ("OUTPUT", "BOOL", [-1, -1])})
            if s.keep[li] != (1, 1):
                self.io[f"index.{li}"] = ("OUTPUT", "INT64", [-1, -1])
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(spec.profiles)
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode[self.io[name][0]]

    def get_tensor_dtype(self, name):
        return DataType[self.io[name][1]]

    def get_tensor_shape(self, name):
        return list(self.io[name][2])

    def get_tensor_profile_shape(self, name, profile):
        s = self.spec
        decode = s.profiles[profile] == "decode"
        lo, hi = [], []
        for axis, d in enumerate(self.io[name][2]):
            if d > 0:
                lo.append(d); hi.append(d)
            elif name.startswith("past.") and axis == 0:
                lo.append(1 if decode else 0); hi.append(s.max_seq)
            elif axis == 1 and name.startswith("past.") or axis == 0 and not name.startswith("past."):
                lo.append(1); hi.append(s.max_batch)
            else:  # the new tokens
                lo.append(1); hi.append(1 if decode else s.max_seq)
        return lo, lo, hi

    def get_device_memory_size_for_profile_v2(self, p):
        return 1024 * (p + 1)

    def create_execution_context(self, strategy=None):
        ctx = FakeContext(self, strategy)
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.shapes, self.addresses, self.profile, self.device_memory = {}, {}, None, None

    def _stream(self, stream):
        """The stream a call was made on: its handle, if the device's stream was current."""
        device = getattr(self.engine.module, "device", None)
        return stream if device is None or device.active else None

    def set_optimization_profile_async(self, p, stream):
        self.profile = p
        self.engine.log.append(("profile", p, self._stream(stream)))

    def set_device_memory(self, ptr, size):
        self.device_memory = (ptr, size)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        s = self.engine.spec
        bsz, seq = self.shapes["input_ids"]
        if name == "logits":
            return [bsz, s.vocab]
        layer = int(name.split(".")[1])
        k = s.kept(layer, seq)
        if name.startswith("index."):
            return [bsz, k]
        return [k, bsz, s.heads, s.head_dim] if name.endswith((".key", ".value")) else [k, bsz]

    def _view(self, name, shape=None):
        dt = NP[self.engine.io[name][1]]
        return memory(self.addresses[name], shape or self.shapes[name], dt)

    def execute_async_v3(self, stream):
        eng, s = self.engine, self.engine.spec
        eng.log.append(("execute", self.profile, self._stream(stream), dict(self.addresses), dict(self.shapes)))
        ids, mask, pos = (self._view(n) for n in ("input_ids", "attention_mask", "position_ids"))
        bsz, seq = ids.shape
        total = np.zeros(bsz)
        for li in s.layers:
            k = s.kept(li, seq)
            src = np.arange(seq - k, seq)
            key = ids[:, src].T.astype(np.float32) + 100 * li  # [k,B]
            outs = {"key": np.broadcast_to(key[:, :, None, None], (k, bsz, s.heads, s.head_dim)),
                    "value": np.broadcast_to(2 * key[:, :, None, None], (k, bsz, s.heads, s.head_dim)),
                    "pos": pos[:, src].T, "valid": mask[:, src].T.astype(bool)}
            for f, v in outs.items():
                self._view(f"new.{li}.{f}", self.get_tensor_shape(f"new.{li}.{f}"))[...] = v
            if f"index.{li}" in eng.io:
                self._view(f"index.{li}", (bsz, k))[...] = src[None, :]
            pk, pv = self._view(f"past.{li}.key")[:, :, 0, 0], self._view(f"past.{li}.valid")
            total += (pk * pv).sum(0) + (key * outs["valid"]).sum(0)
        logits = self._view("logits", (bsz, s.vocab))
        logits[...] = 0
        logits[np.arange(bsz), total.astype(np.int64) % s.vocab] = 1
        return True


class FakeRuntime:
    def __init__(self, module, logger) -> None:
        self.module = module

    def deserialize_cuda_engine(self, data: bytes):
        return None if data == b"corrupt" else FakeEngine(self.module.spec, self.module.log, self.module)


def fake_trt_module(spec: Spec) -> types.SimpleNamespace:
    """An object with the attributes of the `tensorrt` module the runtime uses."""
    mod = types.SimpleNamespace(spec=spec, log=[], loaded_libraries=[])
    mod.DataType, mod.TensorIOMode = DataType, TensorIOMode
    mod.Logger = types.SimpleNamespace(WARNING=2)
    mod.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})
    mod.Runtime = lambda logger: FakeRuntime(mod, logger)
    mod.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC=0, USER_MANAGED=2)
    registry = types.SimpleNamespace(load_library=lambda path: mod.loaded_libraries.append(path) or object())
    mod.get_plugin_registry = lambda: registry
    mod.__version__ = "10.fake"
    return mod


class FakeDevice:
    """The runtime's device on the CPU: one numbered 'stream', logged copies."""

    handle = 0xBEEF

    def __init__(self, module) -> None:
        self.torch = torch.device("cpu")
        self.log = module.log
        self.active = False
        module.device = self  # the fake contexts report whether this stream was current

    @contextlib.contextmanager
    def on_stream(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def copy(self, dst, src):
        self.log.append(("copy", self.handle if self.active else None))
        dst.copy_(src)


class ToyReference:
    """The fake engine's model computed with growing Python lists: the expected logits."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec

    def prefill(self, ids, mask):
        cache = {li: [] for li in self.spec.layers}  # layer -> [(key [B], valid [B])]
        return self._step(ids, mask, cache), cache

    def decode(self, token, position, cache):
        return self._step(token, torch.ones_like(token), cache), cache

    def _step(self, ids, mask, cache):
        s = self.spec
        bsz, seq = ids.shape
        total = torch.zeros(bsz, dtype=torch.float64)
        for li in s.layers:
            k = s.kept(li, seq)
            for t in range(seq - k, seq):
                cache[li].append((ids[:, t].double() + 100 * li, mask[:, t].bool()))
            total += sum(key * valid for key, valid in cache[li])
        logits = torch.zeros(bsz, s.vocab)
        logits[torch.arange(bsz), total.long() % s.vocab] = 1
        return logits

    def check_length(self, prompt, new):
        pass
