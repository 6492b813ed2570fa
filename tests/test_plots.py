"""Figures of `tokenskip report --plots`: each drawn from a fixture JSON and checked through
matplotlib's objects (line data, bands, bars, image cells, labels, scales), not pixels."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tokenskip.cli import main
from tokenskip.errors import UserError
from tokenskip.schedule import Schedule
from tokenskip.train.plots.frontier import draw_frontier, frontier_data
from tokenskip.train.plots.inputs import load_quality, quality_reports
from tokenskip.train.plots.routing_map import draw_routing, routing_data, token_label
from tokenskip.train.plots.schedule_fig import draw_schedule, schedule_data
from tokenskip.train.plots.speed import draw_speed, speed_data

FIX = Path(__file__).parent / "fixtures" / "plots"
RUN = FIX / "run"


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _by_gid(artists, gid: str):
    found = [a for a in artists if a.get_gid() == gid]
    assert len(found) == 1, f"{gid}: {[a.get_gid() for a in artists]}"
    return found[0]


def _all_rows() -> list[dict]:
    sweep = _read(FIX / "quality-sweep.json")["sweep"]
    return [r for rep in [_read(RUN / "quality.json"), *sweep] for r in rep["rows"]]


# ------------------------------------------------------------------------------------ frontier
def test_frontier_points_ci_bands_and_scales():
    reports = load_quality(RUN / "quality.json") + load_quality(FIX / "quality-sweep.json")
    data = frontier_data(reports)
    fig = draw_frontier(data)
    ax_kl, ax_ppl = fig.axes
    rows = _all_rows()
    for fam in ("learned (searched)", "static (searched)", "static (uniform)", "random (uniform)", "shortgpt"):
        want = sorted((r for r in rows if r["method"].startswith(fam)), key=lambda r: r["flops"])
        assert len(want) == 3  # one point per sparsity (0.22, 0.3, 0.4)
        for ax, metric in ((ax_kl, "kl"), (ax_ppl, "ppl_ratio")):
            line = _by_gid(ax.lines, fam)
            assert list(line.get_xdata()) == [r["flops"] for r in want]
            assert list(line.get_ydata()) == [r[metric] for r in want]
            bars = _by_gid(ax.collections, f"{fam}:ci")
            assert [tuple(map(tuple, seg)) for seg in bars.get_segments()] == \
                [((r["flops"], r[f"{metric}_ci"][0]), (r["flops"], r[f"{metric}_ci"][1])) for r in want]
            band = _by_gid(ax.collections, f"{fam}:ci-band")
            ys = band.get_paths()[0].vertices[:, 1]
            assert ys.min() == pytest.approx(min(r[f"{metric}_ci"][0] for r in want))
            assert ys.max() == pytest.approx(max(r[f"{metric}_ci"][1] for r in want))
    # KL spans 0.04..2.3 and the ratio 1..8.7: both on log axes; the x axis reaches dense (1.0)
    assert ax_kl.get_yscale() == "log" and ax_ppl.get_yscale() == "log"
    lo, hi = ax_kl.get_xlim()
    assert lo <= 0.60 and hi >= 1.0
    legend = [t.get_text() for t in ax_ppl.get_legend().get_texts()]
    assert legend == ["learned (searched)", "static (searched)", "static (uniform)", "random (uniform)",
                      "shortgpt (layer removal)", "dense"]
    assert {t.get_text() for t in ax_kl.texts} == {"s=0.22", "s=0.3", "s=0.4"}
    title = fig.get_suptitle()
    assert "smollm2-135m" in title and "8 held-out windows of 512 tokens" in title and "95%" in title
    assert "perplexity" in ax_ppl.get_ylabel() and "KL" in ax_kl.get_ylabel()
    assert "FLOPs relative to dense" in ax_kl.get_xlabel()


def test_frontier_without_cis_draws_no_band_and_stays_linear():
    obj = _read(RUN / "quality.json")
    for r in obj["rows"]:
        r.pop("kl_ci", None)
        r.pop("ppl_ratio_ci", None)
    obj["rows"] = [r for r in obj["rows"] if r["method"] in ("dense", "learned (searched)", "static (uniform)")]
    fig = draw_frontier(frontier_data(quality_reports(obj, "old.json")))
    for ax in fig.axes:
        assert not [c for c in ax.collections if (c.get_gid() or "").endswith(("ci", "ci-band"))]
        assert ax.get_yscale() == "linear"  # KL 0.078..0.090, ratio 1..1.09
    assert "no CIs in the input" in fig.get_suptitle()


def test_frontier_refuses_unlike_inputs():
    base = _read(RUN / "quality.json")
    other = copy.deepcopy(base)
    other["model"] = "llama-7b"
    with pytest.raises(UserError, match="different models"):
        frontier_data(quality_reports([base, other], "x.json"))
    other = copy.deepcopy(base)
    other["settings"]["seq_len"] = 1024
    with pytest.raises(UserError, match="compare like with like"):
        frontier_data(quality_reports([base, other], "x.json"))
    other = copy.deepcopy(base)
    other["rows"][0]["ppl"] = 25.0
    with pytest.raises(UserError, match="different data"):
        frontier_data(quality_reports([base, other], "x.json"))


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["rows"][2].pop("kl"), r"q\.json: row 2 \(static \(searched\)\) has no numeric 'kl'"),
    (lambda o: o["rows"][1].update(kl_ci=[0.2, 0.1]), r"q\.json: row 1 .* 'kl_ci' .* expected \[lo, hi\]"),
    (lambda o: o.update(rows=[]), r"q\.json: not a quality report"),
    (lambda o: o.clear() or o.update(sweep=[]), r"q\.json: 'sweep' is empty"),
])
def test_quality_loader_errors_name_the_file(tmp_path, mutate, message):
    obj = _read(RUN / "quality.json")
    mutate(obj)
    f = tmp_path / "q.json"
    f.write_text(json.dumps(obj))
    with pytest.raises(UserError, match=message):
        load_quality(f)


# ------------------------------------------------------------------------------------ schedule
def test_schedule_bars_uniform_and_block_influence():
    data = schedule_data(RUN / "fit")
    fig = draw_schedule(data)
    ax, ax_bi = fig.axes
    static = _read(RUN / "fit" / "search-static" / "schedule.json")
    learned = _read(RUN / "fit" / "search-learned" / "schedule.json")
    uniform = list(Schedule.uniform(12, 0.3).sparsity)
    assert [c.get_label().split(" (")[0] for c in ax.containers] == \
        ["searched, static router", "searched, learned router", "uniform"]
    for cont, want in zip(ax.containers, (static["sparsity"], learned["sparsity"], uniform)):
        assert [p.get_height() for p in cont.patches] == pytest.approx(want)
    assert uniform[:2] == [0.0, 0.0] and uniform[2] == pytest.approx(0.45)
    assert list(_by_gid(ax_bi.lines, "block_influence").get_ydata()) == static["block_influence"]
    assert "smollm2-135m" in fig.get_suptitle() and "0.3" in fig.get_suptitle()
    assert "block influence" in ax_bi.get_ylabel()


def test_schedule_without_block_influence_omits_it(tmp_path):
    for router in ("static",):
        obj = _read(RUN / "fit" / f"search-{router}" / "schedule.json")
        obj.pop("block_influence")
        (tmp_path / f"search-{router}").mkdir()
        (tmp_path / f"search-{router}" / "schedule.json").write_text(json.dumps(obj))
    data = schedule_data(tmp_path)
    assert data["block_influence"] is None and list(data["searched"]) == ["static"]
    fig = draw_schedule(data)
    assert len(fig.axes) == 1 and len(fig.axes[0].containers) == 2
    assert any("no block_influence" in t.get_text() for t in fig.axes[0].texts)


def test_schedule_refuses_a_bad_block_influence(tmp_path):
    obj = _read(RUN / "fit" / "search-static" / "schedule.json")
    obj["block_influence"] = obj["block_influence"][:3]
    (tmp_path / "search-static").mkdir()
    (tmp_path / "search-static" / "schedule.json").write_text(json.dumps(obj))
    with pytest.raises(UserError, match="block_influence' must be a list of 12 numbers"):
        schedule_data(tmp_path)


# --------------------------------------------------------------------------------- routing map
def test_routing_map_cells_counts_and_token_labels():
    explain = _read(RUN / "explain.json")
    fig = draw_routing(routing_data(explain))
    ax_runs, ax = fig.axes[:2]
    assert ax.images[0].get_array().tolist() == explain["keep"]  # [blocks, tokens]
    assert [p.get_height() for p in ax_runs.containers[0].patches] == explain["blocks_run"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [token_label(t["text"]) for t in explain["tokens"]]
    assert token_label("\n") == "\\n" and token_label("  ") == "··"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 (dense)", "1 (s=0.50)", "2 (s=0.60)", "3 (dense)"]
    assert ax_runs.get_ylim() == (0, 4)
    assert "tiny-llama" in fig.get_suptitle() and "static router" in fig.get_suptitle()


def test_routing_map_refuses_inconsistent_json():
    bad = _read(RUN / "explain.json")
    bad["blocks_run"][1] += 1
    with pytest.raises(UserError, match="'blocks_run' does not equal"):
        routing_data(bad, "e.json")
    bad = _read(RUN / "explain.json")
    bad["keep"][0] = bad["keep"][0][:-1]
    with pytest.raises(UserError, match="one list of 10 0/1 values per block"):
        routing_data(bad, "e.json")


# --------------------------------------------------------------------------------------- speed
def test_speed_measured_and_shared_flop_ideal():
    data = speed_data([RUN / "bench.json", FIX / "bench-torch.json"])
    fig = draw_speed(data)
    ax = fig.axes[0]
    for f in (RUN / "bench.json", FIX / "bench-torch.json"):
        rows = _read(f)["rows"]
        line = _by_gid(ax.lines, f"{rows[0]['backend']}, B=1, s=0.3, learned:measured")
        assert list(line.get_xdata()) == [r["seq"] for r in rows]
        assert list(line.get_ydata()) == [r["speedup"] for r in rows]
    ideal = [ln for ln in ax.lines if (ln.get_gid() or "").startswith("ideal:")]
    assert len(ideal) == 1 and "(ort, torch)" in ideal[0].get_label()  # same schedule: one ideal curve
    assert list(ideal[0].get_ydata()) == [r["ideal"] for r in _read(RUN / "bench.json")["rows"]]
    assert ax.get_xscale() == "log"  # 512..2048
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 1.56
    assert "2-core CPU" in fig.get_suptitle() and "speed-up" in ax.get_ylabel()


def test_speed_refuses_a_non_bench_file(tmp_path):
    f = tmp_path / "b.json"
    f.write_text(json.dumps({"rows": [{"backend": "ort", "seq": 512, "speedup": 1.2}]}))
    with pytest.raises(UserError, match=r"bench file .*b\.json: row 0 lacks numeric 'batch', 'sparsity', 'ideal'"):
        speed_data([f])


# ------------------------------------------------------------------------------- report --plots
def test_report_plots_writes_every_figure_with_its_data(tmp_path):
    out = tmp_path / "figs"
    res = CliRunner().invoke(main, ["report", str(RUN), "--plots", str(out), "--plot-json",
                                    str(FIX / "quality-sweep.json"), "--plot-json", str(FIX / "bench-torch.json")])
    assert res.exit_code == 0, res.output
    for name in ("frontier", "schedule", "routing-map", "speed"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (out / f"{name}.svg").read_bytes()[:2000]
    # the JSON beside the frontier is exactly what was drawn, and holds every input row
    data = _read(out / "frontier.json")
    drawn = {(p["method"], p["flops"], p["kl"], p["ppl_ratio"]) for s in data["series"] for p in s["points"]}
    assert drawn == {(r["method"], r["flops"], r["kl"], r["ppl_ratio"]) for r in _all_rows() if r["method"] != "dense"}
    redrawn = draw_frontier(data)
    assert list(_by_gid(redrawn.axes[0].lines, "learned (searched)").get_ydata()) == [0.1605, 0.0904, 0.0452]
    assert _read(out / "routing-map.json")["keep"] == _read(RUN / "explain.json")["keep"]
    assert "| learned (searched) |" in res.output  # the table still prints


def test_report_plots_bad_inputs(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    res = CliRunner().invoke(main, ["report", str(RUN), "--plots", str(f)])
    assert res.exit_code == 1 and "--plots" in res.output and "not a folder" in res.output
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    res = CliRunner().invoke(main, ["report", str(RUN), "--plots", str(tmp_path / "o"), "--plot-json", str(other)])
    assert res.exit_code == 1 and "not an explain, bench or quality report JSON" in res.output
    assert not (tmp_path / "o" / "frontier.png").exists()  # inputs are checked before anything is drawn


def test_missing_plots_extra_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    res = CliRunner().invoke(main, ["report", str(RUN), "--plots", str(tmp_path / "figs")])
    assert res.exit_code == 1
    assert res.output.strip() == ("Error: drawing figures (matplotlib) needs the `plots` extra: "
                                  "pip install 'tokenskip[plots]'")
    assert not (tmp_path / "figs").exists()


def test_pipeline_figures_from_a_pipeline_folder(tmp_path):
    import shutil

    from tokenskip.train.plots import pipeline_figures

    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    written = {p.name for p in pipeline_figures(run, "quality")}
    assert written == {f"{n}.{e}" for n in ("frontier", "schedule", "routing-map") for e in ("json", "png", "svg")}
    assert {p.name for p in pipeline_figures(run, "speed")} == {"speed.json", "speed.png", "speed.svg"}
    assert all((run / "figures" / n).is_file() for n in written)
    # figures drawn into an input folder are not read back as inputs on the next run
    CliRunner().invoke(main, ["report", str(run), "--plots", str(run)])
    res = CliRunner().invoke(main, ["report", str(run), "--plots", str(run)])
    assert res.exit_code == 0, res.output
    assert not list(run.glob("routing-map-*"))


def test_plots_installed_follows_the_extra(monkeypatch):
    from tokenskip.train.plots import plots_installed

    assert plots_installed()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plots_installed()  # the pipeline then prints one line and draws nothing
