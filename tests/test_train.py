"""Training stage: GA search, router training (determinism, resume), fit, baselines, report, CLI errors.

Fast tests use a tiny random Llama with a byte-level tokenizer saved as a local folder; the few
`slow` ones load smollm2-135m.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import make_tiny_llama

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. ") * 40


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char = {b: chr(c) for b, c in zip(bs, cs)}
    tok = Tokenizer(models.BPE(vocab={char[i]: i for i in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=char[0], pad_token=char[0])


def _make_model(path: Path, layers: int = 4, seed: int = 0) -> Path:
    make_tiny_llama(path, seed=seed, layers=layers)
    _byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _make_model(tmp_path_factory.mktemp("tiny-tok"))


@pytest.fixture(scope="module")
def tiny6_dir(tmp_path_factory):
    return _make_model(tmp_path_factory.mktemp("tiny6-tok"), layers=6)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def _run(cmd, args):
    from tokenskip.cli import main

    return CliRunner().invoke(main, [cmd, *map(str, args)], catch_exceptions=False)


def _search_args(model, out, text, seed=0, sparsity=0.3):
    return ["--model", model, "--sparsity", sparsity, "--out", out, "--population", 4, "--generations", 2,
            "--windows", 2, "--seq-len", 32, "--cont-len", 8, "--seed", seed, "--calib-text", text, "--json"]


def _train_args(model, schedule, out, text, steps=6, extra=()):
    return ["--model", model, "--schedule", schedule, "--out", out, "--steps", steps, "--seq-len", 32, "--cont-len", 8,
            "--batch-size", 2, "--windows", 6, "--checkpoint-every", 2, "--calib-text", text, "--train-text", text,
            *extra]


# -- GA mechanics --------------------------------------------------------------------------------------------

def test_repair_keeps_mean_exact_and_bounds():
    from tokenskip.train.search import Genome, SearchSettings

    g = Genome(10, SearchSettings(target=0.37, dense_first=1, dense_last=2))
    rng = np.random.default_rng(0)
    for _ in range(200):
        u = g.repair(rng.normal(3700, 4000, size=10))
        assert u.sum() == g.total == 37000
        assert u.min() >= 0 and u.max() <= 9500
        assert u[0] == 0 and u[-1] == 0 and u[-2] == 0
    s = g.to_schedule(g.repair(np.zeros(10)))
    assert abs(sum(s.sparsity) / 10 - 0.37) < 1e-12


def test_repair_rejects_impossible_target():
    from tokenskip.errors import UserError
    from tokenskip.train.search import Genome, SearchSettings

    with pytest.raises(UserError, match="searchable blocks"):
        Genome(4, SearchSettings(target=0.6, dense_first=1, dense_last=1))  # 2 blocks x 0.95 < 2.4


def test_genetic_search_improves_and_is_deterministic():
    from tokenskip.train.search import SearchSettings, genetic_search

    want = np.array([0, 0.1, 0.5, 0.6, 0.4, 0.2, 0.3, 0])

    def fitness(s):
        return -float(((np.array(s.sparsity) - want) ** 2).sum())

    st = SearchSettings(target=float(want.mean()), population=10, generations=15, seed=3)
    a = genetic_search(8, fitness, st, progress=False)
    b = genetic_search(8, fitness, st, progress=False)
    assert a.schedule.sparsity == b.schedule.sparsity and a.history == b.history
    assert abs(sum(a.schedule.sparsity) / 8 - want.mean()) < 1e-9
    # it finds the optimum's shape, not just something better than its seed: a broken crossover,
    # mutation or selection leaves it near the uniform schedule (max error 0.3 there)
    assert np.abs(np.array(a.schedule.sparsity) - want).max() < 0.08, a.schedule.sparsity


# -- search / train CLI on the tiny model --------------------------------------------------------------------

def test_search_cli_deterministic(tiny_dir, text_file, tmp_path):
    r1 = _run("search", _search_args(tiny_dir, tmp_path / "a", text_file))
    assert r1.exit_code == 0, r1.output
    r2 = _run("search", _search_args(tiny_dir, tmp_path / "b", text_file))
    assert r2.exit_code == 0, r2.output
    a, b = (tmp_path / "a/schedule.json").read_bytes(), (tmp_path / "b/schedule.json").read_bytes()
    assert a == b
    obj = json.loads(a)
    assert len(obj["sparsity"]) == 4 and abs(obj["overall"] - 0.3) < 1e-9
    assert obj["kind"] == "searched" and obj["router"] == "static" and len(obj["history"]) == 3
    assert obj["history"][-1]["best"] >= obj["history"][0]["best"]
    from tokenskip.schedule import Schedule

    assert Schedule.load(tmp_path / "a/schedule.json", 4).overall() == pytest.approx(0.3)


@pytest.fixture(scope="module")
def schedule_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("sched") / "schedule.json"
    p.write_text(json.dumps({"sparsity": [0.0, 0.5, 0.5, 0.2]}))
    return p


def test_train_deterministic_and_loadable(tiny_dir, text_file, schedule_file, tmp_path):
    for d in ("a", "b"):
        r = _run("train", _train_args(tiny_dir, schedule_file, tmp_path / d, text_file))
        assert r.exit_code == 0, r.output
    for name in ("router.safetensors", "tokenskip.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    from tokenskip.config import load_routing

    cfg, router = load_routing(tmp_path / "a")
    assert cfg.router == "learned" and cfg.schedule == [0.0, 0.5, 0.5, 0.2] and cfg.hidden_size == 64
    assert not torch.equal(router.feature_std, torch.ones(4))  # standardisation was set
    ckpt = json.loads((tmp_path / "a/checkpoint/checkpoint.json").read_text())
    assert ckpt["step"] == 6 and len(list((tmp_path / "a/checkpoint").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "a").rglob("*.pt")) and not list((tmp_path / "a").rglob("*.bin"))
    r = _run("eval", ["--model", tiny_dir, "--routers", tmp_path / "a", "--text", text_file, "--seq-len", 32,
                      "--cont-len", 8, "--windows", 2, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["results"][1]["method"] == "learned (skip)"


def test_train_resume_after_interruption_matches(tiny_dir, text_file, schedule_file, tmp_path):
    from tokenskip.models import load_model
    from tokenskip.schedule import Schedule
    from tokenskip.train.common import windows
    from tokenskip.train.trainer import TrainSettings, train_router

    lm = load_model(str(tiny_dir))
    ids = windows(lm.tokenizer, "train", str(text_file), 32, 6)
    sched = Schedule.load(schedule_file, 4)
    st = TrainSettings(steps=7, seq_len=32, cont_len=8, batch_size=2, windows=6, checkpoint_every=2,
                       validate_every=3, ste_temperature=1.0, lr=0.05)
    train_router(lm.model, sched, ids, ids[:2], st, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_router(lm.model, sched, ids, ids[:2], st, tmp_path / "cut", progress=False, stop_after=5)
    assert json.loads((tmp_path / "cut/checkpoint/checkpoint.json").read_text())["step"] == 4
    assert not (tmp_path / "cut/router.safetensors").exists()
    train_router(lm.model, sched, ids, ids[:2], st, tmp_path / "cut", progress=False)  # resumes at step 4
    for name in ("router.safetensors", "tokenskip.json", "train_history.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()


def test_validation_ships_the_best_router(tiny_dir, text_file, schedule_file, tmp_path):
    """With --validate-every, the router written is the one with the lowest calibration KL
    (deployment function), which the history records; step 0 (the starting router) competes."""
    from tokenskip.config import build_routed
    from tokenskip.evaluate import dense_reference, evaluate
    from tokenskip.models import load_model
    from tokenskip.schedule import Schedule
    from tokenskip.train.common import windows
    from tokenskip.train.trainer import TrainSettings, train_router

    lm = load_model(str(tiny_dir))
    ids = windows(lm.tokenizer, "train", str(text_file), 32, 6)
    sched = Schedule.load(schedule_file, 4)
    st = TrainSettings(steps=8, seq_len=32, cont_len=8, batch_size=2, windows=6, validate_every=2, lr=0.2)
    train_router(lm.model, sched, ids, ids[:3], st, tmp_path / "r", progress=False)
    hist = json.loads((tmp_path / "r/train_history.json").read_text())["history"]
    vals = {h["step"]: h["val_kl"] for h in hist if "val_kl" in h}
    assert sorted(vals) == [0, 2, 4, 6, 8]  # step 0: the starting (static-initialised) router
    extra = json.loads((tmp_path / "r/tokenskip.json").read_text())["extra"]["training"]
    best = extra["best_val_kl"]
    assert best == pytest.approx(min(vals.values()), abs=1e-6) and extra["best_step"] in vals
    routed, _ = build_routed(lm.model, routers_dir=tmp_path / "r")
    ref = dense_reference(routed, ids[:3], 8, progress=False)
    assert evaluate(routed, ids[:3], 8, ref, progress=False).kl == pytest.approx(best, abs=1e-6)


RUNNER = """
from tokenskip.cli import main
main()
"""


def test_train_killed_process_resumes_to_same_bytes(tiny_dir, text_file, schedule_file, tmp_path):
    """A real SIGKILL mid-run, then the same command again."""
    args = _train_args(tiny_dir, schedule_file, "OUT", text_file, steps=30)
    runner = tmp_path / "run.py"
    runner.write_text(RUNNER)
    cmd = [sys.executable, str(runner), "train", *map(str, args)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    full = _run("train", [str(a).replace("OUT", str(tmp_path / "full")) for a in args])  # uninterrupted, in-process
    assert full.exit_code == 0, full.output
    cut_cmd = [c.replace("OUT", str(tmp_path / "cut")) for c in cmd]
    proc = subprocess.Popen(cut_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = tmp_path / "cut/checkpoint/checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if meta.is_file() and json.loads(meta.read_text())["step"] >= 6:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut/router.safetensors").exists()
    assert 6 <= json.loads(meta.read_text())["step"] < 30
    again = subprocess.run(cut_cmd, env=env, capture_output=True)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    for name in ("router.safetensors", "tokenskip.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()


def test_guide_target_is_the_static_routers_mask(tiny_llama):
    from tokenskip.routed import RoutedModel, forced_tokens
    from tokenskip.routers import StaticRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train.trainer import static_keep_mask

    model, _ = tiny_llama
    sched = Schedule((0.0, 0.5, 0.3, 0.0))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    out = RoutedModel(model, sched, StaticRouter())(ids, n_tail=4, mode="mask", trace=True)
    valid = torch.ones_like(ids, dtype=torch.bool)
    pos = torch.arange(24).expand(2, 24)
    for li in (1, 2):
        want = static_keep_mask(sched, li, valid, pos, forced_tokens(valid, 4), 4)
        assert torch.equal(want.bool(), out.traces[li].keep_mask)


def test_router_losses_have_gradients(tiny_llama):
    from tokenskip.evaluate import continuation_logprobs
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import LearnedRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train.trainer import router_losses

    model, _ = tiny_llama
    torch.manual_seed(0)
    router = LearnedRouter()
    sched = Schedule((0.0, 0.5, 0.5, 0.0))
    routed = RoutedModel(model, sched, router)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    dense = continuation_logprobs(RoutedModel(model, sched, None), ids, 8)
    guide, sparse, distill, achieved = router_losses(routed, ids, dense, 8)
    (guide + sparse + distill).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in router.parameters())
    assert router.mlp[0].weight.grad.abs().sum() > 0
    assert achieved == pytest.approx(0.5 * 2 / 4, abs=0.05)  # two blocks at 0.5 out of four
    assert float(distill.detach()) > 0


def test_ste_carries_gradient_through_distillation_alone(tiny_llama):
    """Guide weight 0 and no sparsity term: the router still learns, through the straight-through
    gate, from the KL to dense alone; without the STE the hard top-k would give it no gradient."""
    from tokenskip.evaluate import continuation_logprobs
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import LearnedRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train.trainer import router_losses

    model, _ = tiny_llama
    torch.manual_seed(0)
    router = LearnedRouter()
    sched = Schedule((0.0, 0.5, 0.5, 0.0))
    routed = RoutedModel(model, sched, router)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    dense = continuation_logprobs(RoutedModel(model, sched, None), ids, 8)
    _, _, distill, _ = router_losses(routed, ids, dense, 8)
    distill.backward()
    grads = [p.grad for p in router.mlp.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # and the gradient comes from the STE: the same loss with hard gates only reaches no parameter
    router.zero_grad(set_to_none=True)
    out = routed(ids, n_tail=8, mode="mask", trace=True, ste=False, num_logits=9)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    hard = (dense.exp() * (dense - logp)).sum(-1).mean()
    assert not hard.requires_grad or all(p.grad is None for p in router.mlp.parameters())


# -- fit, baselines, report -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_fit(tiny_dir, text_file, tmp_path_factory):
    """A tiny-budget fit folder of the tiny model (overall sparsity 0.25) and run_fit's return value."""
    from tokenskip.train.fit import FitSettings, run_fit

    fit = tmp_path_factory.mktemp("tiny-fit") / "fit"
    settings = FitSettings(budget="tiny", calib_text=str(text_file), train_text=str(text_file))
    return fit, run_fit(str(tiny_dir), 0.25, fit, settings, progress=False, log=lambda m: None)


