"""TensorRT-RTX engines from the real smollm2-135m export (static router, 0.3), built on a machine
with no GPU: ONE engine with a prefill and a decode profile, where every routed block's TopKGather /
ScatterTokens becomes one of our plugin layers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX extra not installed")

from tokenskip.deploy.engine import build as engine_build  # noqa: E402


@pytest.mark.slow
def test_smollm2_engines_with_plugins(lib, smol_export, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))
    side = json.loads((smol_export / "export.json").read_text())
    routed = sum(1 for layer in side["layers"] if layer["routed"])
    report = engine_build.build_engines(smol_export, tmp_path / "eng", backend="tensorrt-rtx",
                                        plugin_library=str(lib), max_seq_len=2048, profiles="shared",
                                        log=lambda line: None)
    prefill = report["reports"]["model"]
    print(f"\nengine: {prefill['engine_bytes'] / 2**20:.0f} MiB, {len(prefill['plugin_layers'])} plugin "
          f"layers for {routed} routed blocks, layers by type {prefill['layers_by_type']}")
    assert list(prefill["profiles"]) == ["shared"]  # one engine, one profile: the weights once
    assert routed == 26
    assert prefill["tokenskip_nodes"] == {"TopKGather": routed, "ScatterTokens": routed}
    assert sorted(p["plugin"] for p in prefill["plugin_layers"]) == \
        sorted(["TopKGather", "ScatterTokens"] * routed)
    assert prefill["fallback"] == {"TopKGather": 0, "ScatterTokens": 0} and not prefill["fell_back"]
    assert (tmp_path / "eng" / "model.engine").stat().st_size == prefill["engine_bytes"] > 0
    assert sorted(p.name for p in (tmp_path / "eng").glob("*.engine")) == ["model.engine"]  # weights once


@pytest.mark.slow
def test_smollm2_engines_without_plugins_static_profile(smol_export, tmp_path, monkeypatch):
    """--no-plugins: the function bodies become TopK/Gather/Scatter layers. TensorRT-RTX 1.7 builds
    them only with a fixed sequence length (docs/plugins.md), so the prefill profile is S = 128."""
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))
    report = engine_build.build_engines(smol_export, tmp_path / "eng", backend="tensorrt-rtx", plugins=False,
                                        min_seq_len=128, opt_seq_len=128, max_seq_len=128, profiles="shared",
                                        log=lambda line: None)
    prefill = report["reports"]["model"]
    print(f"\nno-plugins engine: {prefill['engine_bytes'] / 2**20:.0f} MiB, layers {prefill['layers_by_type']}")
    assert prefill["plugin_layers"] == [] and prefill["fallback"] == {"TopKGather": 26, "ScatterTokens": 26}
    assert prefill["layers_by_type"].get("TOPK", 0) >= 2 * 26  # select + re-sort per routed block
    shapes = prefill["profiles"]["shared"]["input_ids"]
    assert shapes[0] == shapes[2] == [1, 128]
    assert (tmp_path / "eng" / "model.engine").stat().st_size == prefill["engine_bytes"] > 0
