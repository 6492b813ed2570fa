"""Backends behind one small interface, so generation and benchmarks are written once.

    prefill(ids [B,S] int64, mask [B,S] int64) -> (logits [B,V] float32 torch, cache)
    decode(token [B,1] int64, position [B,1] int64, cache) -> (logits [B,V], cache)
    check_length(prompt_tokens, new_tokens)   # one-line UserError naming the limit

The cache is whatever the backend needs (a list of LayerKV for PyTorch, a dict of named arrays for
ONNX Runtime, device buffers for TensorRT); the loop never looks inside. Heavy optional runtimes
(onnxruntime, tensorrt) are imported only when their backend is built (Polygraphy's habit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tokenskip.errors import UserError
from tokenskip.export.sidecar import export_max_length, read_export


def _limit_error(what: str, prompt: int, new: int, limit: int) -> UserError:
    return UserError(f"prompt of {prompt} tokens + {new} new tokens = {prompt + new} exceeds the {what}'s "
                     f"maximum length {limit}: shorten the prompt or lower --max-new-tokens")


class TorchBackend:
    """The PyTorch RoutedModel: prefill routes, decode runs every block (or threshold-skips)."""

    name = "torch"

    def __init__(self, routed, threshold_skip: bool = False) -> None:
        self.routed = routed
        self.threshold_skip = threshold_skip
        self.device = next(routed.model.parameters()).device
        self.max_length = getattr(routed.model.config, "max_position_embeddings", None)
        self.stats: dict = {}
        if threshold_skip:
            from tokenskip.routers import LearnedRouter

            if not isinstance(routed.router, LearnedRouter):
                raise UserError("--threshold-skip needs a learned router (--routers DIR written by `tokenskip train`)")
            self.stats = {"decode_tokens": 0, "routed_block_visits": 0, "skipped_blocks": 0}

    def check_length(self, prompt: int, new: int) -> None:
        if self.max_length and prompt + new > self.max_length:
            raise _limit_error("model", prompt, new, self.max_length)

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor):
        if self.threshold_skip and ids.shape[0] != 1:
            raise UserError(f"--threshold-skip decodes one prompt at a time, got a batch of {ids.shape[0]}")
        logits, cache = self.routed.prefill(ids.to(self.device), mask.to(self.device))
        return logits.float(), cache

    @torch.no_grad()
    def decode(self, token: Tensor, position: Tensor, cache):
        token, position = token.to(self.device), position.to(self.device)
        if not self.threshold_skip:
            logits, cache = self.routed.decode_step(token, position, cache)
            return logits.float(), cache
        from .threshold_skip import threshold_decode_step

        logits, cache, skipped = threshold_decode_step(self.routed, token, position, cache)
        routed_blocks = sum(self.routed.layer_is_routed(i) for i in range(len(self.routed.layers)))
        self.stats["decode_tokens"] += 1
        self.stats["routed_block_visits"] += routed_blocks
        self.stats["skipped_blocks"] += len(skipped)
        return logits.float(), cache


# ------------------------------------------------------------------------------------ ONNX Runtime
_ORT_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
               "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def import_ort():
    """onnxruntime, or a one-line error naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX Runtime is not installed: pip install 'tokenskip[onnx]' (CPU) or "
                        "'tokenskip[onnx-gpu]' (CUDA)") from None
    return onnxruntime


def ort_providers(device: str) -> list[str]:
    ort = import_ort()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def ort_session(path: Path, device: str = "cpu", threads: int | None = None):
    """The one ONNX Runtime session factory (validation and the ORT backend)."""
    ort = import_ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers(device))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load {path} in ONNX Runtime: {first}") from None


class OrtBackend:
    """ONNX Runtime on an export folder: prefill graph once, then the decode graph per token.

    Inputs are matched by name: decode's `past.*` inputs take prefill's (or the previous step's)
    `present.*` outputs, so any number of layers and cache lengths works.
    """

    name = "ort"

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        self.dir = Path(export_dir)
        self.meta = read_export(self.dir, "--onnx")
        graphs = self.meta["graphs"]
        self.sessions = {part: ort_session(self.dir / graphs[part]["file"], device, threads)
                         for part in ("prefill", "decode")}
        self.input_types = {part: {i.name: _ORT_DTYPES.get(i.type, np.float32) for i in s.get_inputs()}
                            for part, s in self.sessions.items()}
        self.output_names = {part: [o.name for o in s.get_outputs()] for part, s in self.sessions.items()}
        self.max_length = export_max_length(self.meta)
        self.stats: dict = {}

    def check_length(self, prompt: int, new: int) -> None:
        if self.max_length and prompt + new > self.max_length:
            raise _limit_error(f"export ({self.dir})", prompt, new, self.max_length)

    def _feed(self, part: str, values: dict) -> dict:
        types = self.input_types[part]
        missing = [n for n in types if n not in values]
        if missing:
            raise UserError(f"{self.dir}: the {part} graph wants inputs {missing} that the runtime cannot supply "
                            "(export and runtime versions differ?)")
        return {n: np.ascontiguousarray(np.asarray(values[n]).astype(types[n], copy=False)) for n in types}

    def _run(self, part: str, values: dict):
        outs = self.sessions[part].run(None, self._feed(part, values))
        named = dict(zip(self.output_names[part], outs))
        cache = {"past." + n[len("present."):]: v for n, v in named.items() if n.startswith("present.")}
        logits = np.asarray(named["logits"], dtype=np.float32)
        if logits.ndim == 3:  # [B,1,V] graphs: the last position
            logits = logits[:, -1]
        return torch.from_numpy(logits), cache

    def prefill(self, ids: Tensor, mask: Tensor):
        return self._run("prefill", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})

    def decode(self, token: Tensor, position: Tensor, cache):
        return self._run("decode", {"input_ids": token.numpy(), "position_ids": position.numpy(), **cache})


def load_trt_backend(engine_dir: str | Path):
    """TensorRT runtime, imported only here (it needs a GPU and the tensorrt package)."""
    from .trt_runtime import TrtBackend

    return TrtBackend(engine_dir)