def test_fit_tiny_budget(tiny_fit):
    fit, out = tiny_fit
    assert out == fit / "routers"
    for p in ("search-static/schedule.json", "router-1/router.safetensors", "search-learned/schedule.json",
              "routers/tokenskip.json", "routers/router.safetensors", "fit.json",
              "select/tokenskip.json", "select/router.safetensors", "select/select.json"):
        assert (fit / p).is_file(), p
    re = json.loads((fit / "search-learned/schedule.json").read_text())
    assert re["router"] == "learned" and abs(re["overall"] - 0.25) < 1e-9
    assert json.loads((fit / "fit.json").read_text())["select"] == str(fit / "select")
    sel = json.loads((fit / "select/tokenskip.json").read_text())
    assert sel["router"] == "select" and abs(sum(sel["schedule"]) / len(sel["schedule"]) - 0.25) < 1e-6


def test_fit_select_skipped_where_its_schedule_cannot_hold_the_sparsity():
    """The select router's routed blocks carry the whole budget: at 0.8 of 30 blocks they would need
    1.2+ each from either candidate layer, so fit says so before any work and goes on without it (not a
    failure after the search). At 0.5 the middle layer cannot hold it and the earlier one can."""
    from tokenskip.train.fit import _select_fits
    from tokenskip.train.select import candidate_layers

    said = []
    assert _select_fits(30, 0.3, said.append) and not said
    assert candidate_layers(30, 0.3) == [15, 8] and candidate_layers(30, 0.5) == [8]
    assert candidate_layers(30, 0.5, select_layer=6) == [6]
    assert not _select_fits(30, 0.8, said.append)
    assert len(said) == 1 and "no select router" in said[0] and "--sparsity 0.8" in said[0]


