"""TensorRT engine runtime for generation: the same prefill/decode interface as the other backends.

Written against the TensorRT 10 Python API (name-based I/O: set_input_shape, set_tensor_address,
execute_async_v3), for the flavour engine.json records (`tensorrt` or TensorRT-RTX), imported
only when an engine is opened. Device buffers are torch CUDA tensors (no pycuda needed).

One engine holds the weights once and serves prefill (S prompt tokens, empty past) and decode (one
token against the cache): with a "prefill" and a "decode" optimisation profile (the default of
`tokenskip build`), one execution context each, selected per phase, or with one "shared" profile.
The contexts share one activation buffer (they never run at once). Everything is on ONE CUDA
stream: input copies, cache growth, execution and the logits copy-out are all issued on it.

The KV cache is the preallocated `KVCache` (sequence-major, like the graph I/O): the past input
of each layer is bound at the cache buffer's address (only its shape changes from step to step),
and the new-row outputs at the next free slot, so the engine writes K/V in place, except where
that slot is not 256-byte aligned (TensorRT's rule for every I/O address; trt_io.py): then the
rows go to a staging buffer and are copied in. The logits and the token/position inputs use
buffers allocated once per cache and reused every step. Every TensorRT call's result is checked.

Limits come from engine.json (max_batch, max_seq_len; checked against the engine's profiles) and
are enforced with one-line errors naming the build flag; `tokenskip serve --engine` takes its
default --max-batch from there (`serve_max_batch`). TensorRT-RTX engines run with a runtime cache
(its JIT-compiled kernels) persisted next to the engine. The GPU is checked against engine.json's
compute capabilities before deserialising, so an engine built for another GPU fails with one line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tokenskip.errors import UserError
from tokenskip.fileio import read_json
from tokenskip.routed import default_positions

from .base import BackendSpec, CacheOps, Created, ModelFacts, facts_from_sidecar, load_tokenizer, register_backend
from .kv_cache import FIELDS, KVCache, PreallocatedBackend, host_logits
from .kv_rows import SEQ_MAJOR_OPS
from .trt_io import (ALIGNMENT, CudaDevice, RuntimeCache, aligned_empty, bind, check_shapes, copy_all,
                     create_contexts, execute, is_aligned, realign, runtime_cache_path, select_profile, set_input)
from ..engine.flavour import FLAVOURS, Flavour

PHASES = ("prefill", "decode")
PROFILE_SETS = (["shared"], ["prefill", "decode"])  # engine.json's profiles, in engine order

ENGINE_SIDECAR = "engine.json"


def import_tensorrt(flavour: str):
    """The TensorRT module the engine was built with (engine.json's backend), never another one."""
    from ..engine import flavour as flavours

    try:
        return flavours.get_flavour(flavour).trt
    except UserError as exc:
        raise UserError(f"this engine was built with {flavour} (engine.json), which cannot be imported here: "
                        f"{exc.message}") from None


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.BOOL: torch.bool}
    for attr, tdt in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("INT8", torch.int8)):
        if hasattr(trt.DataType, attr):
            table[getattr(trt.DataType, attr)] = tdt
    return table[dt]


