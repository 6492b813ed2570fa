"""Routing cost in ONNX Runtime (deploy/bench/ort_cost.py): the structural attribution rule on a
hand-built graph, and the profiled attribution on a tiny learned-router export (seconds)."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

pytest.importorskip("onnxruntime")

from tokenskip.config import RoutingConfig, build_routed, save_routing  # noqa: E402
from tokenskip.deploy.bench import ort_cost  # noqa: E402
from tokenskip.export import onnx_ops  # noqa: E402
from tokenskip.schedule import Schedule  # noqa: E402

from conftest import export_tiny, random_learned_router  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_router_nodes_are_those_only_the_selection_uses():
    """h -> q (shared: the model and the router read it) -> score chain -> TopKGather.scores;
    valid comes from a node used only as TopKGather.valid; a node feeding both is not router."""
    n = helper.make_node
    nodes = [
        n("Relu", ["h"], ["q"], name="shared_q"),  # model + router: not router
        n("ReduceSum", ["q", "ax"], ["s0"], name="score_sum", keepdims=0),  # router
        n("Neg", ["s0"], ["scores"], name="score_neg"),  # router
        n("Not", ["pad"], ["valid"], name="valid_not"),  # only TopKGather.valid: router (its input)
        n("Identity", ["s0"], ["leak"], name="leak"),  # consumer of s0 that is a graph output: not router
        n("TopKGather", ["q", "scores", "valid"], ["kept", "index"], name="tg", domain=onnx_ops.DOMAIN,
          keep_num=1, keep_den=2, min_keep=1),
        n("Add", ["kept", "kept"], ["delta"], name="block"),
        n("ScatterTokens", ["h", "delta", "index"], ["out"], name="st", domain=onnx_ops.DOMAIN),
    ]
    vi = helper.make_tensor_value_info
    inputs = [vi("h", TensorProto.FLOAT, ["B", "S", 4]), vi("pad", TensorProto.BOOL, ["B", "S"])]
    g = helper.make_graph(nodes, "g", inputs,
                          [vi("out", TensorProto.FLOAT, ["B", "S", 4]), vi("leak", TensorProto.FLOAT, ["B", "S"])],
                          [helper.make_tensor("ax", TensorProto.INT64, [1], [-1])])
    names = {g.node[i].name for i in ort_cost.routing_nodes(g)}
    assert names == {"score_neg", "valid_not"}  # score_sum also feeds the `leak` graph output
    g.output.pop()  # without the leak output, the leak node has no use and is not counted; score_sum is router
    del g.node[4]
    names = {g.node[i].name for i in ort_cost.routing_nodes(g)}
    assert names == {"score_sum", "score_neg", "valid_not"}


@pytest.fixture(scope="module")
def tiny_learned_export(tiny_llama, tmp_path_factory):
    """The tiny Llama with a random LearnedRouter, two routed blocks, exported once (a few s)."""
    model, path = tiny_llama
    sched = Schedule((0.0, 0.4, 0.3, 0.0))
    cfg = RoutingConfig(model=str(path), num_layers=4, router="learned", schedule=list(sched.sparsity),
                        kv_policy="skip", model_type="llama", hidden_size=64, score_window=8)
    routers_dir = tmp_path_factory.mktemp("ort-cost-routers")
    save_routing(routers_dir, cfg, random_learned_router())
    routed, cfg = build_routed(model, routers_dir=routers_dir)
    out = tmp_path_factory.mktemp("ort-cost-export") / "exp"
    export_tiny(model, str(path), routed, cfg, out, max_seq_len=128, check=False)
    return out


def test_profiled_attribution_on_a_tiny_learned_export(tiny_learned_export):
    r = ort_cost.ort_routing_cost(tiny_learned_export, seq=64, repeats=2, warmup=1, threads=1)
    assert r["nodes"]["gather"] == 2 and r["nodes"]["scatter"] == 2  # the two routed blocks
    assert r["nodes"]["router"] > 20  # features, rank sort, MLP, attention window, table updates
    assert 0 < r["router_ms"] < r["profiled_kernels_ms"]
    assert r["gather_ms"] > 0 and r["scatter_ms"] > 0 and r["model_ms"] > r["router_ms"]
    parts = sum(r[k] for k in ("router_ms", "gather_ms", "scatter_ms", "index_ms", "model_ms", "unattributed_ms"))
    assert parts == pytest.approx(r["profiled_kernels_ms"], rel=1e-6)
    assert r["unattributed_ms"] < 0.2 * r["profiled_kernels_ms"]  # ORT-made names stay a small remainder
    assert r["fraction_of"] == "routed" and r["dense_ms"] is None
    assert 0 < r["router_fraction"] < 1


def test_cli_errors_are_one_line(tiny_learned_export, tmp_path, capsys):
    assert ort_cost.main(["--export", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: --export") and "\n" not in err and "Traceback" not in err
    # a routed export as the dense denominator is refused
    assert ort_cost.main(["--export", str(tiny_learned_export), "--dense", str(tiny_learned_export)]) == 1
    err = capsys.readouterr().err.strip()
    assert "--dense" in err and "routed export" in err and "\n" not in err
