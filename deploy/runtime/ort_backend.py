"""ONNX Runtime on an export folder: one session for prefill and decode, I/O bound in place.

The export is one graph (docs/export.md): prefill = a call with an empty past and the prompt,
decode = a call with one token per row against the cache. Every call goes through ORT's
IOBinding with torch tensors (CPU, or CUDA with the CUDA execution provider from the `onnx-gpu`
extra), never through numpy feeds:
- the past of each layer is bound as a view of the preallocated `KVCache` (no copy);
- a decode step binds the graph's new-row outputs to the cache's next slot, so ONNX Runtime writes
  the new K/V straight into the cache: a step copies O(new tokens), allocates nothing, and the
  logits land in a buffer reused across steps;
- prefill lets ONNX Runtime allocate its outputs (the kept counts are the graph's business) and
  copies them once into the cache, which is sized for the prompt plus the tokens announced by
  `check_length`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from tokenskip.errors import UserError
from tokenskip.export.sidecar import export_max_length, read_export
from tokenskip.routed import default_positions

from .base import BackendSpec, CacheOps, Created, ModelFacts, facts_from_sidecar, load_tokenizer, register_backend
from .kv_cache import FIELDS, KVCache, PreallocatedBackend, host_logits
from .kv_rows import SEQ_MAJOR_OPS
from .ort_chunks import DEFAULT_CHUNKS, chunk_export_graph, eligible

_ONNX_ELEM = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7, torch.int32: 6,
              torch.bool: 9}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def import_ort():
    """onnxruntime, or a one-line error naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX Runtime is not installed: pip install 'tokenskip[onnx]' (CPU) or "
                        "'tokenskip[onnx-gpu]' (CUDA)") from None
    return onnxruntime


def ort_providers(device: str) -> list:
    ort = import_ort()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("--device cuda: this onnxruntime has no CUDAExecutionProvider: "
                        "pip install 'tokenskip[onnx-gpu]' (instead of the CPU onnxruntime)")
    # ORT runs on torch's current CUDA stream: the cache writes torch makes and the graph's reads
    # are ordered on one stream, with no extra synchronisation
    stream = torch.cuda.current_stream().cuda_stream
    return [("CUDAExecutionProvider", {"user_compute_stream": str(stream), "has_user_compute_stream": "1"}),
            "CPUExecutionProvider"]


def session_options(threads: int | None = None):
    """The runtime's ONNX Runtime session options (also what bench/ort_cost.py profiles)."""
    ort = import_ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if os.environ.get("TOKENSKIP_ORT_SPIN") != "1":
        # ORT's pool threads spin after each Run by default; between decode steps that steals the
        # cores the Python side needs (measured: a 16 ms logits copy on 2 cores). 1 restores it.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


CHUNKS_ENV = "TOKENSKIP_ORT_ATTENTION_CHUNKS"


def attention_chunks(device: str) -> int:
    """Causal query chunks the CPU session applies to prefill attention (ort_chunks; the
    environment's TOKENSKIP_ORT_ATTENTION_CHUNKS, default 4, 1 = off). CUDA sessions get none:
    the GPU provider's own attention fusions want the one rectangle."""
    raw = os.environ.get(CHUNKS_ENV, str(DEFAULT_CHUNKS))
    try:
        chunks = int(raw)
    except ValueError:
        chunks = 0
    if not 1 <= chunks <= 16:
        raise UserError(f"{CHUNKS_ENV}={raw!r}: must be an integer from 1 (off) to 16")
    return chunks if device == "cpu" else 1