LONG = ["--longctx", "needle,article_qa", "--longctx-lengths", 256, "--longctx-examples", 2]


def _check_longctx(long: dict, kl_rows: list[dict]) -> None:
    """The long-prompt section of a quality table: every KL-table method plus the training-free
    kinds, one row per (task, length) and per task over all lengths, numbers consistent with the
    per-example outcomes (a tiny random model scores ~0: the structure is what is checked)."""
    from tokenskip.train.report import training_free_kinds

    shape = {"gemfilter": "select_after"}  # the kinds with their own schedule shape (Router.schedule_for)
    methods = [r["method"] for r in kl_rows] + [f"{k} ({shape.get(k, 'uniform')})" for k in training_free_kinds()]
    assert sorted(long["methods"]) == sorted(methods) and sorted(long["correct"]) == sorted(methods)
    assert long["tasks"] == ["needle", "article_qa"] and long["lengths"] == [256]
    assert len(long["examples"]) == 4 and all(e["prompt_len"] <= 256 for e in long["examples"])
    keys = {(r["method"], r["task"], r["length"]) for r in long["rows"]}
    assert keys == {(m, t, n) for m in methods for t in ("needle", "article_qa") for n in (256, "all")}
    for r in long["rows"]:
        got = [c for c, e in zip(long["correct"][r["method"]], long["examples"]) if e["task"] == r["task"]]
        dense = [c for c, e in zip(long["correct"]["dense"], long["examples"]) if e["task"] == r["task"]]
        assert r["n"] == 2 and r["accuracy"] == sum(got) / 2 and r["dense_accuracy"] == sum(dense) / 2
        assert r["ratio_to_dense"] == (sum(got) / sum(dense) if sum(dense) else None)
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
        assert sum(b["n"] for b in r["by_depth"]) == 2
    dense_rows = [r for r in long["rows"] if r["method"] == "dense"]
    assert all(r["accuracy"] == r["dense_accuracy"] for r in dense_rows)
    flops = {r["method"]: r["flops"] for r in kl_rows}
    assert long["methods"]["dense"]["flops"] == 1.0
    sg = next(m for m in methods if m.startswith("shortgpt"))
    assert abs(long["methods"][sg]["flops"] - flops[sg]) < 0.05 and long["methods"][sg]["flops"] < 1.0
    assert all(0.3 < c["flops"] < 1.0 for m, c in long["methods"].items() if m != "dense")


