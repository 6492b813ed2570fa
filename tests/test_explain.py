"""`tokenskip explain` on a tiny random Llama with a character tokenizer: its keep masks are the
routed prefill's own traces, its next token is generation's first token, errors are one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from tokenskip.cli import main
from tokenskip.config import build_routed
from tokenskip.deploy.runtime.torch_backend import TorchBackend
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens
from tokenskip.routed import block_keep_count

from conftest import make_tiny_llama
from test_deploy import make_char_tokenizer

PROMPT = "Routing skips tokens, block by block: the sink and the last token always run."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, folder, tokenizer): tiny random Llama + char tokenizer, loadable with --model."""
    path = tmp_path_factory.mktemp("tiny-explain")
    model = make_tiny_llama(path, seed=2, layers=8)
    tok = make_char_tokenizer(path)
    model.requires_grad_(False)
    return model, path, tok


def _explain(path, *args) -> dict:
    res = CliRunner().invoke(main, ["explain", "--model", str(path), "--prompt", PROMPT, "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


@pytest.mark.parametrize("router", ["static", "random"])
def test_keep_masks_are_the_routed_prefill_traces(tiny, router):
    model, path, tok = tiny
    data = _explain(path, "--router", router, "--sparsity", "0.25", "--seed", "3")
    ids = tok(PROMPT, add_special_tokens=True)["input_ids"]
    seq = len(ids)
    assert [t["id"] for t in data["tokens"]] == ids
    assert "".join(t["text"] for t in data["tokens"]) == PROMPT
    routed, _ = build_routed(model, router=router, sparsity=0.25, seed=3)
    x = torch.tensor([ids])  # [1,S]
    out = routed(x, torch.ones_like(x), last_only=True, trace=True)
    assert len(data["keep"]) == len(out.traces) == 8
    for li, (row, tr) in enumerate(zip(data["keep"], out.traces)):
        kept = [t for t in range(seq) if row[t]]
        if routed.layer_is_routed(li):
            assert kept == tr.index[0].tolist()
            assert len(kept) == block_keep_count(routed.schedule, li, seq) < seq
            assert row[0] == 1 and row[-1] == 1  # attention sink and the logits token are forced
        else:
            assert kept == list(range(seq))
    assert data["blocks_run"] == [sum(c) for c in zip(*data["keep"])]
    assert data["kept"] == [sum(r) for r in data["keep"]]
    assert data["schedule"] == list(routed.schedule.sparsity)
    assert data["overall"] == pytest.approx(1 - sum(data["blocks_run"]) / (8 * seq))
    assert data["router"] == router and data["format"] == "tokenskip-explain"
    # the same prefill as generation: its next token is greedy generation's first token
    gen = generate_tokens(TorchBackend(routed), [ids], Sampling(max_new_tokens=1), pad_id=tok.pad_token_id)
    assert data["next_token"]["id"] == gen.tokens[0][0]


def test_static_and_random_masks_differ(tiny):
    _, path, _ = tiny
    static = _explain(path, "--router", "static", "--sparsity", "0.25")
    rnd = _explain(path, "--router", "random", "--sparsity", "0.25")
    assert static["kept"] == rnd["kept"] and static["keep"] != rnd["keep"]
    # static keeps the most recent tokens: within a routed block the kept set is the sink + a suffix
    row = static["keep"][2]
    first_kept = row.index(1, 1)
    assert all(row[first_kept:]) and not any(row[1:first_kept])


def test_terminal_view_and_out_file_feed_the_routing_map(tiny, tmp_path):
    _, path, _ = tiny
    out = tmp_path / "explain.json"
    res = CliRunner().invoke(main, ["explain", "--model", str(path), "--router", "static", "--sparsity", "0.3",
                                    "--prompt", "Hello there, little model.", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "static router" in res.output and "Hello there, little model." in res.output
    data = json.loads(out.read_text())
    map_lines = [ln for ln in res.output.splitlines() if ln[:5].strip().isdigit() and ln[5:7] == "  "]
    assert len(map_lines) == 8
    assert [ln[7:] for ln in map_lines] == ["".join("█" if v else "·" for v in row) for row in data["keep"]]
    from tokenskip.train.plots import report_figures

    report_figures(tmp_path / "figs", [], [], [out])
    assert json.loads((tmp_path / "figs" / "routing-map.json").read_text())["keep"] == data["keep"]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "   ", "--router", "static", "--sparsity", "0.3"], "--prompt is empty"),
    (["--prompt", "x" * 600, "--router", "static", "--sparsity", "0.3"], "the model takes at most 512"),
    (["--prompt", "hi", "--router", "learned"], "--router learned needs --routers DIR"),
    (["--prompt", "hi", "--router", "static", "--sparsity", "1.5"], "--sparsity 1.5: must be in [0, 1)"),
    (["--prompt", "hi", "--routers", "/nonexistent/routers"], "--routers /nonexistent/routers: no such folder"),
])
def test_cli_errors_are_one_line(tiny, args, message):
    _, path, _ = tiny
    res = CliRunner().invoke(main, ["explain", "--model", str(path), "--json", *args])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_out_must_be_a_file_and_rich_is_named_when_missing(tiny, tmp_path, monkeypatch):
    _, path, _ = tiny
    assert "explain" in CliRunner().invoke(main, ["--help"]).output
    res = CliRunner().invoke(main, ["explain", "--model", str(path), "--prompt", "hi", "--json", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "is a folder" in res.output
    monkeypatch.setitem(sys.modules, "rich.console", None)
    res = CliRunner().invoke(main, ["explain", "--model", str(path), "--prompt", "hi"])
    assert res.exit_code == 1
    assert res.output.strip() == ("Error: the terminal view of `tokenskip explain` (or use --json) needs the `plots` "
                                  "extra: pip install 'tokenskip[plots]'")


def test_pipeline_hook_runs_explain_and_draws_into_figures(tiny, tmp_path):
    """The pipeline's quality-stage hook: `tokenskip explain` on the routers folder into
    OUT/explain.json, then the frontier, schedule and routing map into OUT/figures."""
    import shutil
    from pathlib import Path

    import click

    from tokenskip.config import RoutingConfig, save_routing
    from tokenskip.pipeline import _figures, pipeline

    model, path, _ = tiny
    out = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "plots" / "run", out)
    (out / "explain.json").unlink()
    routers = tmp_path / "routers"
    n = model.config.num_hidden_layers
    save_routing(routers, RoutingConfig(model=str(path), num_layers=n, router="static",
                                        schedule=[0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0], hidden_size=64))
    with click.Context(pipeline) as ctx:
        _figures(ctx, out, "quality", model=str(path), routers_dir=str(routers))
    data = json.loads((out / "explain.json").read_text())
    assert data["router"] == "static" and len(data["keep"]) == n
    assert json.loads((out / "figures" / "routing-map.json").read_text())["keep"] == data["keep"]
    assert {p.name for p in (out / "figures").glob("*.png")} == {"frontier.png", "schedule.png", "routing-map.png"}