def ort_session(path: Path, device: str = "cpu", threads: int | None = None, meta: dict | None = None,
                stats: dict | None = None):
    """The one ONNX Runtime session factory (validation and the ORT backend). With the export's
    sidecar (`meta`) on the CPU, prefill attention runs in causal query chunks where the export
    allows it (ort_chunks: the graph is rewritten in memory; the file is not touched); `stats`
    receives what was applied."""
    ort = import_ort()
    opts = session_options(threads)
    model = str(path)
    chunks = attention_chunks(device) if meta is not None else 1
    if stats is not None:
        stats.update(attention_chunks=1, chunked_rectangles=0)
    if chunks > 1 and eligible(meta):
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        n = chunk_export_graph(proto, meta, chunks)
        if n:
            model = proto.SerializeToString()
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
            if stats is not None:
                stats.update(attention_chunks=chunks, chunked_rectangles=n)
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=ort_providers(device))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load {path} in ONNX Runtime: {first}") from None


def _bind_in(binding, name: str, t: Tensor) -> None:
    t = t.contiguous()
    binding.bind_input(name, t.device.type, t.device.index or 0, _ONNX_ELEM[t.dtype], tuple(t.shape),
                       t.data_ptr())


def _bind_out(binding, name: str, t: Tensor) -> None:
    binding.bind_output(name, t.device.type, t.device.index or 0, _ONNX_ELEM[t.dtype], tuple(t.shape),
                        t.data_ptr())


