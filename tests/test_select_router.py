"""The learned one-selection router (routers.SelectRouter, train/select.py, issue 20).

Checked: its start ranks like gemfilter's pool (recent share first, then the attended tokens and
their neighbours); learned offset weights move the kept set towards the tokens that FOLLOW an
attended phrase; training on synthetic tables where the evidence follows the attended quote learns
exactly that and keeps more evidence than its start; the table `until_routed` returns is the one
the first routed block reads; one pass = prefill + decode (causality); a routers folder round-trips
and exports to ONNX with PyTorch's logits; `train-select` end to end on the tiny model.
"""

from __future__ import annotations

import types
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from conftest import export_tiny, make_char_tokenizer
from tokenskip.routed import RoutedModel
from tokenskip.routers import RouteContext, SelectRouter, make_router
from tokenskip.schedule import Schedule
from tokenskip.train import select as S

pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(attn: list[float], sparsity: float) -> RouteContext:
    n = len(attn)
    return RouteContext(layer=1, sparsity=sparsity, positions=torch.arange(n).unsqueeze(0),
                        valid=torch.ones(1, n, dtype=torch.bool), attn=torch.tensor([attn]))


def _order(router, attn, sparsity):
    with torch.no_grad():
        return router.scores(_ctx(attn, sparsity)).argsort(descending=True, stable=True)[0].tolist()


def test_start_ranks_recent_share_then_the_pooled_attention():
    # 30 tokens, sparsity 0.6: recent share 0.5 of the 0.4 budget -> positions > 0.8 * 29 (24..29)
    attn = [0.0] * 30
    attn[10] = 0.5
    r = SelectRouter()
    assert r.score_refresh is False and r.needs_attention and r.score_heads == "max" and r.score_window == 16
    order = _order(r, attn, 0.6)
    assert order[:6] == [29, 28, 27, 26, 25, 24]  # the recent share, newest first
    assert set(order[6:13]) == set(range(7, 14))  # token 10 and its pool of 7 (b = 0 on [-3, 3])
    assert r.schedule_for(30, 0.3).meta["kind"] == "select_after"  # gemfilter's schedule shape


def test_learned_offsets_reach_the_words_after_an_attended_phrase():
    attn = [0.0] * 30
    attn[8] = 0.5
    r = SelectRouter()
    with torch.no_grad():  # inherit from up to 6 tokens back only: tokens 8..14 follow the attended one
        r.offset_bias.fill_(-20.0)
        r.offset_bias[r.BACK - 6:r.BACK + 1] = 0.0
    order = _order(r, attn, 0.6)
    assert set(order[6:13]) == set(range(8, 15))
    assert 7 not in order[6:13]


