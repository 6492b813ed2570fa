"""Export (LLM + routers to ONE ONNX graph for prefill and decode, with tokenskip custom ops,
validated with ONNX Runtime).

Slow tests use the session's smollm2-135m export (static router at 0.3, kv_policy skip) and a
second one with kv_policy dense (about 30 s each since the one-trace exporter) and validate them in ONNX Runtime (CPU EP, no custom-op
library) against the PyTorch routed model. Fast tests cover the CLI's input errors, atomicity, a
learned router (random weights) on a tiny random Llama, fp16/bf16 exports, the weights stored
once, and the export benchmark on a tiny shape.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

ort = pytest.importorskip("onnxruntime")

from tokenskip.config import RoutingConfig, build_routed, load_routing, save_routing  # noqa: E402
from tokenskip.export import exporter, onnx_ops  # noqa: E402
from tokenskip.export.cli import export as export_cmd  # noqa: E402
from tokenskip.export.cli import validate as validate_cmd  # noqa: E402
from tokenskip.deploy.runtime.validate import format_report, run_validation  # noqa: E402
from tokenskip.deploy.runtime.validate import empty_past  # noqa: E402
from tokenskip.export.wrappers import CACHE_FIELDS, StepGraph, to_seq_major  # noqa: E402
from tokenskip.routed import default_positions  # noqa: E402
from tokenskip.schedule import Schedule  # noqa: E402

from conftest import export_tiny, random_learned_router  # noqa: E402

ATOL = 1e-3


def tokenskip_nodes(model: onnx.ModelProto):
    return [n for n in onnx_ops.all_nodes(model.graph) if n.domain == "tokenskip"]  # routed branch included


def attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary export folders left next to an output folder."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------------------- CLI input errors
def run_cli(cmd, args):
    res = CliRunner().invoke(cmd, args)
    out = res.output.strip()
    return res, out


@pytest.mark.parametrize("args,needle", [
    (["--router", "static", "--sparsity", "1.0"], "--sparsity 1.0: must be in [0, 1)"),
    (["--router", "static", "--sparsity", "-0.1"], "must be in [0, 1)"),
    (["--router", "static", "--sparsity", "0.3", "--opset", "17"], "--opset 17: supported opsets are 18..21"),
    (["--router", "static", "--sparsity", "0.3", "--opset", "99"], "supported opsets are 18..21"),
    (["--router", "static"], "--router static needs --sparsity"),
    ([], "choose what to export"),
    (["--router", "dense", "--sparsity", "0.3"], "--router dense takes no --sparsity"),
    (["--router", "static", "--sparsity", "0.3", "--max-seq-len", "1"], "--max-seq-len 1"),
])
def test_cli_bad_input_is_one_line_error(tmp_path, args, needle):
    out_dir = tmp_path / "out"
    res, out = run_cli(export_cmd, [*args, "--out", str(out_dir)])
    assert res.exit_code != 0
    assert needle in out
    assert len(out.splitlines()) == 1 and "Traceback" not in out
    assert not out_dir.exists() and not leftovers(tmp_path, "out")


def test_cli_attention_chunks_out_of_range_names_the_flag(tmp_path):
    res, out = run_cli(export_cmd, ["--router", "dense", "--attention-chunks", "0", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--attention-chunks" in out and "Traceback" not in out
    assert not (tmp_path / "o").exists()


def test_cli_refuses_non_empty_out_without_force(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    res, out = run_cli(export_cmd, ["--router", "dense", "--out", str(out_dir)])
    assert res.exit_code != 0 and len(out.splitlines()) == 1
    assert "not empty" in out and "--force" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]
    assert not leftovers(tmp_path, "out")


def test_cli_routers_folder_errors(tmp_path):
    res, out = run_cli(export_cmd, ["--routers", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no such folder" in out and len(out.splitlines()) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenskip.json").write_text("{not json")
    res, out = run_cli(export_cmd, ["--routers", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "not valid JSON" in out and len(out.splitlines()) == 1
    res, out = run_cli(export_cmd, ["--routers", str(bad), "--router", "static", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "drop --router" in out


def test_cli_validate_errors(tmp_path):
    res, out = run_cli(validate_cmd, [str(tmp_path / "missing")])
    assert res.exit_code != 0 and "no such export folder" in out and len(out.splitlines()) == 1
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "export.json").write_text(json.dumps({"format": "other"}))
    res, out = run_cli(validate_cmd, [str(tmp_path / "e")])
    assert res.exit_code != 0 and "not a tokenskip export" in out
    res, out = run_cli(validate_cmd, [str(tmp_path / "e"), "--batch", "x"])
    assert res.exit_code != 0 and "--batch x" in out


# ------------------------------------------------------------------ tiny model: atomicity, learned
@pytest.fixture(scope="module")
def tiny_learned(tiny_llama, tmp_path_factory):
    """A tiny Llama with a random-initialised LearnedRouter saved via save_routing (a stand-in
    for a trained router), exported once."""
    model, path = tiny_llama
    router = random_learned_router()
    sched = Schedule((0.0, 0.4, 0.3, 0.0))
    cfg = RoutingConfig(model=str(path), num_layers=4, router="learned", schedule=list(sched.sparsity),
                        kv_policy="skip", model_type="llama", hidden_size=64, score_window=8)
    routers_dir = tmp_path_factory.mktemp("tiny-routers")
    save_routing(routers_dir, cfg, router)
    routed, cfg = build_routed(model, routers_dir=routers_dir)
    out = tmp_path_factory.mktemp("tiny-export") / "exp"
    side = export_tiny(model, str(path), routed, cfg, out)
    return routed, out, side


def test_interrupted_export_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    model, path = tiny_llama
    routed, cfg = build_routed(model, router="static", sparsity=0.3)
    loaded = types.SimpleNamespace(model=model, tokenizer=None, name=str(path))

    def boom(*a, **k):
        raise KeyboardInterrupt

    def partial(routed, opset, max_seq_len, optimize, path, timings):
        Path(path).write_bytes(b"partial")  # half an export written, then interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "export_graph", partial)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_model(loaded, routed, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not leftovers(tmp_path, "out")
    # with --force over an old export, the old one survives an interrupted run
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.onnx").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        exporter.export_model(loaded, routed, cfg, tmp_path / "old", force=True)
    assert (tmp_path / "old" / "model.onnx").read_text() == "old"
    assert not leftovers(tmp_path, "old")


def _session(out):
    return ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


def test_tiny_learned_router_export_matches_pytorch(tiny_learned):
    """A prefill call (empty past) of the one graph equals the routed model's forward."""
    routed, out, side = tiny_learned
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nodes = tokenskip_nodes(model)
    assert [n.op_type for n in nodes] == ["TopKGather", "ScatterTokens"] * 2
    assert attrs(nodes[0])["keep_num"] == 3 and attrs(nodes[0])["keep_den"] == 5  # block 1: s = 0.4
    assert (out / "routing" / "tokenskip.json").is_file() and (out / "routing" / "router.safetensors").is_file()
    graph = StepGraph(routed).eval()
    sess = _session(out)
    names = [o.name for o in sess.get_outputs()]
    assert names == graph.output_names()
    g = torch.Generator().manual_seed(1)
    for bsz, seq in [(1, 5), (3, 40), (2, 150)]:  # below and above the score window
        ids = torch.randint(0, 256, (bsz, seq), generator=g)
        mask = torch.ones_like(ids)
        if bsz > 1:
            mask[1, : seq // 3] = 0
        pos = default_positions(mask.bool())
        past = empty_past(graph, bsz)
        feeds = dict(zip(graph.input_names(), [t.numpy() for t in (ids, mask, pos, *past)]))
        got = dict(zip(names, sess.run(None, feeds)))
        with torch.no_grad():
            ref = dict(zip(names, graph(ids, mask, pos, *past)))
        for n in names:
            if not ref[n].is_floating_point():
                assert np.array_equal(got[n], ref[n].numpy()), (bsz, seq, n)
            else:
                assert np.abs(got[n] - ref[n].numpy()).max() <= 1e-4, (bsz, seq, n)


def test_one_trace_equals_torch_onnx_own_route(tiny_learned, tmp_path, monkeypatch):
    """The exporter skips torch.onnx's decomposition retrace and re-runs no node for type promotion
    (tokenskip.export.trace); forcing torch.onnx's own route gives a graph with the same outputs in
    ONNX Runtime, prefill and a decode step, and the sidecar says which route ran."""
    from tokenskip.export import trace

    routed, fast_out, side = tiny_learned
    assert side["timings"]["retraced"] is False
    monkeypatch.setattr(trace, "lower_in_place", lambda gm, translated: False)  # "an op needs the retrace"
    monkeypatch.setattr(trace, "_recorded_promotion", lambda: (_ for _ in ()).throw(ImportError("moved")))
    cfg, _ = load_routing(fast_out / "routing")
    slow_side = export_tiny(routed.model, "tiny", routed, cfg, tmp_path / "slow")
    assert slow_side["timings"]["retraced"] is True
    graph = StepGraph(routed)
    fast, slow = _session(fast_out), _session(tmp_path / "slow")
    names = [o.name for o in fast.get_outputs()]
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    feeds = dict(zip(graph.input_names(), [t.numpy() for t in (ids, mask, default_positions(mask.bool()),
                                                                *empty_past(graph, 2))]))
    a, b = dict(zip(names, fast.run(None, feeds))), dict(zip(names, slow.run(None, feeds)))
    step = {"input_ids": a["logits"].argmax(-1)[:, None], "attention_mask": np.ones((2, 1), np.int64),
            "position_ids": mask.sum(-1, keepdim=True).numpy(),
            **{f"past.{n[4:]}": v for n, v in a.items() if n.startswith("new.")}}
    a2, b2 = dict(zip(names, fast.run(None, step))), dict(zip(names, slow.run(None, step)))
    for x, y in ((a, b), (a2, b2)):
        for n in names:
            assert x[n].dtype == y[n].dtype and x[n].shape == y[n].shape, n
            assert np.allclose(x[n], y[n], rtol=0, atol=1e-5), n


def test_lower_in_place_rewrites_known_spellings_and_refuses_the_rest():
    """The in-place lowering handles `&`, `|` and `.to(dtype)`; an op torch.onnx would decompose
    (argsort) leaves the graph untouched and asks for the retrace."""
    from torch.onnx._internal.exporter import _decomp, _registration

    from tokenskip.export.trace import lower_in_place

    translated = set(_decomp.get_onnx_implemented_overloads(_registration.ONNXRegistry.from_torchlib()))

    class Known(torch.nn.Module):
        def forward(self, a, b):
            return ((a > 0) & (b > 0) | (a < b)).to(torch.float32)

    class Unknown(torch.nn.Module):
        def forward(self, a):
            return torch.argsort(a, dim=-1)

    x, y = torch.randn(2, 5), torch.randn(2, 5)
    ep = torch.export.export(Known(), (x, y))
    assert lower_in_place(ep.graph_module, translated)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.bitwise_and.Tensor in targets and torch.ops.aten.__and__.Tensor not in targets
    assert torch.ops.aten.to.dtype not in targets
    assert torch.equal(ep.module()(x, y), Known()(x, y))  # the rewritten graph computes the same
    ep = torch.export.export(Unknown(), (x,))
    before = [n.target for n in ep.graph.nodes]
    assert not lower_in_place(ep.graph_module, translated)
    assert [n.target for n in ep.graph.nodes] == before


def test_tiny_graph_decodes_against_its_own_cache(tiny_learned):
    """The same graph with S = 1 and the cache as past equals RoutedModel.decode_step, step by step
    (per-layer caches of different lengths: kv_policy=skip)."""
    routed, out, side = tiny_learned
    graph = StepGraph(routed)
    sess = _session(out)
    names = [o.name for o in sess.get_outputs()]
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    past = empty_past(graph, 2)
    feeds = dict(zip(graph.input_names(), [t.numpy() for t in (ids, mask, default_positions(mask.bool()), *past)]))
    outs = dict(zip(names, sess.run(None, feeds)))
    with torch.no_grad():
        logits, cache = routed.prefill(ids, mask)
    assert [outs[f"new.{l}.key"].shape[0] for l in range(4)] == [30, 18, 21, 30]
    past = {f"past.{l}.{f}": outs[f"new.{l}.{f}"] for l in range(4) for f in CACHE_FIELDS}
    tok, pos = logits.argmax(-1, keepdim=True), mask.sum(-1, keepdim=True)
    for _ in range(5):
        res = dict(zip(names, sess.run(None, {"input_ids": tok.numpy(), "attention_mask": np.ones((2, 1), np.int64),
                                               "position_ids": pos.numpy(), **past})))
        with torch.no_grad():
            logits, cache = routed.decode_step(tok, pos, cache)
        assert np.abs(res["logits"] - logits.numpy()).max() <= 1e-4
        assert all(res[f"new.{l}.key"].shape[0] == 1 for l in range(4))  # k = S = 1: one new row per layer
        past = {f"past.{l}.{f}": np.concatenate([past[f"past.{l}.{f}"], res[f"new.{l}.{f}"]]) for l in range(4)
                for f in CACHE_FIELDS}
        tok, pos = logits.argmax(-1, keepdim=True), pos + 1
    for l in range(4):  # the concatenated rows are exactly the PyTorch cache (seq-major)
        ref = to_seq_major(cache[l])
        assert np.abs(past[f"past.{l}.key"] - ref[0].numpy()).max() <= 1e-4
        assert np.array_equal(past[f"past.{l}.pos"], ref[2].numpy())


def test_tiny_sidecar_and_checker(tiny_learned):
    routed, out, side = tiny_learned
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk == json.loads(json.dumps(side))
    assert side["format"] == "tokenskip-export" and side["version"] == 2
    assert side["routing"]["router"] == "learned" and side["kv_policy"] == "skip"
    assert [l["routed"] for l in side["layers"]] == [False, True, True, False]
    ins, outs = side["graphs"]["model"]["inputs"], side["graphs"]["model"]["outputs"]
    for name in ("input_ids", "attention_mask", "position_ids"):
        assert ins[name] == {"dtype": "int64", "shape": ["batch", "seq"]}
    assert ins["past.2.key"] == {"dtype": "float32", "shape": ["past_2", "batch", 2, 16]}
    assert ins["past.2.valid"] == {"dtype": "bool", "shape": ["past_2", "batch"]}
    assert outs["new.1.key"]["shape"] == ["kept_1", "batch", 2, 16] and outs["new.0.key"]["shape"][0] == "seq"
    assert outs["index.1"]["shape"] == ["batch", "kept_1"]
    assert side["cache"] == {"layout": "seq-major", "fields": list(CACHE_FIELDS), "layers": [0, 1, 2, 3]}
    assert set(side["timings"]) >= {"export_s", "translate_s", "simplify_s", "save_s", "total_s"}
    assert side["timings"]["retraced"] is False  # one trace: torch.onnx's decomposition retrace skipped
    onnx_ops.register_schemas()
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert oct(os.stat(out).st_mode & 0o777) != "0o700"  # not mkdtemp's private mode


def test_weights_are_stored_once(tiny_learned):
    """One graph file and one weights file, holding each LLM parameter once (tied ones once)."""
    routed, out, side = tiny_learned
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == ["export.json", "model.onnx", "model.onnx.data"]
    unique = {p.data_ptr(): p.nbytes for p in routed.model.parameters()}
    data = (out / "model.onnx.data").stat().st_size
    total = sum(unique.values())
    assert 0.98 * total <= data <= 1.02 * total + 65536  # once (not twice), + router and small constants
    # the graph itself: no weights inside (~230 KB: two traces, the prefill one with causal attention chunks)
    assert (out / "model.onnx").stat().st_size < 400_000


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_export(tiny_llama, tmp_path, dtype):
    """The LLM loaded in fp16/bf16 exports in that dtype with fp32 router scores; fp16 runs in ONNX
    Runtime's CPU provider (bf16 has no CPU kernels there: it targets TensorRT / CUDA)."""
    from tokenskip.models import load_model

    _, path = tiny_llama
    from conftest import make_char_tokenizer

    make_char_tokenizer(path)
    lm = load_model(str(path), dtype=dtype)
    assert next(lm.model.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    routed, cfg = build_routed(lm.model, router="static", sparsity=0.4, model_name=str(path))
    with pytest.raises(Exception, match="loaded in"):
        exporter.export_model(lm, routed, cfg, tmp_path / "x", dtype="fp32")
    side = exporter.export_model(lm, routed, cfg, tmp_path / "out", max_seq_len=64, check=False)
    onnx_dtype = {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert side["dtype"] == dtype and side["graphs"]["model"]["outputs"]["logits"]["dtype"] == onnx_dtype
    assert side["graphs"]["model"]["inputs"]["past.0.key"]["dtype"] == onnx_dtype
    onnx_ops.register_schemas()
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False))
    graphs = [model.graph, *(a.g for n in onnx_ops.all_nodes(model.graph) for a in n.attribute if a.g.node)]  # If branches
    types = {v.name: v.type.tensor_type.elem_type for g in graphs for v in [*g.value_info, *g.input]}
    half = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    for topk in tokenskip_nodes(model)[::2]:  # the hidden states in the LLM's dtype, the router's scores fp32
        assert (types[topk.input[0]], types[topk.input[1]]) == (half, onnx.TensorProto.FLOAT)
    data = (tmp_path / "out" / "model.onnx.data").stat().st_size
    assert data < sum(p.numel() for p in lm.model.parameters()) * 2.1  # 2 bytes per weight
    if dtype == "fp16":
        from tokenskip.deploy.runtime.ort_backend import OrtBackend
        from tokenskip.deploy.runtime.torch_backend import TorchBackend

        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        got, _ = OrtBackend(tmp_path / "out", threads=1).prefill(ids, mask)
        ref, _ = TorchBackend(routed).prefill(ids, mask)
        assert (got - ref).abs().max() <= 2e-3


# ------------------------------------------------------------------------ smollm2-135m (slow)
@pytest.fixture(scope="module")
def smol_exports(smollm2, smol_export, tmp_path_factory):
    """Static router at 0.3: kv_policy skip (the session's shared export) and kv_policy dense."""
    root = tmp_path_factory.mktemp("smol-export-dense")
    routed, cfg = build_routed(smollm2.model, router="static", sparsity=0.3, kv_policy="dense",
                               model_name="smollm2-135m")
    exporter.export_model(smollm2, routed, cfg, root / "dense")
    return {"skip": smol_export, "dense": root / "dense"}


@pytest.mark.slow
def test_smol_graph_has_custom_ops_and_functions(smol_exports):
    out = smol_exports["skip"]
    side = json.loads((out / "export.json").read_text())
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert model.ir_version == 10
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    assert {o.domain: o.version for o in model.opset_import}["tokenskip"] == 1
    nodes = tokenskip_nodes(model)
    routed_layers = [l for l in side["layers"] if l["routed"]]
    assert len(routed_layers) == 26  # uniform: first 2 and last 2 blocks dense
    assert [n.op_type for n in nodes] == ["TopKGather", "ScatterTokens"] * len(routed_layers)
    for node, layer in zip(nodes[::2], routed_layers):
        a = attrs(node)
        assert a["plugin_namespace"] == b"tokenskip"
        assert (a["keep_num"], a["keep_den"], a["min_keep"]) == (layer["keep_num"], layer["keep_den"], 2)
    assert all(attrs(n)["plugin_namespace"] == b"tokenskip" for n in nodes[1::2])
    assert {(f.domain, f.name) for f in model.functions} == {("tokenskip", "TopKGather"), ("tokenskip", "ScatterTokens")}
    # the weights once: one graph, one data file of the fp32 parameters (tied embeddings once)
    assert sorted(p.name for p in out.glob("*.onnx*")) == ["model.onnx", "model.onnx.data"]
    assert 134e6 * 4 <= (out / "model.onnx.data").stat().st_size <= 136e6 * 4
    assert (out / "tokenizer" / "tokenizer.json").is_file() or (out / "tokenizer" / "tokenizer_config.json").is_file()
    # the generation config travels with the tokenizer: ORT/TRT serving stops on all its eos ids
    assert "eos_token_id" in json.loads((out / "tokenizer" / "generation_config.json").read_text())
    dense_side = json.loads((smol_exports["dense"] / "export.json").read_text())
    assert dense_side["graphs"]["model"]["outputs"]["new.5.key"]["shape"] == ["seq", "batch", 3, 64]
    assert side["graphs"]["model"]["outputs"]["new.5.key"]["shape"] == ["kept_5", "batch", 3, 64]


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["skip", "dense"])
def test_smol_validate_against_pytorch(smollm2, smol_exports, kv):
    report = run_validation(smol_exports[kv], atol=ATOL, batches=[1, 4], decode_tokens=32, samples=1,
                            loaded=smollm2)
    print("\n" + format_report(report))
    assert report["passed"], report["failures"]
    groups = report["summary"]["groups"]
    assert groups["logits"]["max_abs"] <= ATOL
    assert groups["index.*"]["exact"] and groups["new.*.pos"]["exact"]
    assert report["summary"]["min_top1_agreement"] == 1.0
    assert len(report["decode"]) == 2 and all(d["identical"] and d["tokens"] == 32 for d in report["decode"])
    assert sorted(d["batch"] for d in report["decode"]) == [1, 4]


