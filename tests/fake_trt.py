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

It enforces what the real TensorRT enforces, and answers the way it does (False / None, never an
exception), so a runtime that ignores return values fails here too:
- the optimisation profiles are the build's own (deploy/engine/plan.py's phase_profiles for the
  same settings); set_input_shape returns False for a shape outside the context's profile, and
  set_optimization_profile_async for a profile that does not exist;
- set_tensor_address returns False for an address that is not 256-byte aligned;
- execute_async_v3 returns False while an input shape or any I/O address is unset, or a
  user-managed context has no device memory;
- the plugin registry's load_library returns None for a file that is not a plugin library or when
  the creators are already registered (TensorRT's rule);
- TensorRT-RTX's runtime config / runtime cache: a cache "compiles" each (profile, shape) once,
  serialises, and refuses (False) a blob it did not write.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
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
    """The toy engine's shape: layers, KV heads, head dim, vocabulary, keep fraction per layer, and
    the build settings its optimisation profiles come from (plan.py, as `tokenskip build`)."""

    def __init__(self, layers=(0, 1, 2), heads=2, head_dim=4, vocab=97, keep=None, max_seq=64, max_batch=4,
                 profiles=("prefill", "decode"), opt_seq=16, opt_batch=1, min_seq=1):
        self.layers, self.heads, self.head_dim, self.vocab = list(layers), heads, head_dim, vocab
        self.profiles = list(profiles)
        self.keep = keep or {li: (1, 1) for li in self.layers}  # (num, den)
        self.max_seq, self.max_batch = max_seq, max_batch
        self.opt_seq, self.opt_batch, self.min_seq = opt_seq, opt_batch, min_seq

    def kept(self, layer: int, seq: int) -> int:
        num, den = self.keep[layer]
        return min(seq, max(1, -(-num * seq // den)))

    def input_dims(self) -> dict[str, list]:
        """The export's input dims (docs/export.md), as `tokenskip build` reads them."""
        dims = {n: ["batch", "seq"] for n in ("input_ids", "attention_mask", "position_ids")}
        for li in self.layers:
            dims.update({f"past.{li}.key": [f"past_{li}", "batch", self.heads, self.head_dim],
                         f"past.{li}.value": [f"past_{li}", "batch", self.heads, self.head_dim],
                         f"past.{li}.pos": [f"past_{li}", "batch"], f"past.{li}.valid": [f"past_{li}", "batch"]})
        return dims

    def build_profiles(self) -> dict:
        """{profile name: {input: [min, opt, max]}}: what `tokenskip build` gives TensorRT."""
        from tokenskip.deploy.engine.plan import BuildSettings, phase_profiles

        s = BuildSettings(min_seq_len=self.min_seq, opt_seq_len=self.opt_seq, max_seq_len=self.max_seq,
                          max_batch=self.max_batch, opt_batch=self.opt_batch,
                          profiles="shared" if self.profiles == ["shared"] else "phases").resolve({})
        built = phase_profiles(self.input_dims(), s)
        assert list(built) == self.profiles, (list(built), self.profiles)
        return built


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
        self.profile_shapes = list(spec.build_profiles().values())  # [profile][input] -> [min, opt, max]
        self.num_optimization_profiles = len(self.profile_shapes)
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
        if not 0 <= profile < len(self.profile_shapes) or name not in self.profile_shapes[0]:
            raise RuntimeError(f"get_tensor_profile_shape({name!r}, {profile}): no such input or profile")
        return [list(s) for s in self.profile_shapes[profile][name]]

    def get_device_memory_size_for_profile_v2(self, p):
        return 1024 * (p + 1)

    def create_execution_context(self, arg=0):
        """(strategy) like TensorRT 10, or (IRuntimeConfig) like TensorRT 10.11+ / TensorRT-RTX."""
        config = arg if isinstance(arg, FakeRuntimeConfig) else None
        ctx = FakeContext(self, config.strategy if config else arg, config)
        self.contexts.append(ctx)
        return ctx

    def create_runtime_config(self):
        return FakeRuntimeConfig()


class FakeRuntimeConfig:
    def __init__(self) -> None:
        self.strategy, self.cache = 0, None

    def set_execution_context_allocation_strategy(self, strategy=0):
        self.strategy = strategy

    def create_runtime_cache(self):
        return FakeRuntimeCache()

    def set_runtime_cache(self, cache=None):
        self.cache = cache
        return isinstance(cache, FakeRuntimeCache)


class FakeRuntimeCache:
    """TensorRT-RTX's runtime cache: the (profile, shape) kernels compiled so far."""

    MAGIC = b"fake-rtx-runtime-cache\n"

    def __init__(self) -> None:
        self.entries: set[str] = set()

    def deserialize(self, blob):
        blob = bytes(blob)
        if not blob.startswith(self.MAGIC):
            return False  # another GPU / driver / version: refused, the cache unchanged
        self.entries = set(json.loads(blob[len(self.MAGIC):]))
        return True

    def serialize(self):
        return memoryview(self.MAGIC + json.dumps(sorted(self.entries)).encode())


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy, config=None) -> None:
        self.engine, self.strategy, self.config = engine, strategy, config
        self.shapes, self.addresses, self.profile, self.device_memory = {}, {}, 0, None  # profile 0 by default

    def _stream(self, stream):
        """The stream a call was made on: its handle, if the device's stream was current."""
        device = getattr(self.engine.module, "device", None)
        return stream if device is None or device.active else None

    def _refuse(self, *what):
        self.engine.log.append(("refused", *what))
        return False

    def set_optimization_profile_async(self, p, stream):
        if not 0 <= p < self.engine.num_optimization_profiles:
            return self._refuse("profile", p)
        self.profile, self.shapes = p, {}  # input shapes are set after the profile is chosen
        self.engine.log.append(("profile", p, self._stream(stream)))
        return True

    def set_device_memory(self, ptr, size):
        if ptr % 256:
            raise ValueError("set_device_memory: 256-byte aligned device memory expected")
        self.device_memory = (ptr, size)

    def set_input_shape(self, name, shape):
        shape = tuple(int(d) for d in shape)
        io = self.engine.io.get(name)
        if io is None or io[0] != "INPUT" or len(shape) != len(io[2]):
            return self._refuse("shape", name, shape)
        lo, _, hi = self.engine.profile_shapes[self.profile][name]
        if not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return self._refuse("shape", name, shape)  # outside the selected profile's [min, max]
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, ptr):
        if name not in self.engine.io or ptr % 256:
            return self._refuse("address", name, ptr)
        self.addresses[name] = ptr
        return True

    def infer_shapes(self):
        return [n for n, io in self.engine.io.items() if io[0] == "INPUT" and n not in self.shapes]

    def get_tensor_shape(self, name):
        s = self.engine.spec
        if self.engine.io[name][0] == "INPUT":
            return list(self.shapes.get(name, self.engine.io[name][2]))
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
        unset = sorted(set(eng.io) - set(self.addresses)) + self.infer_shapes()
        if unset:
            return self._refuse("execute", unset)
        if self.strategy == eng.module.ExecutionContextAllocationStrategy.USER_MANAGED and self.device_memory is None:
            return self._refuse("execute", "no device memory")
        jit = None
        if self.config is not None and self.config.cache is not None:  # TensorRT-RTX: compiles once per shape
            key = f"{self.profile}:{self.shapes['input_ids']}"
            jit = "hit" if key in self.config.cache.entries else "compiled"
            self.config.cache.entries.add(key)
        eng.log.append(("execute", self.profile, self._stream(stream), dict(self.addresses), dict(self.shapes), jit))
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


class FakeRegistry:
    """IPluginRegistry: load_library -> a handle, or None (not a plugin library, or already registered)."""

    MAGIC = b"fake-tokenskip-plugins"

    def __init__(self) -> None:
        self.libraries: dict[int, str] = {}  # id(handle) -> path

    @property
    def all_creators(self):
        return [types.SimpleNamespace(name=op, plugin_version="1", plugin_namespace="tokenskip")
                for _ in self.libraries for op in ("TopKGather", "ScatterTokens")]

    def load_library(self, path):
        with open(path, "rb") as fh:
            if fh.read(len(self.MAGIC)) != self.MAGIC or self.libraries:
                return None
        handle = object()
        self.libraries[id(handle)] = path
        return handle

    def deregister_library(self, handle):
        self.libraries.pop(id(handle), None)


def fake_trt_module(spec: Spec) -> types.SimpleNamespace:
    """An object with the attributes of the `tensorrt` module the runtime uses."""
    mod = types.SimpleNamespace(spec=spec, log=[])
    mod.DataType, mod.TensorIOMode = DataType, TensorIOMode
    mod.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})
    mod.Runtime = lambda logger: FakeRuntime(mod, logger)
    mod.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC=0, USER_MANAGED=2)
    mod.registry = FakeRegistry()
    mod.get_plugin_registry = lambda: mod.registry
    mod.__version__ = "10.fake"
    return mod


class FakeDevice:
    """The runtime's device on the CPU: one numbered 'stream', logged copies."""

    handle = 0xBEEF
    name = "Fake GPU 9000"

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

    stats: dict = {}

    def check_length(self, prompt, new):
        pass

    def expect_new_tokens(self, new):
        pass
