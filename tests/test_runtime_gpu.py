"""The runtimes on a GPU: ONNX Runtime's CUDA execution provider (extra `onnx-gpu`) and a full
TensorRT engine, each generating exactly what PyTorch generates. They skip, with the reason, where
there is no GPU or no such package (this CPU machine; TensorRT-RTX engines do not run on sm_90)."""

from __future__ import annotations

import pytest
import torch

from tokenskip.deploy.runtime.torch_backend import TorchBackend
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens

PROMPTS = [[5, 9, 17, 3, 44, 8, 21, 60, 2, 7, 19, 33, 12], [40, 2, 77, 31, 9, 10, 58]]


def need_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible here")


@pytest.mark.gpu
def test_ort_cuda_generation_equals_torch(tiny_export):
    need_gpu()
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider: install the onnx-gpu extra (onnxruntime-gpu)")
    from tokenskip.deploy.runtime.ort_backend import OrtBackend

    routed, out = tiny_export
    got = generate_tokens(OrtBackend(out, device="cuda"), PROMPTS, Sampling(12), pad_id=0).tokens
    assert got == generate_tokens(TorchBackend(routed), PROMPTS, Sampling(12), pad_id=0).tokens


@pytest.mark.gpu
def test_tensorrt_engine_generation_equals_torch(tiny_export, tmp_path, monkeypatch):
    need_gpu()
    pytest.importorskip("tensorrt", reason="the full tensorrt package is not installed (TensorRT-RTX does not run "
                                           "on sm_90; docs/plugins.md)")
    from tokenskip.deploy.engine import build as engine_build
    from tokenskip.deploy.runtime.trt_backend import TrtBackend
    from tokenskip.plugins import testing

    major, minor = torch.cuda.get_device_capability()
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))
    routed, out = tiny_export
    for mode in ("shared", "phases"):
        engine_build.build_engines(out, tmp_path / mode, backend="tensorrt", profiles=mode, max_seq_len=64,
                                   plugin_library=str(testing.compiled_library(f"{major}{minor}")))
        got = generate_tokens(TrtBackend(tmp_path / mode), PROMPTS, Sampling(12), pad_id=0).tokens
        assert got == generate_tokens(TorchBackend(routed), PROMPTS, Sampling(12), pad_id=0).tokens, mode