@pytest.mark.slow
def test_smol_validate_cli_json_and_failure_exit(smol_exports):
    out = str(smol_exports["skip"])
    res = CliRunner().invoke(validate_cmd, [out, "--json", "--batch", "2", "--samples", "0", "--decode-tokens", "3",
                                            "--window", "24"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["passed"] and report["decode"][0]["tokens"] == 3
    # an impossible tolerance fails with a non-zero exit and names the output
    res = CliRunner().invoke(validate_cmd, [out, "--atol", "0", "--batch", "1", "--samples", "0",
                                            "--decode-tokens", "0", "--window", "24"])
    assert res.exit_code == 1
    assert "FAILED" in res.output and "logits" in res.output


@pytest.mark.slow
def test_smol_routers_for_another_model(tmp_path):
    cfg = RoutingConfig(model="tiny", num_layers=4, router="static", schedule=[0.0, 0.3, 0.3, 0.0],
                        model_type="llama", hidden_size=64)
    save_routing(tmp_path / "r", cfg)
    res = CliRunner().invoke(export_cmd, ["--routers", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    out = res.output.strip()
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert res.exit_code != 0 and len(errors) == 1 and "Traceback" not in out, out
    assert "was made for a model with 4 layers" in errors[0]
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path, "o")


def test_bench_export_on_a_tiny_random_llama(tmp_path):
    """`tokenskip bench-export` (the 1B benchmark's command) on a tiny shape: a fresh process, stage
    timings, peak RSS within 1.5 x weights + 2 GiB, the weights written once in fp16."""
    from tokenskip.export.cli import bench_export

    res = CliRunner().invoke(bench_export, ["--random-llama", "tiny", "--dtype", "fp16", "--max-seq-len", "64",
                                            "--json", "--json-out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r == json.loads((tmp_path / "r.json").read_text())
    assert r["dtype"] == "fp16" and r["layers"] == 3 and r["within_budget"]
    assert 0 < r["rss_after_load_bytes"] <= r["peak_rss_bytes"] <= r["rss_budget_bytes"]
    assert r["weight_bytes"] == 2 * r["parameters"]
    assert r["weight_bytes"] * 0.98 <= r["files"]["model.onnx.data"] <= r["weight_bytes"] * 1.02 + 65536
    assert r["stages"]["export_s"] > 0 and r["export_s"] >= r["stages"]["export_s"] + r["stages"]["translate_s"]
    assert r["stages"]["retraced"] is False
    res = CliRunner().invoke(bench_export, ["--random-llama", "tiny", "--model", "x"])
    assert res.exit_code != 0 and "not both" in res.output