@register_backend("ort", features=("bench", "bench-serve"))
class OrtBackend(PreallocatedBackend):
    """prefill/decode on one ONNX Runtime session of an export folder (see the module docstring)."""

    name = "ort"

    @classmethod
    def open(cls, spec: BackendSpec) -> "OrtBackend":
        from tokenskip.precision import resolve_device

        spec.refuse_threshold_skip()
        if not spec.onnx_dir:
            raise UserError("the ort backend runs an export folder: give --onnx DIR (from `tokenskip export`)")
        return cls(spec.onnx_dir, device=resolve_device(spec.device).type, threads=spec.threads)

    @classmethod
    def create(cls, spec: BackendSpec) -> Created:
        backend = cls.open(spec)
        tok_dir = (Path(spec.tokenizer_dir) if spec.tokenizer_dir
                   else Path(spec.onnx_dir) / str(backend.meta.get("tokenizer") or "tokenizer"))
        return Created(backend, load_tokenizer(tok_dir, "--onnx"),
                       {"backend": "ort", "onnx": str(spec.onnx_dir), "routing": backend.meta.get("routing")})

    def cache_ops(self) -> CacheOps:
        return SEQ_MAJOR_OPS

    def model_facts(self) -> ModelFacts:
        return facts_from_sidecar(self.meta, self.max_length)

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        self.dir = Path(export_dir)
        self.meta = read_export(self.dir, "--onnx")
        graph = self.meta["graphs"]["model"]
        self.stats: dict = {}
        self.session = ort_session(self.dir / graph["file"], device, threads, meta=self.meta, stats=self.stats)
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.layers = list(self.meta["cache"]["layers"])
        cfg = self.meta["config"]
        self.heads, self.head_dim = cfg["num_key_value_heads"], cfg["head_dim"]
        first = f"past.{self.layers[0]}.key" if self.layers else None
        self.kv_dtype = _TORCH_DTYPES[graph["inputs"][first]["dtype"]] if first else torch.float32
        self.logits_dtype = _TORCH_DTYPES[graph["outputs"]["logits"]["dtype"]]
        self.vocab = cfg["vocab_size"]
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        want = {"input_ids", "attention_mask", "position_ids",
                *(f"past.{li}.{f}" for li in self.layers for f in FIELDS)}
        if set(self.inputs) != want:
            diff = sorted(set(self.inputs) ^ want)[0]
            raise UserError(f"{self.dir}: the graph's inputs do not match export.json (first difference: {diff}): "
                            "re-export with `tokenskip export`")
        self.max_length = export_max_length(self.meta)
        self.limit_what = f"export ({self.dir})"

    def _run(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: KVCache | None, in_place: bool):
        """One graph call. in_place (one token per row, so k = S = 1 in every routed block): the
        new rows are written straight into cache.slot(l, 1), the logits into a reused buffer."""
        binding = self.session.io_binding()
        dev = self.device
        for name, t in (("input_ids", ids), ("attention_mask", mask), ("position_ids", positions)):
            _bind_in(binding, name, t.to(dev, torch.int64))
        bsz, seq = ids.shape
        for li in self.layers:
            if cache is None:  # prefill: past length 0
                past = {"key": torch.empty(0, bsz, self.heads, self.head_dim, dtype=self.kv_dtype, device=dev),
                        "value": torch.empty(0, bsz, self.heads, self.head_dim, dtype=self.kv_dtype, device=dev),
                        "pos": torch.empty(0, bsz, dtype=torch.int64, device=dev),
                        "valid": torch.empty(0, bsz, dtype=torch.bool, device=dev)}
            else:
                past = cache.past(li)
            for f in FIELDS:
                _bind_in(binding, f"past.{li}.{f}", past[f])
        if in_place:
            assert seq == 1, "in-place calls add one row per layer"
            extra = cache.extra
            if "logits" not in extra:  # output buffers, allocated once per cache, reused every step
                extra["logits"] = torch.empty(bsz, self.vocab, dtype=self.logits_dtype, device=dev)
                extra["index"] = {n: torch.empty(bsz, 1, dtype=torch.int64, device=dev)  # k = 1: always [0]
                                  for n in self.outputs if n.startswith("index.")}
            _bind_out(binding, "logits", extra["logits"])
            for name, buf in extra["index"].items():
                _bind_out(binding, name, buf)
            for li in self.layers:
                for f, view in cache.slot(li, 1).items():
                    _bind_out(binding, f"new.{li}.{f}", view)
        else:
            for name in self.outputs:
                binding.bind_output(name, dev.type, dev.index or 0)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if in_place:
            for li in self.layers:
                cache.advance(li, 1)
            return cache.extra["logits"], None
        return None, {n: torch.from_dlpack(v._ortvalue) for n, v in zip(self.outputs, binding.get_outputs())}

    def run(self, ids: Tensor, mask: Tensor, positions: Tensor | None = None) -> dict[str, Tensor]:
        """Every output of a call with an empty past (prefill), by name, as torch tensors."""
        positions = default_positions(mask.bool()) if positions is None else positions
        return self._run(ids, mask, positions, None, in_place=False)[1]

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor):
        outs = self.run(ids, mask)
        rows = {li: outs[f"new.{li}.pos"].shape[0] for li in self.layers}
        cache = KVCache.allocate({li: n + self.new_tokens for li, n in rows.items()}, ids.shape[0], self.heads,
                                 self.head_dim, self.kv_dtype, self.device)
        for li in self.layers:
            cache.write(li, {f: outs[f"new.{li}.{f}"] for f in FIELDS})
        return host_logits(outs["logits"]), cache

    chunked_prefill = True  # base.Backend: the one graph takes a past with S > 1 (a routed chunk)

    @torch.no_grad()
    def prefill_chunk(self, ids: Tensor, positions: Tensor, cache: KVCache):
        """The next prompt tokens [B,S] routed among themselves, attending to the cache (base.Backend):
        one graph call with the cache as past; the rows it adds (keep(S) in a routed layer under
        kv_policy=skip, S elsewhere) are copied in after the filled ones."""
        _, outs = self._run(ids, torch.ones_like(ids), positions, cache, in_place=False)
        cache.reserve(max(outs[f"new.{li}.pos"].shape[0] for li in self.layers))
        for li in self.layers:
            cache.write(li, {f: outs[f"new.{li}.{f}"] for f in FIELDS})
        return host_logits(outs["logits"]), cache

    @torch.no_grad()
    def decode(self, token: Tensor, position: Tensor, cache: KVCache):
        cache.reserve(token.shape[1])
        logits, _ = self._run(token, torch.ones_like(token), position, cache, in_place=True)
        return host_logits(logits), cache
