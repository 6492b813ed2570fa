"""The plugin library compiles (nvcc from the `cuda` extra), is cached, carries its source hash, and
`tokenskip plugins build` fails with one clear line when the toolchain is missing or broken."""

from __future__ import annotations

import ctypes
import json

import pytest
from click.testing import CliRunner

from tokenskip.errors import UserError
from tokenskip.plugins import build, toolchain
from tokenskip.plugins.cli import plugins


def test_library_compiles_with_entry_points_and_source_hash(lib):
    meta = json.loads((lib.parent / "build.json").read_text())
    assert meta["archs"] == ["90"] and meta["compile_seconds"] > 0
    handle = ctypes.CDLL(str(lib))
    for name in ("getCreators", "setLoggerFinder", "tokenskip_topk_gather_bf16_i64", "tokenskip_topk_select_i32",
                 "tokenskip_scatter_tokens_f16_i32", "tokenskip_scatter_tokens_inplace_bf16_i64",
                 "tokenskip_scatter_tokens_workspace_size", "tokenskip_plugins_set_aliased_io",
                 "tokenskip_plugins_aliases_granted"):
        assert hasattr(handle, name), name
    assert handle.tokenskip_plugins_supports_aliased_io() == 1  # TensorRT 10.14 headers: IPluginV3OneBuildV2
    assert build.library_source_hash(lib) == build.source_hash()
    assert build.check_library(lib) == lib
    handle.tokenskip_keep_count.restype = ctypes.c_int64
    handle.tokenskip_keep_count.argtypes = [ctypes.c_int64] * 4
    assert handle.tokenskip_keep_count(40000, 3, 5, 1) == 24000
    assert handle.tokenskip_keep_count(1, 0, 1, 4) == 1
    assert handle.tokenskip_keep_count(10, 1, 0, 1) == -1


def test_selection_path_and_workspace_host_logic(lib):
    """The host-side choices of the selection kernels (callable without a GPU)."""
    from tokenskip.plugins import kernels

    handle = kernels.load(lib)
    multi = handle.tokenskip_topk_select_uses_multi_block
    assert multi(1, 32768) and multi(8, 32768) and multi(1, 8193)
    assert not multi(1, 8192) and not multi(1, 1024) and not multi(128, 32768)  # short rows / a full GPU
    size = handle.tokenskip_topk_gather_workspace_size
    assert size(0, 100) == 0 and size(1, 0) == 0
    # per row: 4 x 256 uint32 histograms + 3 uint32 counts per 2048-score chunk (each part 256-aligned)
    assert size(1, 32768) == 4096 + 256 and size(8, 32768) == 8 * 4096 + 8 * 16 * 12
    assert size(2, 100000) >= size(2, 99999) >= size(1, 99999)


def test_kernels_only_library_needs_no_tensorrt_headers(lib, tmp_path, monkeypatch):
    """What the GPU machine (no TensorRT) builds for tests/test_plugins_gpu.py and the benchmark."""
    monkeypatch.setenv("TENSORRT_INCLUDE_DIR", str(tmp_path / "no-headers"))  # would fail a plugin build
    kern = build.build_library(arch="90", cache=tmp_path / "plugins", kernels_only=True)
    assert kern.name == "libtokenskip_kernels.so"
    meta = json.loads((kern.parent / "build.json").read_text())
    assert meta["kernels_only"] and meta["tensorrt_include"] is None
    handle = ctypes.CDLL(str(kern))
    assert hasattr(handle, "tokenskip_topk_select_i64") and hasattr(handle, "tokenskip_scatter_tokens_inplace_f16_i64")
    assert not hasattr(handle, "getCreators")


def test_second_build_is_a_cache_hit(lib):
    again = build.build_library(arch="sm_90", cache=lib.parent.parent)
    assert again == lib


def test_stale_library_is_refused(lib, monkeypatch):
    monkeypatch.setattr(build, "source_hash", lambda: "0" * 64)
    with pytest.raises(UserError, match="built from other sources"):
        build.check_library(lib)


def test_parse_archs():
    assert build.parse_archs("sm_90, 8.6,80") == ["80", "86", "90"]
    assert build.parse_archs(None) == ["80", "86", "89", "90", "120"]
    assert build.arch_flags(["80", "90"])[-1] == "arch=compute_90,code=compute_90"  # PTX of the newest
    with pytest.raises(UserError, match="--arch"):
        build.parse_archs("hopper")


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()  # progress lines may precede the error
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("Error: "), result.output
    return errors[0]


def _no_library(cache) -> bool:
    return not list(cache.rglob("*.so")) and not list(cache.rglob("*.tmp"))


def test_cli_missing_nvcc(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(toolchain, "_pypi_cuda_root", lambda: None)
    monkeypatch.setattr(toolchain, "SYSTEM_CUDA", tmp_path / "no-cuda")
    line = _one_line_error(CliRunner().invoke(plugins, ["build", "--arch", "90"]))
    assert "install the extra: pip install 'tokenskip[cuda]'" in line
    assert _no_library(tmp_path)


def test_cli_bad_cuda_home_and_headers(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert "CUDA_HOME" in _one_line_error(CliRunner().invoke(plugins, ["build"]))
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("TENSORRT_INCLUDE_DIR", str(tmp_path))
    try:
        toolchain.find_nvcc()
    except UserError:
        pytest.skip("CUDA compiler extra not installed")
    assert "TENSORRT_INCLUDE_DIR" in _one_line_error(CliRunner().invoke(plugins, ["build", "--arch", "90"]))
    assert _no_library(tmp_path)


def test_cli_bad_arch():
    assert "--arch" in _one_line_error(CliRunner().invoke(plugins, ["build", "--arch", "sm_x"]))


def test_compile_error_leaves_no_library(lib, tmp_path, monkeypatch):
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k() { this is not cuda; }\n")
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "compile_units", lambda kernels_only=False: [broken])
    line = _one_line_error(CliRunner().invoke(plugins, ["build", "--arch", "90", "--force"]))
    assert "nvcc failed" in line and "full log" in line
    assert _no_library(tmp_path / "cache")


def test_cli_json_reuses_cache(lib, monkeypatch):
    monkeypatch.setenv("TOKENSKIP_CACHE", str(lib.parent.parent.parent))  # <root>/plugins/<key>/lib
    result = CliRunner().invoke(plugins, ["build", "--arch", "90", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["library"] == str(lib)  # no recompile
    assert info["archs"] == ["90"] and info["source_hash"] == build.source_hash()