def _synthetic_items(n: int, seed: int) -> list:
    """Tables where the question attends to a quote and the evidence is the 9 tokens after its pool
    (beyond the start's reach of 3: the start ranks them by noise)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        seq = 120
        table = torch.rand(seq, generator=gen) * 0.01
        q = int(torch.randint(5, 80, (1,), generator=gen))
        table[q - 3:q + 1] += 0.05  # the quoted phrase
        positions = torch.arange(seq)
        recent = positions.float() / (seq - 1) > 1.0 - 0.5 * 0.4
        cand = ~recent & (positions > 0)
        ev = torch.zeros(seq, dtype=torch.bool)
        ev[q + 4:q + 13] = True
        items.append(S.Item(table, positions, cand, ev & cand, keep=48))
    return items


def test_training_learns_the_reach_and_keeps_more_of_the_label():
    torch.manual_seed(0)
    train, val = _synthetic_items(24, 0), _synthetic_items(12, 1)
    r = SelectRouter()
    before = S.answer_kept(r, val, 0.6)
    with torch.no_grad():
        loss0 = float(S.cut_loss(r, train))
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    for _ in range(60):
        loss = S.cut_loss(r, train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = S.answer_kept(r, val, 0.6)
    with torch.no_grad():
        assert float(S.cut_loss(r, train)) < loss0
    assert after > before + 0.2 and after > 0.9
    b = r.offset_bias.detach()
    assert b[r.BACK - 12:r.BACK - 3].mean() > b[r.BACK + 1:].mean() + 1.0  # reaches back, not ahead


def test_until_routed_returns_the_table_the_first_routed_block_reads(tiny_llama):
    model, _ = tiny_llama
    seen = {}

    class Rec(SelectRouter):
        def scores(self, ctx):
            seen.setdefault("attn", ctx.attn.clone())
            return super().scores(ctx)

    routed = RoutedModel(model, Schedule((0.0, 0.0, 0.5, 0.5)), Rec())
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = routed(ids, until_routed=True)
        routed(ids)
    assert out.logits is None
    torch.testing.assert_close(out.table, seen["attn"])
    assert (out.table > 0).any()


def _trained_like(seed: int = 0) -> SelectRouter:
    r = SelectRouter()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.offset_bias.copy_(torch.randn(r.offset_bias.shape, generator=gen) * 2)
        r.recency.fill_(0.7)
    return r


def test_one_pass_equals_prefill_then_decode(tiny_llama):
    model, _ = tiny_llama
    routed = RoutedModel(model, Schedule((0.0, 0.0, 0.5, 0.5)), _trained_like())
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one = routed(ids, n_tail=6).logits[:, 33:39]
        first, cache = routed.prefill(ids[:, :34])
        rest, _ = routed.decode_step(ids[:, 34:39], torch.arange(34, 39).unsqueeze(0), cache, all_logits=True)
    assert torch.allclose(one[:, 0], first, atol=1e-4) and torch.allclose(one[:, 1:], rest, atol=1e-4)


def test_folder_round_trips_and_exports_with_pytorch_parity(tiny_llama, tmp_path):
    import numpy as np

    from tokenskip.config import RoutingConfig, build_routed, save_routing
    from tokenskip.errors import UserError

    model, path = tiny_llama
    with pytest.raises(UserError, match="train-select"):
        build_routed(model, router="select", sparsity=0.25)
    router = _trained_like(3)
    sched = router.schedule_for(model.config.num_hidden_layers, 0.25)
    cfg = RoutingConfig(model="tiny", num_layers=model.config.num_hidden_layers, router="select",
                        schedule=list(sched.sparsity), score_window=16, hidden_size=model.config.hidden_size)
    save_routing(tmp_path / "sel", cfg, router)
    routed, cfg2 = build_routed(model, routers_dir=tmp_path / "sel")
    assert isinstance(routed.router, SelectRouter) and cfg2.router == "select"
    torch.testing.assert_close(routed.router.offset_bias, router.offset_bias)
    assert isinstance(make_router("select"), SelectRouter)

    ort = pytest.importorskip("onnxruntime")
    from tokenskip.deploy.runtime.validate import empty_past
    from tokenskip.export.wrappers import StepGraph
    from tokenskip.routed import default_positions

    export_tiny(model, str(path), routed, cfg2, tmp_path / "exp")
    sess = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = StepGraph(routed).eval()
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    inputs = (ids, mask, default_positions(mask.bool()), *empty_past(graph, 1))
    got = sess.run(None, dict(zip(graph.input_names(), [t.numpy() for t in inputs])))
    with torch.no_grad():
        ref = graph(*inputs)
    assert np.abs(got[0] - ref[0].numpy()).max() <= 1e-4


def test_train_select_end_to_end(tiny_llama, tmp_path, monkeypatch):
    """train_select on the tiny model with synthetic held-out-like text (the built-in splits are
    the real run's): writes a loadable folder and an honest record."""
    from test_longctx import _docs

    from tokenskip.config import build_routed
    from tokenskip.errors import UserError
    from tokenskip.train.longctx_tasks import make_examples

    model, _ = tiny_llama
    tok = make_char_tokenizer(tmp_path / "tok", vocab_size=256)

    def fake_examples(tokenizer, split, settings, n, seed):
        text = _docs({"train": 1, "calib": 2}[split], 6)
        return make_examples(tokenizer, list(settings.tasks), list(settings.lengths), n, seed, wiki=text, news=text)

    monkeypatch.setattr(S, "_examples", fake_examples)
    lm = types.SimpleNamespace(model=model, tokenizer=tok, name="tiny")
    settings = S.SelectSettings(sparsity=0.2, examples=3, lengths=(300,), tasks=("needle", "article_qa"), steps=5,
                                kl_windows=2, kl_len=64, search_generations=1, search_population=3, search_windows=2)
    rec = S.train_select(lm, tmp_path / "sel", settings, progress=False, log=lambda m: None)
    assert rec["train_examples"] == 6 and rec["val_examples"] == 2 and rec["ships"] in ("start", "trained")
    assert rec["trained"]["loss"] <= rec["start"]["loss"]
    routed, cfg = build_routed(model, routers_dir=tmp_path / "sel")
    assert cfg.router == "select" and isinstance(routed.router, SelectRouter)
    # every candidate selection layer was tried with every loss; `choose` picked the one that ships,
    # those qualifying on answers were scored on calibration KL, and the folder's schedule is its layer's
    n = model.config.num_hidden_layers
    cands = rec["candidates"]
    assert [(c["select_layer"], c["loss"]) for c in cands] == [(2, "listwise"), (2, "cut"), (1, "listwise"), (1, "cut")]
    assert S.candidate_layers(n, 0.2) == [2, 1]
    ok = S.qualifying(cands)
    assert all(("calib_kl" in c) == (len(ok) > 1 and i in ok) for i, c in enumerate(cands))
    best = cands[S.choose(cands)]
    assert (rec["select_layer"], rec["loss"]) == (best["select_layer"], best["loss"])
    assert routed.schedule.first_routed == rec["select_layer"] == rec["selection_layer"] + 1
    # the schedule after the selection block was searched; the folder holds what the search record says ships
    search = rec["schedule_search"]
    assert search["generations"] == 1 and search["windows"] == 2 and search["ships"] in ("flat", "searched")
    flat = Schedule.select_after(n, 0.2, rec["select_layer"])
    shipped = list(search["sparsity"]) if search["ships"] == "searched" else list(flat.sparsity)
    assert list(routed.schedule.sparsity) == pytest.approx(shipped, abs=1e-4)
    assert routed.schedule.overall() == pytest.approx(0.2, abs=1e-3)
    one = S.train_select(lm, tmp_path / "sel1", replace(settings, select_layer=1, losses=("cut",),
                                                        search_generations=0), progress=False, log=lambda m: None)
    assert one["schedule_search"] is None
    assert [(c["select_layer"], c["loss"]) for c in one["candidates"]] == [(1, "cut")] and one["selection_layer"] == 0
    with pytest.raises(UserError, match="--losses"):
        replace(settings, losses=("hinge",)).check()
    with pytest.raises(UserError, match="--select-layer"):
        S.train_select(lm, tmp_path / "bad", replace(settings, select_layer=n), progress=False, log=lambda m: None)
    with pytest.raises(UserError, match="--steps"):
        S.SelectSettings(steps=-1).check()
    with pytest.raises(UserError, match="--lengths"):
        S.SelectSettings(lengths=(100,)).check()


def test_search_after_ships_the_searched_schedule_only_where_it_helps(tiny_llama, monkeypatch):
    """search_after's rule: the searched schedule ships with lower calibration KL AND validation
    answers within ANSWER_TOLERANCE of the flat schedule's, and never when it leaves the first
    routed block dense (the table would come from another block than the router was trained on).
    The GA is searched over the blocks after the selection block only, seeded with the flat one."""
    from tokenskip.train import search as G

    model, _ = tiny_llama
    n = model.config.num_hidden_layers
    flat = Schedule.select_after(n, 0.2, 1, dense_last=0)  # blocks 1.. at 0.2 * n / (n - 1)
    seen = {}

    def run(searched: list[float], kl: dict, acc: dict):
        def fake_search(model, router, ids, cont, ss, kv, seeds, **kw):
            seen.update(dense_first=ss.dense_first, dense_last=ss.dense_last, seeds=seeds, target=ss.target)
            return G.SearchResult(schedule=Schedule(tuple(searched)), fitness=0.0)

        monkeypatch.setattr(G, "search_schedule", fake_search)
        monkeypatch.setattr(S, "_val_accuracy", lambda lm, sched, *a: acc[sched is flat])
        fit = {"schedule": flat, "router": SelectRouter(select_layer=1), "record": {"calib_kl": kl[True]}}
        lm = types.SimpleNamespace(model=model)
        rec = S.search_after(lm, fit, S.SelectSettings(sparsity=0.2), lambda sched, r: kl[sched is flat],
                             torch.zeros(2, 8, dtype=torch.long), [], False)
        assert (fit["schedule"] is flat) == (rec["ships"] == "flat")
        return rec

    other = [0.0, 0.1] + [0.2 * n / (n - 1)] * (n - 3) + [0.2 * n / (n - 1) * 2 - 0.1]  # same mean, not flat
    assert run(other, {True: 0.10, False: 0.09}, {True: 0.90, False: 0.89})["ships"] == "searched"
    assert seen["dense_first"] == 1 and seen["dense_last"] == 0 and seen["seeds"] == [flat] and seen["target"] == 0.2
    rec = run(other, {True: 0.10, False: 0.09}, {True: 0.90, False: 0.85})
    assert rec["ships"] == "flat" and rec["why"] == "fewer validation answers"
    rec = run(other, {True: 0.10, False: 0.11}, {True: 0.90, False: 0.95})
    assert rec["ships"] == "flat" and rec["why"] == "no lower calibration KL"
    late = [0.0, 0.0] + [0.2 * n / (n - 2)] * (n - 2)  # block 1 left dense: the table block would move
    rec = run(late, {True: 0.10, False: 0.01}, {True: 0.9, False: 1.0})
    assert rec["ships"] == "flat" and "first routed block" in rec["why"] and "calib_kl_searched" not in rec


def test_choose_prefers_lower_kl_among_candidates_keeping_the_answers():
    """The candidate rule: answers kept first (within ANSWER_TOLERANCE of the best), then calibration KL."""
    rec = lambda ans, kl: {"val_answer_kept": ans, "calib_kl": kl}  # noqa: E731
    assert S.ANSWER_TOLERANCE == 0.02
    assert S.choose([rec(1.0, 0.074), rec(1.0, 0.059), rec(0.992, 0.068)]) == 1  # all qualify: KL decides (0.3)
    assert S.choose([rec(0.958, 0.088), rec(0.993, 0.102)]) == 1  # the listwise router drops answers (0.4)
    assert S.choose([rec(0.30, 0.50), rec(0.88, 0.09)]) == 1  # the middle depth collapsed
    assert S.qualifying([rec(1.0, 0), rec(0.985, 0), rec(0.97, 0)]) == [0, 1]
    assert S.choose([{"val_answer_kept": 0.5}]) == 0  # one candidate, no KL scored


def test_cli_refuses_bad_flags_before_loading():
    from tokenskip.cli import main

    res = CliRunner().invoke(main, ["train-select", "--out", "x", "--lengths", "100"])
    assert res.exit_code != 0 and "--lengths 100" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["train-select", "--out", "x", "--tasks", "poem"])
    assert res.exit_code != 0 and "--tasks poem" in res.output
    res = CliRunner().invoke(main, ["train-select", "--out", "x", "--losses", "hinge"])
    assert res.exit_code != 0 and "--losses hinge" in res.output and "Traceback" not in res.output


