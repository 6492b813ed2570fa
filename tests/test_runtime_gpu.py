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


@pytest.fixture
def ort_cuda():
    """Skips before the export fixture runs."""
    need_gpu()
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider: install the onnx-gpu extra (onnxruntime-gpu)")


@pytest.mark.gpu
def test_ort_cuda_generation_equals_torch(ort_cuda, tiny_export):
    from tokenskip.deploy.runtime.ort_backend import OrtBackend

    routed, out = tiny_export
    got = generate_tokens(OrtBackend(out, device="cuda"), PROMPTS, Sampling(12), pad_id=0).tokens
    assert got == generate_tokens(TorchBackend(routed), PROMPTS, Sampling(12), pad_id=0).tokens


@pytest.fixture
def full_tensorrt():
    """Skips before the export fixture runs (no export for nothing where TensorRT is missing)."""
    need_gpu()
    return pytest.importorskip("tensorrt", reason="the full tensorrt package is not installed (TensorRT-RTX does "
                                                  "not run on sm_90; docs/plugins.md)")


@pytest.mark.gpu
def test_tensorrt_engine_generation_equals_torch(full_tensorrt, tiny_export, tmp_path, monkeypatch):
    """Both profile layouts, built for the batch the test runs (len(PROMPTS) rows at once: the
    runtime refuses a batch above engine.json's max_batch), each row also alone."""
    from tokenskip.deploy.engine import build as engine_build
    from tokenskip.deploy.runtime.trt_backend import TrtBackend
    from tokenskip.plugins import testing

    major, minor = torch.cuda.get_device_capability()
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))
    routed, out = tiny_export
    want = generate_tokens(TorchBackend(routed), PROMPTS, Sampling(12), pad_id=0).tokens
    for mode in ("phases", "shared"):
        meta = engine_build.build_engines(out, tmp_path / mode, backend="tensorrt", profiles=mode, max_seq_len=64,
                                          max_batch=len(PROMPTS), opt_batch=len(PROMPTS),
                                          plugin_library=str(testing.compiled_library(f"{major}{minor}")))
        assert meta["max_batch"] == len(PROMPTS) and meta["backend"] == "tensorrt"
        backend = TrtBackend(tmp_path / mode)
        assert generate_tokens(backend, PROMPTS, Sampling(12), pad_id=0).tokens == want, mode
        assert [generate_tokens(backend, [p], Sampling(12), pad_id=0).tokens[0] for p in PROMPTS] == want, mode
