"""Runtime correctness on a machine with no GPU (issue 13, "The runtime, made correct"): bad engine
and export folders give one-line errors, the TensorRT flavour comes from engine.json, engine.json
is the commit marker, a missing onnx extra is named, and `bench --backend trt` reads the routing
the engine folder carries. Each test failed against the code before its fix."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from tokenskip.config import build_routed, save_routing
from tokenskip.errors import UserError

from conftest import make_tiny_llama


def one_line_error(res) -> str:
    out = res.output.strip()
    assert res.exit_code == 1, out
    assert "Traceback" not in out and isinstance(res.exception, SystemExit), out
    errors = [ln for ln in out.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, out
    return errors[0]


# ------------------------------------------------------------------------------- engine folders
def engine_folder(path, **meta):
    """An engine folder as `tokenskip build` lays it out (the engine bytes are never read here)."""
    from tokenskip.deploy.engine.build import ENGINE_SIDECAR

    path.mkdir(parents=True, exist_ok=True)
    (path / "model.engine").write_bytes(b"engine")
    side = {"format": "tokenskip-engines", "version": 1, "backend": "tensorrt-rtx", "max_seq_len": 64,
            "compute_capabilities": ["8.6"],
            "engines": {"model": {"file": "model.engine", "profiles": ["prefill", "decode"]}}, **meta}
    (path / ENGINE_SIDECAR).write_text(json.dumps(side))
    return path


def test_corrupt_engine_json_is_one_line(tmp_path):
    from tokenskip.deploy.runtime import trt_backend as trt_runtime

    d = engine_folder(tmp_path / "eng")
    (d / "engine.json").write_text("{not json")
    with pytest.raises(UserError, match="engine.json.*not valid JSON"):
        trt_runtime.read_engine_dir(d)
    (d / "engine.json").write_text(json.dumps(["a list"]))
    with pytest.raises(UserError, match="not a tokenskip engine folder"):
        trt_runtime.read_engine_dir(d)


def test_engine_json_is_the_commit_marker(tmp_path):
    """Engine files without engine.json are an unfinished build: refused, never globbed."""
    from tokenskip.deploy.runtime import trt_backend as trt_runtime

    d = tmp_path / "eng"
    d.mkdir()
    for name in ("prefill.engine", "decode.engine", "model.engine"):
        (d / name).write_bytes(b"engine")
    with pytest.raises(UserError, match="no engine.json"):
        trt_runtime.read_engine_dir(d)


def test_runtime_imports_the_flavour_recorded_in_engine_json(tmp_path, monkeypatch):
    """An RTX engine is opened with TensorRT-RTX even where full TensorRT is installed."""
    from tokenskip.deploy.engine import flavour
    from tokenskip.deploy.runtime import trt_backend as trt_runtime

    d = engine_folder(tmp_path / "eng", backend="tensorrt-rtx")
    asked = []

    def fake_get_backend(name=None):
        asked.append(name)
        raise UserError("stop here")

    monkeypatch.setattr(trt_runtime, "check_gpu", lambda meta, where: None)
    monkeypatch.setattr(flavour, "get_flavour", fake_get_backend)
    with pytest.raises(UserError, match="stop here"):
        trt_runtime.TrtBackend(d)
    assert asked == ["tensorrt-rtx"]


def test_engine_json_without_backend_is_refused(tmp_path):
    from tokenskip.deploy.runtime import trt_backend as trt_runtime

    d = engine_folder(tmp_path / "eng", backend=None)
    with pytest.raises(UserError, match="backend"):
        trt_runtime.read_engine_dir(d)


# ------------------------------------------------------------------------------- export folders
def minimal_sidecar() -> dict:
    """The fields of export.json the runtimes read, for a 1-layer model (see docs/export.md)."""
    io = {"inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]}},
          "outputs": {"logits": {"dtype": "float32", "shape": ["batch", 256]}}}
    return {"format": "tokenskip-export", "version": 2, "model": "tiny", "dtype": "fp32", "max_seq_len": 64,
            "kv_policy": "skip", "routing": {"router": "dense"}, "tokenizer": "tokenizer", "routers": "routing",
            "config": {"num_layers": 1, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256},
            "layers": [{"layer": 0, "routed": False}], "cache": {"layout": "seq-major", "layers": [0]},
            "graphs": {"model": {"file": "model.onnx", "data": "model.onnx.data", **io}}}


def export_folder(path, mutate=None):
    """A minimal export folder (valid sidecar, placeholder graph files)."""
    path.mkdir(parents=True, exist_ok=True)
    side = minimal_sidecar()
    for entry in side["graphs"].values():
        (path / entry["file"]).write_bytes(b"onnx")
        (path / entry["data"]).write_bytes(b"data")
    if mutate:
        mutate(side)
    (path / "export.json").write_text(json.dumps(side))
    return path


def _set(keys, value):
    def mutate(side):
        d = side
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return mutate


def _first_graph(side):
    return next(iter(side["graphs"]))


MALFORMED = [  # (case, mutation, what the one-line error must name)
    ("graphs is a list", lambda s: s.__setitem__("graphs", []), "'graphs'"),
    ("graph entry is a string", lambda s: s["graphs"].__setitem__(_first_graph(s), "model.onnx"), ".file"),
    ("input spec without shape", lambda s: s["graphs"][_first_graph(s)]["inputs"].__setitem__("input_ids", {}),
     "inputs.input_ids"),
    ("max_seq_len is text", _set(["max_seq_len"], "long"), "max_seq_len"),
    ("layers is an object", _set(["layers"], {"0": 1}), "'layers'"),
    ("config is a list", _set(["config"], []), "'config'"),
    ("tokenizer is a number", _set(["tokenizer"], 3), "'tokenizer'"),
    ("cache layout unknown", _set(["cache", "layout"], "batch-major"), "'cache'"),
    ("head_dim missing", lambda s: s["config"].pop("head_dim"), "config.head_dim"),
    ("weights file missing", _set(["graphs", "model", "data"], "gone.data"), "gone.data"),
    ("an old two-graph export", _set(["version"], 1), "version 1 had separate prefill/decode graphs"),
]


@pytest.mark.parametrize("what,mutate,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_export_sidecar_is_one_line(tmp_path, what, mutate, field):
    from tokenskip.deploy.cli import generate

    d = export_folder(tmp_path / "exp", mutate)
    line = one_line_error(CliRunner().invoke(generate, ["--onnx", str(d), "--prompt", "hi"]))
    assert "export.json" in line and field in line, line


def test_malformed_sidecar_for_build_and_validate(tmp_path):
    from tokenskip.deploy.runtime.validate import run_validation

    d = export_folder(tmp_path / "exp", MALFORMED[1][1])
    with pytest.raises(UserError, match="export.json"):
        run_validation(d)
    from tokenskip.deploy.engine import build as engine_build

    with pytest.raises(UserError, match="export.json"):
        engine_build.read_export_graphs(d)


def test_missing_onnx_extra_is_named(tmp_path, monkeypatch):
    from tokenskip.deploy.cli import generate

    d = export_folder(tmp_path / "exp")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    line = one_line_error(CliRunner().invoke(generate, ["--onnx", str(d), "--prompt", "hi"]))
    assert "tokenskip[onnx]" in line


# ------------------------------------------------------------------------- bench --backend trt
def test_bench_trt_without_routers_uses_the_engine_routing(tmp_path, monkeypatch):
    """--backend trt with only --engine/--engine-dense: the schedule comes from the engine folders."""
    from tokenskip.deploy.runtime.trt_backend import TrtBackend
    from tokenskip.deploy.bench.latency import DenseTorch, RoutedTorch
    from tokenskip.deploy.cli import bench

    from conftest import make_char_tokenizer

    model = make_tiny_llama(tmp_path / "tiny", seed=2).requires_grad_(False)
    make_char_tokenizer(tmp_path / "tiny")
    dirs = {}
    for kind, sparsity in (("routed", 0.3), ("dense", None)):
        d = engine_folder(tmp_path / kind, model=str(tmp_path / "tiny"), routers="routing")
        routed, cfg = build_routed(model, router="static" if sparsity else "dense", sparsity=sparsity,
                                   model_name=str(tmp_path / "tiny"))
        save_routing(d / "routing", cfg)
        dirs[kind] = d

    def fake_trt(engine_dir):  # the engines cannot run here: the routed model stands in for them
        from tokenskip.config import build_routed as br

        routed, _ = br(model, routers_dir=f"{engine_dir}/routing")
        return (RoutedTorch if routed.router is not None else DenseTorch)(routed)

    monkeypatch.setattr(TrtBackend, "open", classmethod(lambda cls, spec: fake_trt(spec.engine_dir)))
    res = CliRunner().invoke(bench, ["--backend", "trt", "--engine", str(dirs["routed"]), "--engine-dense",
                                     str(dirs["dense"]), "--model", str(tmp_path / "tiny"), "--seq-lens", "24",
                                     "--batch", "1", "--repeats", "1", "--warmup", "0", "--decode-steps", "1",
                                     "--overhead-seq", "0", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)["rows"][0]
    assert row["backend"] == "trt" and row["ideal"] > 1 and row["achieved"] > 0
    assert torch.isfinite(torch.tensor(row["routed_ms"]))