def test_a_rerun_reuses_only_the_same_settings(tmp_path):
    """The pipeline's fit stage reuses fit/select only when model and settings are those it was
    trained with (select.json records them)."""
    from tokenskip.fileio import write_json_atomic

    s = S.settings_for("small", 0.3)
    assert (s.examples, s.lengths, s.steps, s.kl_windows, s.kl_len, s.search_generations, s.search_population,
            s.search_windows) == S.BUDGETS["small"]
    assert not S.done_before(tmp_path, s, "m")
    (tmp_path / "tokenskip.json").write_text("{}")
    write_json_atomic(tmp_path / "select.json", {"model": "m", "settings": S._settings_json(s)})
    assert S.done_before(tmp_path, s, "m")
    assert not S.done_before(tmp_path, s, "other-model")
    assert not S.done_before(tmp_path, S.settings_for("small", 0.3, seed=1), "m")


def test_label_is_the_answer_inside_the_evidence_and_its_lead_in():
    """The label train-select fits: the answer's tokens where they stand inside the evidence (not an
    accidental match outside it) and S.LEAD tokens before them."""
    from tokenskip.train.longctx_tasks import LongCtxExample

    prompt = [5, 6, 7, 8, 9, 10, 11, 7, 8, 12, 13, 14]
    ex = LongCtxExample(task="needle", length=12, prompt=prompt, answer=[7, 8], evidence=(5, 10), depth=5 / 12,
                        source="wiki")
    assert S.answer_span(ex) == (7 - S.LEAD, 9)  # the match at 7 (inside), not at 2 (outside)
    ex.answer = [99]  # not inside the evidence as tokenised: the whole evidence is the label
    assert S.answer_span(ex) == (5, 10)