def read_engine_dir(engine_dir: str | Path) -> tuple[dict, dict[str, Path]]:
    """(engine.json, {graph: engine path}). engine.json is written last by `tokenskip build`: a
    folder without it is an unfinished build and is refused (its engine files are never guessed)."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise UserError(f"--engine {engine_dir}: no such folder (build one with `tokenskip build EXPORT --out DIR`)")
    path = engine_dir / ENGINE_SIDECAR
    if not path.is_file():
        raise UserError(f"--engine {engine_dir}: no {ENGINE_SIDECAR}, so the build did not finish: run "
                        "`tokenskip build EXPORT --out DIR` again")
    meta = read_json(path, "engine sidecar")
    listed = meta.get("engines") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != "tokenskip-engines" or not isinstance(listed, dict):
        raise UserError(f"{path}: not a tokenskip engine folder sidecar (rebuild with `tokenskip build`)")
    if meta.get("backend") not in FLAVOURS:
        raise UserError(f"{path}: 'backend' is {meta.get('backend')!r}, expected one of {', '.join(FLAVOURS)} "
                        "(rebuild with `tokenskip build`)")
    files: dict[str, Path] = {}
    for part, entry in listed.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise UserError(f"{path}: engines.{part}.file is missing (rebuild with `tokenskip build`)")
        if not (engine_dir / name).is_file():
            raise UserError(f"--engine {engine_dir}: {name} is missing (named in {ENGINE_SIDECAR})")
        files[part] = engine_dir / name
    entry = listed.get("model")
    if set(listed) != {"model"} or list(entry.get("profiles") or []) not in PROFILE_SETS:
        raise UserError(f"{path}: expected one engine 'model' with profiles 'shared' or 'prefill, decode' (built by "
                        "an older tokenskip?): re-export and rebuild with `tokenskip export` / `tokenskip build`")
    return meta, files


def check_gpu(meta: dict, engine_dir: Path) -> None:
    """Refuse, in one line, a GPU the engine was not built for (engine.json's compute_capabilities)."""
    if not torch.cuda.is_available():
        raise UserError(f"--engine {engine_dir}: TensorRT engines need a CUDA GPU and none is visible")
    major, minor = torch.cuda.get_device_capability()
    here = f"{major}.{minor}"
    targets = meta.get("compute_capabilities")
    if not isinstance(targets, list) or not targets:
        raise UserError(f"--engine {engine_dir}: {ENGINE_SIDECAR} records no compute capabilities (built by an "
                        "older tokenskip): rebuild it with `tokenskip build`")
    if here not in targets:
        hint = ("TensorRT-RTX does not run on this GPU: build with --backend tensorrt on this machine"
                if meta.get("backend") == "tensorrt-rtx" else "rebuild it here with `tokenskip build`")
        raise UserError(f"--engine {engine_dir} was built for compute capability {', '.join(map(str, targets))}; "
                        f"this GPU ({torch.cuda.get_device_name()}) is {here}: {hint}")


def serve_max_batch(engine_dir: str | Path, asked: int, given: bool) -> int:
    """`tokenskip serve --engine DIR`'s batch size: engine.json's max_batch unless --max-batch was
    given, and never more than it (one line naming both)."""
    meta, _ = read_engine_dir(engine_dir)
    limit = engine_max_batch(meta, Path(engine_dir))
    if not given:
        return limit
    if asked > limit:
        raise UserError(f"--max-batch {asked}: the engine {engine_dir} runs at most {limit} sequences at once "
                        f"({ENGINE_SIDECAR} max_batch): serve with --max-batch {limit} or less, or rebuild it with "
                        f"`tokenskip build --max-batch {asked}`")
    return asked


def engine_max_batch(meta: dict, engine_dir: Path) -> int:
    value = meta.get("max_batch")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{engine_dir / ENGINE_SIDECAR}: 'max_batch' is {value!r}, expected an integer >= 1 "
                        "(rebuild with `tokenskip build`)")
    return value


