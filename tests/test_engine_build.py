"""TensorRT-RTX engine builds from tokenskip graphs on a CPU-only machine: with our plugins (plugin
layers, no fallback, embedded or shipped library, engine cache) and without (function bodies), and
`tokenskip build` bad-input errors (one line, exit 1, no traceback, no partial engine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tokenskip.errors import UserError

pytest.importorskip("onnx")
trt_rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX extra not installed")

from tokenskip.deploy.engine import build as engine_build  # noqa: E402
from tokenskip.deploy.engine.cli import build as build_cmd  # noqa: E402
from tokenskip.plugins import testing  # noqa: E402


@pytest.fixture(autouse=True)
def engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path / "cache"))


def write_export(out_dir, hidden: int = 64, dtype: str = "float32", past: bool = False):
    """A folder shaped like `tokenskip export` output (export.json + model.onnx): one routed block in
    miniature (plugins.testing.routed_block_model); with `past`, a cache input "past.0.key" [past_0,
    batch, H] whose sum over its rows is added to the output (an empty past adds zero)."""
    import onnx
    from onnx import helper

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = testing.routed_block_model(hidden, dtype)
    g = model.graph
    if past:
        elem = g.input[0].type.tensor_type.elem_type
        g.input.append(helper.make_tensor_value_info("past.0.key", elem, ["past_0", "batch", hidden]))
        g.initializer.append(helper.make_tensor("axes0", onnx.TensorProto.INT64, [1], [0]))
        g.node.extend([helper.make_node("ReduceSum", ["past.0.key", "axes0"], ["ctx"], keepdims=1),  # [1,B,H]
                       helper.make_node("Transpose", ["ctx"], ["ctx_b"], perm=[1, 0, 2]),  # [B,1,H]
                       helper.make_node("Add", ["y", "ctx_b"], ["y_ctx"])])
        g.output[0].name = "y_ctx"
    onnx.save(model, out / "model.onnx")
    io = {v.name: {"dtype": {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64"}[v.type.tensor_type.elem_type],
                   "shape": [d.dim_param or int(d.dim_value) for d in v.type.tensor_type.shape.dim]} for v in g.input}
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
    side = {"format": "tokenskip-export", "version": 2, "dtype": short, "max_seq_len": 4096,
            "graphs": {"model": {"file": "model.onnx", "inputs": io}},
            "cache": {"layout": "seq-major", "layers": [0] if past else []},
            "config": {"num_key_value_heads": 1, "head_dim": hidden, "vocab_size": 8}, "layers": [],
            "custom_ops": {"domain": "tokenskip", "version": 1, "plugin_namespace": "tokenskip",
                           "ops": ["TopKGather", "ScatterTokens"]}}
    (out / "export.json").write_text(json.dumps(side, indent=2) + "\n", encoding="utf-8")
    return out


def _build(export, out, **kw):
    lines: list[str] = []
    report = engine_build.build_engines(export, out, backend="tensorrt-rtx", log=lines.append, **kw)
    return report, lines


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_plugin_engines_have_plugin_layers_and_no_fallback(lib, tmp_path, dtype):
    export = write_export(tmp_path / "export", hidden=64, dtype=dtype)
    report, lines = _build(export, tmp_path / "eng", plugin_library=str(lib), max_seq_len=40000)
    assert set(report["reports"]) == {"model"}
    for graph, r in report["reports"].items():
        assert sorted(p["plugin"] for p in r["plugin_layers"]) == ["ScatterTokens", "TopKGather"]
        assert {p["namespace"] for p in r["plugin_layers"]} == {"tokenskip"}
        assert r["tokenskip_nodes"] == {"TopKGather": 1, "ScatterTokens": 1}
        assert r["fallback"] == {"TopKGather": 0, "ScatterTokens": 0} and not r["fell_back"]
        assert "TOPK" not in r["layers_by_type"] and r["layers_by_type"]["PLUGIN_V3"] == 2
        assert r["engine_bytes"] == (tmp_path / "eng" / f"{graph}.engine").stat().st_size > 0
        assert json.loads((tmp_path / "eng" / f"{graph}.report.json").read_text())["cache_key"] == r["cache_key"]
    assert report["reports"]["model"]["profiles"] == {"default": {"x": [[1, 1, 64], [1, 512, 64], [1, 40000, 64]],
                                                                  "scores": [[1, 1], [1, 512], [1, 40000]]}}
    meta = json.loads((tmp_path / "eng" / "engine.json").read_text())
    assert meta["plugin_library"] == lib.name and (tmp_path / "eng" / lib.name).is_file()
    assert meta["engines"]["model"]["file"] == "model.engine"
    assert any("building engine" in ln for ln in lines)  # progress


def test_function_body_fallback_without_plugins(lib, tmp_path):
    export = write_export(tmp_path / "export", hidden=32)
    report, _ = _build(export, tmp_path / "eng", plugins=False, max_seq_len=2048)
    r = report["reports"]["model"]
    assert r["plugin_layers"] == [] and r["fell_back"]
    assert r["fallback"] == {"TopKGather": 1, "ScatterTokens": 1}
    assert r["layers_by_type"]["TOPK"] == 2 and r["layers_by_type"]["SCATTER"] == 1  # the ONNX function bodies
    assert json.loads((tmp_path / "eng" / "engine.json").read_text())["plugin_library"] is None


def test_embedded_plugins_and_engine_cache(lib, tmp_path):
    export = write_export(tmp_path / "export", hidden=64)
    plain, _ = _build(export, tmp_path / "a", plugin_library=str(lib))
    embedded, _ = _build(export, tmp_path / "b", plugin_library=str(lib), embed_plugins=True)
    p, e = plain["reports"]["model"], embedded["reports"]["model"]
    assert e["plugins_embedded"] and not p["plugins_embedded"]
    assert e["engine_bytes"] > p["engine_bytes"] + lib.stat().st_size // 2  # the library travels inside
    assert json.loads((tmp_path / "b" / "engine.json").read_text())["plugin_library"] is None
    assert not (tmp_path / "b" / lib.name).exists()
    again, lines = _build(export, tmp_path / "c", plugin_library=str(lib))
    assert again["reports"]["model"]["cached"] and any("up to date" in ln for ln in lines)
    forced, _ = _build(export, tmp_path / "c", plugin_library=str(lib), force=True)
    assert not forced["reports"]["model"]["cached"]
    _, lines = _build(export, tmp_path / "d", plugin_library=str(lib), timing_cache=str(tmp_path / "t.cache"))
    assert any("--timing-cache ignored" in ln for ln in lines)  # a no-op in TensorRT-RTX


def test_profile_shapes_clamp():
    s = engine_build.BuildSettings(min_seq_len=16, opt_seq_len=4, max_seq_len=64, max_batch=4, opt_batch=9).resolve({})
    shapes = engine_build.profile_shapes({"ids": ["batch", "seq"], "k": ["kept_0", "batch", 2, 8]}, s)
    assert shapes["ids"] == [[1, 16], [4, 16], [4, 64]]
    assert shapes["k"] == [[16, 1, 2, 8], [16, 4, 2, 8], [64, 4, 2, 8]]
    cache_inputs = {"ids": ["batch", "seq"], "past": ["past_0", "batch", 2, 8]}
    both = engine_build.phase_profiles(cache_inputs, s)  # the default: a profile per phase, each tuned for
    assert list(both) == ["prefill", "decode"]  # the shapes it runs: (S = opt, past 0) and (S = 1, past = opt)
    assert both["prefill"] == {"ids": [[1, 16], [4, 16], [4, 64]], "past": [[0, 1, 2, 8], [0, 4, 2, 8], [64, 4, 2, 8]]}
    s = engine_build.BuildSettings(min_seq_len=16, opt_seq_len=4, max_seq_len=64, max_batch=4, opt_batch=9,
                                   profiles="shared").resolve({})
    shared = engine_build.phase_profiles(cache_inputs, s)  # optimum = the prefill shape, never (opt, opt)
    assert shared == {"shared": {"ids": [[1, 16], [4, 16], [4, 64]], "past": [[0, 1, 2, 8], [0, 4, 2, 8], [64, 4, 2, 8]]}}
    assert s.limits() == {"min_seq_len": 16, "opt_seq_len": 16, "max_seq_len": 64, "opt_batch": 4, "max_batch": 4}
    assert both["decode"] == {"ids": [[1, 1], [4, 1], [4, 1]], "past": [[1, 1, 2, 8], [16, 4, 2, 8], [64, 4, 2, 8]]}


def test_function_bodies_match_reference_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    from tokenskip import ops_reference as R

    model = testing.routed_block_model(16, keep_num=3, keep_den=5, min_keep=4)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 13, 16)).astype(np.float32)                # [B,S,H]
    scores = rng.integers(0, 3, (3, 13)).astype(np.float32)                 # heavy ties
    scores[0, 5], scores[1, :4], scores[2, 7] = np.inf, -np.inf, -0.0
    y, index = sess.run(None, {"x": x, "scores": scores})
    kept, ref_index = R.topk_gather(x, scores, 3, 5, 4)
    np.testing.assert_array_equal(index, ref_index)
    w = __import__("onnx").numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(y, R.scatter_tokens(x, kept @ w, ref_index), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ bad input
def _fails(args, out=None):
    result = CliRunner().invoke(build_cmd, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    if out is not None and out.exists():  # nothing half-written
        assert not list(out.rglob("*.engine")) and not list(out.rglob("*.tmp"))
    return errors[0]


def test_cli_bad_inputs(lib, tmp_path):
    out = tmp_path / "eng"
    export = write_export(tmp_path / "export", hidden=32)
    assert "no such export folder" in _fails([str(tmp_path / "nope"), "--out", str(out)], out)
    assert "--min-seq-len 64 > --max-seq-len 32" in _fails(
        [str(export), "--out", str(out), "--min-seq-len", "64", "--max-seq-len", "32"], out)
    assert "exclude each other" in _fails([str(export), "--out", str(out), "--no-plugins", "--embed-plugins"], out)
    assert "--fp16" in _fails([str(export), "--out", str(out), "--fp16", "--backend", "tensorrt-rtx",
                               "--plugin-lib", str(lib)], out)
    junk = tmp_path / "libjunk.so"
    junk.write_bytes(b"not a library")
    assert "not a tokenskip plugin library" in _fails([str(export), "--out", str(out), "--plugin-lib", str(junk)], out)

    (export / "model.onnx").unlink()
    assert "model.onnx is missing" in _fails([str(export), "--out", str(out)], out)
    (export / "export.json").unlink()
    assert "export.json not found" in _fails([str(export), "--out", str(out)], out)


def test_cli_stale_plugin_library(lib, tmp_path, monkeypatch):
    from tokenskip.plugins import build as plugin_build

    export = write_export(tmp_path / "export", hidden=32)
    monkeypatch.setattr(plugin_build, "source_hash", lambda: "f" * 64)  # as if the sources were edited
    line = _fails([str(export), "--out", str(tmp_path / "eng"), "--plugin-lib", str(lib)], tmp_path / "eng")
    assert "built from other sources" in line and "tokenskip plugins build" in line


def test_cli_failed_build_leaves_no_engine(tmp_path):
    # without plugins TopKGather is TensorRT's TopK, capped at K <= 3840: k = 0.6 * 8000 breaks the build
    export = write_export(tmp_path / "export", hidden=32)
    out = tmp_path / "eng"
    line = _fails([str(export), "--out", str(out), "--no-plugins", "--opt-seq-len", "8000", "--max-seq-len", "8000"],
                  out)
    assert "failed to build the model engine" in line
    assert not out.exists() or not any(out.iterdir())
    assert not list((tmp_path / "cache").rglob("engine"))


def test_cli_success_prints_summary(lib, tmp_path):
    export = write_export(tmp_path / "export", hidden=32)
    result = CliRunner().invoke(build_cmd, [str(export), "--out", str(tmp_path / "eng"), "--plugin-lib", str(lib),
                                            "--backend", "tensorrt-rtx", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reports"]["model"]["plugin_layers"] and report["plugins"]
    shutil.rmtree(tmp_path / "eng")


def test_engine_folder_is_self_contained_and_records_its_gpus(lib, tmp_path, monkeypatch):
    """The build copies the export's tokenizer and routing in, and engine.json records the compute
    capabilities it targets; the runtime's GPU check reads that very file."""
    import torch

    from tokenskip.deploy.runtime import trt_backend as trt_runtime

    export = write_export(tmp_path / "export", hidden=32)
    for sub, name in (("tokenizer", "tokenizer.json"), ("routing", "tokenskip.json")):
        (export / sub).mkdir()
        (export / sub / name).write_text("{}")
    side = json.loads((export / "export.json").read_text())
    side.update(model="tiny", tokenizer="tokenizer", routers="routing")
    (export / "export.json").write_text(json.dumps(side))
    _build(export, tmp_path / "eng", plugin_library=str(lib))
    eng = tmp_path / "eng"
    meta = json.loads((eng / "engine.json").read_text())
    assert (eng / meta["tokenizer"] / "tokenizer.json").is_file()
    assert (eng / meta["routers"] / "tokenskip.json").is_file() and meta["model"] == "tiny"
    assert meta["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(UserError, match=r"built for compute capability 8.0, 8.6, 8.9, 12.0.*is 9.0"):
        trt_runtime.check_gpu(meta, eng)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    trt_runtime.check_gpu(meta, eng)  # an RTX 4090 runs it


@pytest.mark.parametrize("mode", ["shared", "phases"])
def test_cache_graph_builds_one_engine(lib, tmp_path, mode):
    """A graph with cache inputs builds ONE engine: one shared profile (an empty past is a
    zero-volume tensor), or a prefill and a decode (S = 1) profile."""
    export = write_export(tmp_path / "export", hidden=32, dtype="float16", past=True)
    report, _ = _build(export, tmp_path / "eng", plugin_library=str(lib), max_seq_len=256, profiles=mode, max_batch=2)
    r = report["reports"]["model"]
    if mode == "shared":
        assert list(r["profiles"]) == ["shared"]
        assert r["profiles"]["shared"]["past.0.key"] == [[0, 1, 32], [0, 1, 32], [256, 2, 32]]
    else:
        assert list(r["profiles"]) == ["prefill", "decode"]
        assert r["profiles"]["prefill"]["past.0.key"] == [[0, 1, 32], [0, 1, 32], [256, 2, 32]]
        assert r["profiles"]["decode"]["past.0.key"] == [[1, 1, 32], [256, 1, 32], [256, 2, 32]]
        assert r["profiles"]["decode"]["x"] == [[1, 1, 32], [1, 1, 32], [2, 1, 32]]
    meta = json.loads((tmp_path / "eng" / "engine.json").read_text())  # what the runtime and serve read
    assert meta["engines"] == {"model": {"file": "model.engine", "report": "model.report.json",
                                         "profiles": list(r["profiles"]), "profile_shapes": r["profiles"]}}
    assert (meta["max_batch"], meta["max_seq_len"], meta["min_seq_len"], meta["backend"]) == (2, 256, 1, "tensorrt-rtx")
    assert sorted(p.name for p in (tmp_path / "eng").glob("*.engine")) == ["model.engine"]


def test_tiny_llama_export_builds_one_engine_for_both_phases(lib, tiny_export, tmp_path):
    """The real exported graph of a tiny Llama (static router, kv_policy=skip): every routed block's
    ops become plugin layers and one engine serves prefill and decode (per-phase profiles here, the
    harder case: a zero-volume past in one, S = 1 in the other)."""
    routed, export = tiny_export
    report, _ = _build(export, tmp_path / "eng", plugin_library=str(lib), max_seq_len=64, profiles="phases")
    r = report["reports"]["model"]
    assert list(r["profiles"]) == ["prefill", "decode"] and not r["fell_back"]
    routed_layers = sum(routed.layer_is_routed(li) for li in range(4))
    assert sorted(p["plugin"] for p in r["plugin_layers"]) == sorted(["TopKGather", "ScatterTokens"] * routed_layers)
    assert r["profiles"]["prefill"]["past.1.key"][2][0] == 64 and r["profiles"]["decode"]["input_ids"][2] == [1, 1]
    meta = json.loads((tmp_path / "eng" / "engine.json").read_text())
    assert (tmp_path / "eng" / meta["routers"] / "tokenskip.json").is_file()
    assert (tmp_path / "eng" / meta["tokenizer"]).is_dir()