def test_cut_loss_acts_at_the_top_k_cut():
    """A label well inside the keep set costs ~nothing; one below the cut costs, and its gradient
    raises the label and lowers the token at the cut (the loss is on the top-k decision, not on an
    average probability)."""
    seq = 40
    positions = torch.arange(seq)
    cand = (positions > 0) & (positions < 30)  # 29 candidates; 10 recent + the sink kept anyway
    table = torch.full((seq,), 0.01)
    table[5] = 0.5  # the label's own attention: top of the candidates
    target = torch.zeros(seq, dtype=torch.bool)
    target[5] = True
    it = S.Item(table, positions, cand, target, keep=seq - 29 + 4)
    assert S.learned_slots(it) == 4
    r = SelectRouter()
    with torch.no_grad():
        r.offset_bias.fill_(-30.0)
        r.offset_bias[r.BACK] = 0.0  # each token scores its own attention only
    assert float(S.cut_loss(r, [it]).detach()) < 1e-3
    table[5], table[20:24] = 0.01, 0.5  # now four others fill the cut and the label ranks below it
    loss = S.cut_loss(r, [S.Item(table, positions, cand, target, keep=seq - 29 + 4)])
    assert float(loss.detach()) > 1.0
    loss.backward()
    assert float(r.recency.grad) > 0  # a recency tilt lifts the cut (tokens 20-23) over the early label: less of it