@register_backend("trt", features=("bench",))
class TrtBackend(PreallocatedBackend):
    """prefill/decode on one TensorRT engine with a prefill and a decode profile (module docstring)."""

    name = "trt"

    def __init__(self, engine_dir: str | Path, *, device=None) -> None:
        self.dir = Path(engine_dir)
        meta, files = read_engine_dir(self.dir)
        if device is None:
            check_gpu(meta, self.dir)
        trt = self.trt = import_tensorrt(meta["backend"])
        self.meta = meta
        self.device = device = device or CudaDevice()
        logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(logger, "")
        if meta.get("plugin_library"):
            Flavour(meta["backend"], trt).load_plugins(self.dir / meta["plugin_library"])
        self.runtime = trt.Runtime(logger)
        path = files["model"]
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path}: TensorRT could not deserialise the engine (built for another GPU or TensorRT "
                            "version, or its plugin library is not loaded): rebuild it with `tokenskip build`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.layers = sorted(int(n.split(".")[1]) for n in self.inputs if n.startswith("past.") and n.endswith(".key"))
        want = {"input_ids", "attention_mask", "position_ids", *(f"past.{li}.{f}" for li in self.layers for f in FIELDS)}
        if set(self.inputs) != want or "logits" not in self.outputs:
            raise UserError(f"{path}: the engine's inputs/outputs are not a tokenskip export graph's: rebuild it from "
                            "a `tokenskip export` folder")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        key = tuple(self.engine.get_tensor_shape(f"past.{self.layers[0]}.key")) if self.layers else (0, 0, 1, 1)
        self.heads, self.head_dim = int(key[2]), int(key[3])
        self.vocab = int(self.engine.get_tensor_shape("logits")[1])
        self.profiles = list(meta["engines"]["model"]["profiles"])
        if self.engine.num_optimization_profiles != len(self.profiles):
            raise UserError(f"{path}: engine.json lists profiles {', '.join(self.profiles)}, the engine has "
                            f"{self.engine.num_optimization_profiles}: rebuild it with `tokenskip build`")
        # phase -> profile index: both phases use profile 0 with a shared profile
        self.phase_profile = {ph: self.profiles.index(ph) if ph in self.profiles else 0 for ph in PHASES}
        self.bounds = {p: {n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, p))
                           for n in self.inputs} for p in range(len(self.profiles))}
        self._read_limits(meta)
        self.runtime_cache = None
        if meta["backend"] == "tensorrt-rtx":
            self.runtime_cache = RuntimeCache(self.engine, runtime_cache_path(self.dir, device.name))
        self._saved_phases: set[str] = set()
        with self.device.on_stream():
            contexts, self._scratch = create_contexts(trt, self.engine, len(self.profiles), device, self.runtime_cache)
            for p, ctx in enumerate(contexts):
                select_profile(ctx, p, self.profiles[p], device.handle)
            self.contexts = {ph: (p, contexts[p]) for ph, p in self.phase_profile.items()}
            self._empty = aligned_empty((ALIGNMENT,), torch.uint8, device.torch)  # address for 0-size inputs
        self.limit_what = f"engine ({self.dir})"
        self.limit_hint = "shorten the prompt or rebuild with a larger --max-seq-len"
        self.stats: dict = {}

    def _read_limits(self, meta: dict) -> None:
        """max_batch / max_seq_len from engine.json (what `tokenskip serve` reads), checked against the
        engine's own profiles; min_seq_len from the prefill profile."""
        side = self.dir / ENGINE_SIDECAR
        self.max_batch = engine_max_batch(meta, self.dir)
        max_seq = meta.get("max_seq_len")
        if not isinstance(max_seq, int) or max_seq < 1:
            raise UserError(f"{side}: 'max_seq_len' is {max_seq!r}, expected an integer >= 1 (rebuild with "
                            "`tokenskip build`)")
        prefill = self.bounds[self.phase_profile["prefill"]]["input_ids"]  # (min, opt, max) of [B, S]
        batch_max = max(b["input_ids"][2][0] for b in self.bounds.values())
        if batch_max != self.max_batch or prefill[2][1] != max_seq:
            raise UserError(f"{side} says max_batch {self.max_batch}, max_seq_len {max_seq}; the engine's profiles "
                            f"allow batch {batch_max}, prompt {prefill[2][1]}: the folder was mixed up, rebuild it "
                            "with `tokenskip build`")
        self.max_length, self.min_seq_len = max_seq, prefill[0][1]

    def close(self) -> None:
        """Persist TensorRT-RTX's runtime cache (the kernels compiled so far)."""
        if self.runtime_cache is not None:
            self.runtime_cache.save()

    # -- the interface (check_length, cache_nbytes: PreallocatedBackend) ---------------------------------
    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor):
        bsz, seq = ids.shape
        self._check_batch(bsz)
        if not self.min_seq_len <= seq <= self.max_length:
            flag, limit = ("--min-seq-len", self.min_seq_len) if seq < self.min_seq_len else ("--max-seq-len",
                                                                                             self.max_length)
            raise UserError(f"a prompt batch of {seq} tokens (padded) is outside the engine's {flag} {limit} "
                            f"({self.dir / ENGINE_SIDECAR}): rebuild with `tokenskip build {flag} {seq}`")
        dev = self.device
        with dev.on_stream():
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": default_positions(mask.bool())}
            inputs = {n: self._upload(n, t) for n, t in feeds.items()}
            for li in self.layers:
                inputs.update({f"past.{li}.{f}": self._empty_past(f"past.{li}.{f}", bsz) for f in FIELDS})
            ctx = self._set_inputs("prefill", inputs)
            shapes = {n: tuple(ctx.get_tensor_shape(n)) for n in self.outputs}
            bad = [n for n, sh in shapes.items() if any(d < 0 for d in sh)]
            if bad:
                raise UserError(f"{self.dir}: output {bad[0]} has a data-dependent shape {shapes[bad[0]]}; this runtime "
                                "needs output shapes that follow from the input shapes")
            rows = {li: shapes[f"new.{li}.key"][0] for li in self.layers}
            cache = self._allocate_cache({li: n + self.new_tokens for li, n in rows.items()}, bsz)
            outputs = {n: aligned_empty(sh, self.dtypes[n], dev.torch) for n, sh in shapes.items()
                       if not n.startswith("new.")}
            staged = self._new_rows(cache, rows, outputs, {})  # the slots start the buffers: aligned, never staged
            self._execute(ctx, "prefill", inputs, outputs, staged)
            for li in self.layers:
                cache.advance(li, rows[li])
            logits = host_logits(outputs["logits"])
        self._persist("prefill")
        return logits, cache

    @torch.no_grad()
    def decode(self, token: Tensor, position: Tensor, cache: KVCache):
        bsz = token.shape[0]
        self._check_batch(bsz)
        dev = self.device
        with dev.on_stream():
            cache.reserve(1)
            for bufs in cache.buffers.values():  # re-home a buffer a growth/regrouping left off 256 bytes
                for f in FIELDS:
                    bufs[f] = realign(bufs[f])
            bufs = cache.extra
            if "input_ids" not in bufs:  # allocated once per cache, reused every step
                bufs.update({n: aligned_empty((bsz, 1), self.dtypes[n], dev.torch)
                             for n in ("input_ids", "position_ids", "attention_mask")})
                bufs["attention_mask"].fill_(1)
                bufs.update({n: aligned_empty((bsz, 1), self.dtypes[n], dev.torch)
                             for n in self.outputs if n.startswith("index.")})
                bufs["logits"] = aligned_empty((bsz, self.vocab), self.dtypes["logits"], dev.torch)
                bufs["staging"] = {}
            dev.copy(bufs["input_ids"], token.to(self.dtypes["input_ids"]))
            dev.copy(bufs["position_ids"], position.to(self.dtypes["position_ids"]))
            inputs = {n: bufs[n] for n in ("input_ids", "attention_mask", "position_ids")}
            for li in self.layers:
                inputs.update({f"past.{li}.{f}": v for f, v in cache.past(li).items()})
            ctx = self._set_inputs("decode", inputs)
            outputs = {n: bufs[n] for n in self.outputs if not n.startswith("new.")}
            staged = self._new_rows(cache, {li: 1 for li in self.layers}, outputs, bufs["staging"])
            self._execute(ctx, "decode", inputs, outputs, staged)
            for li in self.layers:
                cache.advance(li, 1)
            logits = host_logits(bufs["logits"])
        self._persist("decode")
        return logits, cache

    # -- binding ------------------------------------------------------------------------------------
    def _check_batch(self, bsz: int) -> None:
        if bsz > self.max_batch:
            raise UserError(f"a batch of {bsz} sequences exceeds the engine's --max-batch {self.max_batch} "
                            f"({self.dir / ENGINE_SIDECAR}): send at most {self.max_batch} at once or rebuild with "
                            f"`tokenskip build --max-batch {bsz}`")

    def _upload(self, name: str, t: Tensor) -> Tensor:
        dst = aligned_empty(t.shape, self.dtypes[name], self.device.torch)
        self.device.copy(dst, t.to(self.dtypes[name]))
        return dst

    def _empty_past(self, name: str, bsz: int) -> Tensor:
        """A zero-row past at an aligned address (TensorRT still wants one for a 0-volume input)."""
        tail = (self.heads, self.head_dim) if name.endswith((".key", ".value")) else ()
        return self._empty[:0].view(self.dtypes[name]).view(0, bsz, *tail)

    def _allocate_cache(self, rows: dict[int, int], bsz: int) -> KVCache:
        """KVCache.allocate's layout with every buffer 256-byte aligned (pos/valid zeroed)."""
        dtype = self.dtypes[f"past.{self.layers[0]}.key"] if self.layers else torch.float32
        dev, kv = self.device.torch, (self.heads, self.head_dim)
        bufs = {li: {"key": aligned_empty((n, bsz, *kv), dtype, dev), "value": aligned_empty((n, bsz, *kv), dtype, dev),
                     "pos": aligned_empty((n, bsz), torch.int64, dev).zero_(),
                     "valid": aligned_empty((n, bsz), torch.bool, dev).zero_()} for li, n in rows.items()}
        return KVCache(bufs, {li: 0 for li in rows})

    def _new_rows(self, cache: KVCache, rows: dict[int, int], outputs: dict, staging: dict) -> list:
        """Bind each layer's new-row outputs to the cache's next slot where that address is 256-byte
        aligned (key/value rows usually are), else to an aligned staging buffer (reused per cache)
        whose rows are copied into the slot after the run. -> [(slot, staging)] to copy."""
        copies = []
        for li, n in rows.items():
            for f, slot in cache.slot(li, n).items():
                name = f"new.{li}.{f}"
                if is_aligned(slot):
                    outputs[name] = slot
                    continue
                stage = staging.get(name)
                if stage is None or stage.shape != slot.shape:
                    stage = staging[name] = aligned_empty(slot.shape, slot.dtype, slot.device)
                outputs[name] = stage
                copies.append((slot, stage))
        return copies

    def _set_inputs(self, phase: str, inputs: dict[str, Tensor]):
        """Check every input against the phase's profile, then set shapes and addresses (checked)."""
        p, ctx = self.contexts[phase]
        for n, t in inputs.items():
            lo, _, hi = self.bounds[p][n]
            if not all(a <= s <= b for a, s, b in zip(lo, t.shape, hi)):
                raise UserError(f"{n} of shape {tuple(t.shape)} is outside the engine's {self.profiles[p]} profile "
                                f"[{lo} .. {hi}] ({self.dir}): rebuild with a larger --max-seq-len / --max-batch")
        for n, t in inputs.items():
            set_input(ctx, n, t, self.profiles[p])
        check_shapes(ctx, phase)
        return ctx

    def _execute(self, ctx, phase: str, inputs: dict, outputs: dict[str, Tensor], staged: list) -> None:
        for n, t in outputs.items():
            want = tuple(ctx.get_tensor_shape(n))
            if tuple(t.shape) != want:
                raise RuntimeError(f"{n}: the engine writes shape {want}, the runtime bound {tuple(t.shape)}")
            bind(ctx, n, t)
        execute(ctx, self.device.handle, phase, {n: tuple(t.shape) for n, t in inputs.items()})
        copy_all(staged)  # staged new rows into the cache slots, on the same stream

    def _persist(self, phase: str) -> None:
        """Save the RTX runtime cache after the first run of each phase (its kernels are compiled then)."""
        if self.runtime_cache is not None and phase not in self._saved_phases:
            self._saved_phases.add(phase)
            self.runtime_cache.save()

    # -- registry and serving (base.Backend); nothing here imports TensorRT ----------------------------
    @classmethod
    def open(cls, spec: BackendSpec) -> "TrtBackend":
        spec.refuse_threshold_skip()
        if not spec.engine_dir:
            raise UserError("the trt backend runs an engine folder: give --engine DIR (from `tokenskip build`)")
        return cls(spec.engine_dir)

    @classmethod
    def create(cls, spec: BackendSpec) -> Created:
        spec.refuse_threshold_skip()
        meta, _ = read_engine_dir(spec.engine_dir)  # a bad folder fails before the GPU checks
        tok_dir = Path(spec.tokenizer_dir or Path(spec.engine_dir) / str(meta.get("tokenizer") or "tokenizer"))
        if not tok_dir.is_dir():
            raise UserError(f"--engine {spec.engine_dir}: no tokenizer folder inside (engines built by an older "
                            "tokenskip); rebuild with `tokenskip build` or pass --tokenizer DIR")
        tok = load_tokenizer(tok_dir, "--engine")
        desc = {"backend": "trt", "engine": str(spec.engine_dir), "model": meta.get("model")}
        return Created(cls.open(spec), tok, desc)

    def cache_ops(self) -> CacheOps:
        return SEQ_MAJOR_OPS

    def model_facts(self) -> ModelFacts:
        """The geometry of the export the engine was built from (engine.json's export_dir) while that
        folder exists; else only the length limit (the server then enforces no KV budget)."""
        export_dir = self.meta.get("export_dir")
        if isinstance(export_dir, str) and Path(export_dir).is_dir():
            from tokenskip.export.sidecar import read_export

            try:
                facts = facts_from_sidecar(read_export(export_dir), self.max_length)
                facts.max_batch = self.max_batch
                return facts
            except UserError:  # an unreadable export: serve without a KV budget
                pass
        return ModelFacts(max_length=self.max_length, max_batch=self.max_batch)