def test_report_fit_folder_prints_long_prompts_after_kl(tiny_dir, text_file, tiny_fit, tmp_path):
    fit, _ = tiny_fit
    args = [fit, "--model", tiny_dir, "--text", text_file, "--calib-text", text_file, "--seq-len", 32,
            "--cont-len", 8, "--windows", 2, "--out", tmp_path / "rep.json", *LONG]
    r = _run("report", args)
    assert r.exit_code == 0, r.output
    kl, long = r.output.index("| method | sparsity |"), r.output.index("Long prompts: 2 examples per task and length")
    assert kl < long < r.output.index("Accuracy by evidence depth")
    saved = json.loads((fit / "quality-L32-c8.json").read_text())
    _check_longctx(saved["longctx"], saved["rows"])
    assert saved["settings"]["longctx"] == ["needle", "article_qa"] and saved["settings"]["longctx_examples"] == 2
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert len(rep["longctx"]) == len(saved["longctx"]["rows"]) and rep["longctx"][0]["source"] == str(fit)
    r = _run("report", [*args[:-len(LONG)], "--no-longctx"])
    assert r.exit_code == 0 and "Long prompts" not in r.output
    assert json.loads((fit / "quality-L32-c8.json").read_text())["longctx"] is None
    # the model's context (512 positions) is checked before any scoring, naming the flag
    _one_line_error(_run("report", [*args[:-len(LONG)], "--longctx-lengths", "256,1024"]),
                    "--longctx-lengths 1024", "512")


def test_pipeline_quality_stage_long_prompts_resume(tiny_dir, tiny_fit, tmp_path, monkeypatch):
    """The pipeline's quality stage writes quality.json and longctx.json; a rerun reuses both, a
    changed long-prompt flag recomputes only longctx.json."""
    import shutil

    import tokenskip.pipeline as P

    monkeypatch.setattr(P, "_figures", lambda *a, **k: None)  # the figures hook has its own test (test_explain)
    out = tmp_path / "run"
    shutil.copytree(tiny_fit[0], out / "fit")
    args = ["--model", tiny_dir, "--out", out, "--stages", "quality", "--sparsity", 0.25, "--windows", 2,
            "--free-run", 0, *LONG]
    r = _run("pipeline", args)
    assert r.exit_code == 0, r.output
    assert "Long prompts: 2 examples" in r.output and "(long prompts:" in r.output
    quality, long = json.loads((out / "quality.json").read_text()), json.loads((out / "longctx.json").read_text())
    _check_longctx(long, quality["rows"])
    stamp = {f: (out / f).stat().st_mtime_ns for f in ("quality.json", "longctx.json")}
    r = _run("pipeline", args)
    assert r.exit_code == 0, r.output
    assert "(reusing" in r.output and r.output.count("(reusing") == 2 and "Long prompts: 2 examples" in r.output
    assert {f: (out / f).stat().st_mtime_ns for f in stamp} == stamp
    r = _run("pipeline", [*args[:-1], 3])  # --longctx-examples 3
    assert r.exit_code == 0, r.output
    assert r.output.count("(reusing") == 1 and "Long prompts: 3 examples" in r.output
    assert (out / "quality.json").stat().st_mtime_ns == stamp["quality.json"]
    assert len(json.loads((out / "longctx.json").read_text())["examples"]) == 6


def test_shortgpt_removal_matches_flops(tiny_llama):
    from tokenskip.flops import flops_ratio
    from tokenskip.train.baselines import block_influence, removal_for_flops, target_flops

    model, _ = tiny_llama
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    bi = block_influence(model, ids)
    assert len(bi) == 4 and all(0 <= b <= 2 for b in bi)
    target = 0.5
    removed = removal_for_flops(model.config, bi, target, 32)
    assert len(removed) == 2  # half the (identical) blocks
    assert set(removed) == set(sorted(range(4), key=lambda i: bi[i])[:2])
    t = target_flops(model.config, 0.3, 32, 8)
    r = removal_for_flops(model.config, bi, t, 32)
    best = min(range(4), key=lambda m: abs(1 - m / 4 - t))
    assert len(r) == best and abs(flops_ratio(model.config, None, 32, removed=r) - t) <= 0.125 + 1e-9


def test_eval_shortgpt_out_and_report(tiny_dir, text_file, tmp_path):
    common = ["--model", tiny_dir, "--text", text_file, "--seq-len", 32, "--cont-len", 8, "--windows", 2]
    r = _run("eval", [*common, "--router", "shortgpt", "--sparsity", 0.3, "--out", tmp_path / "sg.json"])
    assert r.exit_code == 0, r.output
    assert "shortgpt (-1 blocks)" in r.output
    r = _run("eval", [*common, "--router", "static", "--sparsity", 0.3, "--out", tmp_path / "st.json"])
    assert r.exit_code == 0, r.output
    r = _run("report", [tmp_path / "sg.json", tmp_path / "st.json"])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("| ")]
    assert [x.split("|")[1].strip() for x in lines] == ["method", "dense", "shortgpt (-1 blocks)", "static (skip)"]
    r = _run("eval", [*common, "--router", "shortgpt"])
    assert r.exit_code == 1 and "--router shortgpt needs --sparsity" in r.output


def test_report_rejects_mismatched_data(tmp_path):
    def res(ppl):
        return {"results": [{"method": "dense", "ppl": ppl, "ppl_ratio": 1.0, "kl": 0.0, "top1": 1.0, "flops": 1.0,
                             "sparsity": 0.0}]}

    (tmp_path / "a.json").write_text(json.dumps(res(10.0)))
    (tmp_path / "b.json").write_text(json.dumps(res(12.0)))
    (tmp_path / "bad.json").write_text("{\"x\": 1}")
    r = _run("report", [tmp_path / "a.json", tmp_path / "b.json"])
    assert r.exit_code == 1 and "different data" in r.output
    r = _run("report", [tmp_path / "bad.json"])
    assert r.exit_code == 1 and "not a result file" in r.output


# -- multiple-choice tasks (offline: a task.json in a temporary cache) ----------------------------------------

def test_mc_scoring_on_cached_task(tiny_llama, tmp_path, monkeypatch):
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import StaticRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train import tasks as T

    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path))
    task = {"examples": [{"input": f"What is {i}+1?", "target_scores": {str(i + 1): 1, str(i + 7): 0, "x": 0}}
                         for i in range(6)]}
    (tmp_path / "bigbench/toy").mkdir(parents=True)
    (tmp_path / "bigbench/toy/task.json").write_text(json.dumps(task))
    loaded = T.load_tasks(["toy"], 4)
    assert len(loaded["toy"]) == 4 and loaded["toy"][0].prompt.startswith("Q: What is")
    model, _ = tiny_llama
    tok = _byte_tokenizer()
    dense = RoutedModel(model, Schedule.dense(4), None)
    zero = RoutedModel(model, Schedule.dense(4), StaticRouter())
    a = T.run_tasks(dense, tok, loaded, progress=False)[0]
    b = T.run_tasks(zero, tok, loaded, progress=False)[0]
    assert a.accuracy == b.accuracy and a.chance == pytest.approx(1 / 3)
    assert len(a.correct) == 4 and a.accuracy_ci[0] <= a.accuracy <= a.accuracy_ci[1]
    ex = loaded["toy"][0]
    s1 = T.choice_logprobs(dense, tok, ex)
    routed = RoutedModel(model, Schedule((0.0, 0.6, 0.6, 0.0)), StaticRouter())
    s2 = T.choice_logprobs(routed, tok, ex)
    assert len(s1) == 3 and all(v < 0 for v in s1 + s2) and s1 != s2


def test_mc_choices_never_change_the_prompts_routing(tiny_llama):
    """The shared prompt is routed once by prefill and each choice is decoded through its cache, so a
    choice scores exactly prefill + token-by-token decode (a learned router whose routing of the
    prompt read the choice would move the scores)."""
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import LearnedRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train import tasks as T

    model, _ = tiny_llama
    tok = _byte_tokenizer()
    torch.manual_seed(5)
    router = LearnedRouter()
    with torch.no_grad():
        for p in router.parameters():
            p.normal_()
    routed = RoutedModel(model, Schedule((0.0, 0.6, 0.6, 0.0)), router, score_window=4)
    ex = T.MCExample(prompt="Q: which letter comes after b?\nA:", choices=["c", "x", "q"], correct=[True, False, False])
    scores = T.choice_logprobs(routed, tok, ex)
    p_ids = tok(ex.prompt, add_special_tokens=True)["input_ids"]
    for c, s in zip(ex.choices, scores):
        c_ids = tok(" " + c, add_special_tokens=False)["input_ids"]
        want = 0.0
        with torch.no_grad():
            logits, cache = routed.prefill(torch.tensor([p_ids]))
            for i, t in enumerate(c_ids):
                want += float(torch.log_softmax(logits[0].float(), -1)[t])
                logits, cache = routed.decode_step(torch.tensor([[t]]), torch.tensor([[len(p_ids) + i]]), cache)
        assert s == pytest.approx(want, abs=1e-4)


def test_tasks_option_errors(tmp_path, monkeypatch):
    from tokenskip.errors import UserError
    from tokenskip.train import tasks as T

    assert T.parse_tasks("default") == list(T.DEFAULT_TASKS)
    with pytest.raises(UserError, match="not a task name"):
        T.parse_tasks("../etc")
    monkeypatch.setenv("TOKENSKIP_CACHE", str(tmp_path))
    (tmp_path / "bigbench/gen").mkdir(parents=True)
    (tmp_path / "bigbench/gen/task.json").write_text(json.dumps({"examples": [{"input": "a", "target": "b"}]}))
    with pytest.raises(UserError, match="not a multiple-choice"):
        T.load_tasks(["gen"], 5)


# -- bad input through the CLI -----------------------------------------------------------------------------------

def _one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.output
    for n in needles:
        assert n in lines[0], r.output


def test_cli_errors(tiny_dir, tiny6_dir, text_file, schedule_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sparsity": [0.1, 0.2, 0.3]}))
    _one_line_error(_run("train", _train_args(tiny_dir, bad, tmp_path / "t", text_file)), "3 blocks", "4")
    _one_line_error(_run("search", _search_args(tiny_dir, tmp_path / "s", text_file, sparsity=1.2)), "--sparsity")
    _one_line_error(_run("search", _search_args(tiny_dir, tmp_path / "s", text_file, sparsity=-0.1)), "--sparsity")
    _one_line_error(_run("search", [*_search_args(tiny_dir, tmp_path / "s", text_file), "--router", "learned"]),
                    "--routers")
    # a trained router folder, then corrupt it / use it with another model
    r = _run("train", _train_args(tiny_dir, schedule_file, tmp_path / "r", text_file, steps=2))
    assert r.exit_code == 0, r.output
    ev = ["--text", text_file, "--seq-len", 32, "--cont-len", 8, "--windows", 1]
    _one_line_error(_run("eval", ["--model", tiny6_dir, "--routers", tmp_path / "r", *ev]), "4 layers", "6 layers")
    _one_line_error(_run("search", [*_search_args(tiny6_dir, tmp_path / "s", text_file), "--router", "learned",
                                    "--routers", tmp_path / "r"]), "4 layers")
    # changed settings against an existing checkpoint
    _one_line_error(_run("train", _train_args(tiny_dir, schedule_file, tmp_path / "r", text_file, steps=3)),
                    "--no-resume")
    r = _run("train", _train_args(tiny_dir, schedule_file, tmp_path / "r", text_file, steps=3, extra=["--no-resume"]))
    assert r.exit_code == 0, r.output
    (tmp_path / "r/router.safetensors").write_bytes(b"not safetensors at all")
    _one_line_error(_run("eval", ["--model", tiny_dir, "--routers", tmp_path / "r", *ev]), "router.safetensors")
    (tmp_path / "r/tokenskip.json").write_text("{broken")
    _one_line_error(_run("eval", ["--model", tiny_dir, "--routers", tmp_path / "r", *ev]), "tokenskip.json")
    _one_line_error(_run("train", _train_args(tiny_dir, tmp_path / "missing.json", tmp_path / "t", text_file)),
                    "missing.json")


# -- slow: the real model --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_search_finds_a_schedule_that_transfers(smollm2):
    """What the GA is for, asserted where elitism cannot hold it up: (1) on its calibration windows
    it finds a schedule strictly better than the uniform one it was seeded with (a GA that only
    returns its best seed fails); (2) on windows it never saw (the train split, other articles) that
    schedule beats the median of random schedules of the same overall sparsity (a GA that returns
    an arbitrary member fails). It is not asserted that the searched schedule beats uniform on
    held-out windows: at this budget (4 windows of 256 tokens) it does not reliably (measured:
    -0.132 vs -0.072 on 4 train-split windows, -0.111 vs -0.122 on 4 eval windows), which is why the
    fit budgets search on 8 windows of 512 tokens; docs/training.md has the held-out tables."""
    import numpy as np

    from tokenskip.routers import StaticRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train.common import windows
    from tokenskip.train.search import Genome, SearchSettings, kl_fitness, search_schedule

    calib = windows(smollm2.tokenizer, "calib", None, 256, 4)
    held_out = windows(smollm2.tokenizer, "train", None, 256, 4, seed=1)
    st = SearchSettings(target=0.3, population=6, generations=2, seed=0)
    res = search_schedule(smollm2.model, StaticRouter(), calib, 32, st, progress=False)
    assert res.schedule.num_layers == 30 and abs(res.schedule.overall() - 0.3) < 1e-9
    uniform = Schedule.uniform(30, 0.3)
    on_calib = kl_fitness(smollm2.model, StaticRouter(), calib, 32, "skip")
    assert res.fitness > on_calib(uniform) + 1e-4, (res.fitness, on_calib(uniform))  # fitness = -KL
    genome, rng = Genome(30, st), np.random.default_rng(0)
    on_held = kl_fitness(smollm2.model, StaticRouter(), held_out, 32, "skip")
    rand = [on_held(genome.to_schedule(genome.repair(rng.uniform(0, genome.max_units, 30)))) for _ in range(3)]
    assert on_held(res.schedule) > float(np.median(rand)), (on_held(res.schedule), rand)


@pytest.mark.slow
def test_smollm2_shortgpt_removes_low_influence_blocks(smollm2):
    from tokenskip.train.baselines import shortgpt_model
    from tokenskip.train.common import windows

    calib = windows(smollm2.tokenizer, "calib", None, 128, 2)
    _, info = shortgpt_model(smollm2.model, calib, 0.3, 128, 16)
    assert 0 not in info["removed"] and abs(info["flops"] - info["target_flops"]) < 0.03


def test_static_init_routes_exactly_like_static(tiny_llama):
    """A learned router initialised as static keeps exactly the static router's tokens (so training
    with validation from step 0 can only ship something that calibrates at least as well)."""
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import LearnedRouter, StaticRouter
    from tokenskip.schedule import Schedule

    model, _ = tiny_llama
    router = LearnedRouter()
    router.feature_mean.copy_(torch.tensor([0.5, 0.05, 0.5, 0.3]))
    router.feature_std.copy_(torch.tensor([0.29, 0.04, 0.29, 0.1]))
    router.init_as_static()
    sched = Schedule((0.0, 0.5, 0.3, 0.0))
    ids = torch.randint(0, 256, (3, 37), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        a = RoutedModel(model, sched, router)(ids, mask, trace=True)
        b = RoutedModel(model, sched, StaticRouter())(ids, mask, trace=True)
    assert any(t.index is not None for t in a.traces)
    for ta, tb in zip(a.traces, b.traces):
        if ta.index is not None:
            assert torch.equal(ta.index, tb.index)
    torch.testing.assert_close(a.logits, b.logits)


def test_sink_candidates_start_from_the_best_on_calibration(tiny_dir, text_file, schedule_file, tmp_path):
    """Extra-sink starts are scored on the calibration windows; the lowest KL starts training and
    is recorded with every candidate's KL; the sink start keeps the first positions."""
    from tokenskip.models import load_model
    from tokenskip.routers import LearnedRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train.common import windows
    from tokenskip.train.trainer import TrainSettings, train_router

    lm = load_model(str(tiny_dir))
    ids = windows(lm.tokenizer, "train", str(text_file), 32, 6)
    sched = Schedule.load(schedule_file, 4)
    st = TrainSettings(steps=2, seq_len=32, cont_len=8, batch_size=2, windows=6, validate_every=1,
                       sink_candidates=(0.0, 0.1, 0.3))
    train_router(lm.model, sched, ids, ids[:3], st, tmp_path / "r", progress=False)
    start = json.loads((tmp_path / "r/tokenskip.json").read_text())["extra"]["training"]["start"]
    kls = {float(f): v for f, v in start["val_kl"].items()}
    assert set(kls) == {0.0, 0.1, 0.3} and start["chosen"] == min(kls, key=kls.get)
    r = LearnedRouter()
    r.feature_mean[0], r.feature_std[0] = 0.5, 0.29
    r.init_as_static(sinks=0.1)
    pos = torch.linspace(0, 1, 21)  # normalised positions 0, 0.05, ..., 1
    feats = torch.stack([pos, torch.zeros(21), torch.zeros(21), torch.full((21,), 0.3)], -1)[None]
    s = r(feats)[0]
    assert torch.argsort(s, descending=True)[:2].tolist() == [0, 1]  # the sinks (p < 0.1) first, earliest first
    assert torch.all(s[3:].diff() > 0)  # then recency
