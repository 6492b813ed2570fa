"""Long-prompt tasks (tokenskip.train.longctx*) and the training-free attention router.

Generation runs on a character tokenizer over synthetic held-out-like text (fast, no model), the
scoring on the tiny random Llama: scoring must equal step-by-step greedy decoding through the KV
cache, the deployment function. The attention router is checked for its ranking, through the
routed model (prefill + decode = one pass, the causality rule) and through the ONNX export.
"""

from __future__ import annotations

import random

import pytest
import torch
from click.testing import CliRunner

from conftest import make_char_tokenizer
from tokenskip.routed import RoutedModel
from tokenskip.routers import AttentionRouter, RouteContext, StaticRouter, make_router
from tokenskip.schedule import Schedule
from tokenskip.train.longctx import score_examples, summarize, wilson_ci
from tokenskip.train.longctx_tasks import TASKS, find_sub, make_examples

pytestmark = pytest.mark.usefixtures("one_thread")

_WORDS = ["river", "stone", "harbour", "council", "market", "garden", "temple", "bridge", "valley", "castle"]


def _docs(seed: int, n: int) -> list[str]:
    """Held-out-like prose: sentences with names and numbers (what article_qa needs)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(30):
            w = rng.sample(_WORDS, 4)
            name = "".join(rng.choices("aeioubdklmnrst", k=7)).title()  # unique names: no answer leaks
            sents.append(f"The old {w[0]} near the {w[1]} was built by {name} "
                         f"in {rng.randint(1100, 1900)} beside the {w[2]} and the {w[3]}.")
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("char-tok"), vocab_size=256)


def _examples(tok, seed=0, n=6, lengths=(300, 480)):
    return make_examples(tok, list(TASKS), list(lengths), n, seed, wiki=_docs(1, 6), news=_docs(2, 6))


def test_generator_is_deterministic(tok):
    a, b = _examples(tok, seed=3), _examples(tok, seed=3)
    assert [x.to_json() for x in a] == [x.to_json() for x in b]
    c = _examples(tok, seed=4)
    assert [x.prompt for x in a] != [x.prompt for x in c]
    assert len(a) == len(TASKS) * 2 * 6


def test_evidence_at_stated_depth_and_no_leak(tok):
    exs = _examples(tok)
    for ex in exs:
        s, e = ex.evidence
        assert 0 <= s < e <= len(ex.prompt)
        assert ex.depth == pytest.approx(s / len(ex.prompt))
        # the answer occurs inside the evidence, and nowhere else in the prompt
        hits = find_sub(ex.prompt, ex.answer)
        assert hits and all(s <= i and i + len(ex.answer) <= e for i in hits), ex.task
        if ex.task != "kv_lookup":
            assert len(ex.prompt) == ex.length
        else:
            assert 0.85 * ex.length <= len(ex.prompt) <= ex.length  # whole pairs only: a little short
    # depths are stratified over [0, 1]: both halves of the prompt hold evidence for every task
    for task in TASKS:
        d = [ex.depth for ex in exs if ex.task == task]
        assert min(d) < 0.3 and max(d) > 0.5, (task, d)  # article_qa: the quoted question is long in characters


def test_needle_text_is_readable(tok):
    ex = next(x for x in _examples(tok) if x.task == "needle")
    fact = tok.decode(ex.prompt[ex.evidence[0]:ex.evidence[1]])
    assert tok.decode(ex.answer).strip() in fact


@torch.no_grad()
def _greedy(routed, prompt, n):
    """Step-by-step greedy decoding through the KV cache: n generated ids."""
    first, cache = routed.prefill(torch.tensor([prompt]))
    out = [int(first.argmax(-1))]
    pos = len(prompt)
    while len(out) < n:
        logits, cache = routed.decode_step(torch.tensor([[out[-1]]]), torch.tensor([[pos]]), cache)
        out.append(int(logits.argmax(-1)))
        pos += 1
    return out


@pytest.mark.parametrize("kind", ["static", "attention"])
def test_scoring_equals_greedy_decoding(tiny_llama, tok, kind):
    model, _ = tiny_llama
    routed = RoutedModel(model, Schedule((0.0, 0.4, 0.3, 0.0)), make_router(kind), score_window=8)
    exs = _examples(tok, n=2, lengths=(300,))
    for i, ex in enumerate(exs):
        if i % 2 == 0:  # make half the answers exactly what greedy decoding produces
            ex.answer = _greedy(routed, ex.prompt, len(ex.answer))
    correct, logprob = score_examples(routed, exs, batch_size=2)
    for ex, c, lp in zip(exs, correct, logprob):
        assert c == int(_greedy(routed, ex.prompt, len(ex.answer)) == ex.answer)
        assert lp < 0
    assert correct[0::2] == [1] * len(exs[0::2])


def test_summary_rows(tok):
    exs = _examples(tok, n=4, lengths=(300,))
    n = len(exs)
    correct = {"dense": [1] * n, "static": [i % 2 for i in range(n)]}
    rows = {(r["method"], r["task"], r["length"]): r for r in summarize(exs, correct)}
    r = rows[("static", "needle", 300)]
    assert r["n"] == 4 and r["accuracy"] == 0.5 and r["ratio_to_dense"] == 0.5
    assert r["accuracy_ci"][0] < 0.5 < r["accuracy_ci"][1]
    assert sum(b["n"] for b in r["by_depth"]) == 4
    assert rows[("dense", "needle", "all")]["accuracy"] == 1.0
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)


def test_attention_router_ranks_by_attention():
    pos = torch.arange(6).unsqueeze(0)  # [1,6]
    attn = torch.tensor([[0.5, 0.0, 0.3, 0.0, 0.1, 0.1]])
    ctx = RouteContext(layer=1, sparsity=0.5, positions=pos, valid=torch.ones(1, 6, dtype=torch.bool), attn=attn)
    order = AttentionRouter().scores(ctx).argsort(descending=True)[0].tolist()
    assert order == [0, 2, 5, 4, 3, 1]  # attention first, recency breaks ties
    assert AttentionRouter.needs_attention and not StaticRouter.needs_attention


def test_attention_router_routes_by_content_and_is_causal(tiny_llama):
    model, _ = tiny_llama
    sched = Schedule((0.0, 0.5, 0.5, 0.0))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    att = RoutedModel(model, sched, AttentionRouter(), score_window=8)
    sta = RoutedModel(model, sched, StaticRouter(), score_window=8)
    with torch.no_grad():
        a, s = att(ids, trace=True), sta(ids, trace=True)
        kept_a, kept_s = a.traces[1].index[0].tolist(), s.traces[1].index[0].tolist()
        assert kept_a != kept_s and 0 in kept_a and 39 in kept_a
        # one pass with a 6-token tail = prefill of the prompt + decode of the tail
        one = att(ids, n_tail=6).logits[:, 33:39]  # predictions of tokens 34..39
        first, cache = att.prefill(ids[:, :34])
        rest, _ = att.decode_step(ids[:, 34:39], torch.arange(34, 39).unsqueeze(0), cache, all_logits=True)
    assert torch.allclose(one[:, 0], first, atol=1e-4) and torch.allclose(one[:, 1:], rest, atol=1e-4)


def test_cli_errors_name_the_flag():
    from tokenskip.train.longctx_cli import longctx

    res = CliRunner().invoke(longctx, ["--methods", "static,bogus", "--sparsity", "0.3"])
    assert res.exit_code != 0 and "--methods bogus" in res.output
    res = CliRunner().invoke(longctx, ["--lengths", "512,abc", "--sparsity", "0.3", "--methods", "static"])
    assert res.exit_code != 0 and "--lengths" in res.output
    res = CliRunner().invoke(longctx, ["--methods", "static"])
    assert res.exit_code != 0 and "--sparsity" in res.output


def test_report_section_notes_a_router_whose_schedule_cannot_hold_the_sparsity(tiny_llama, tok):
    """`report` at 0.5 on a fit folder must not fail after its KL table because gemfilter's
    schedule shape (half the blocks dense) cannot hold 0.5: that router is noted, the rest scored."""
    import types

    from tokenskip.train.report import QualitySettings, longctx_section

    model, _ = tiny_llama
    lm = types.SimpleNamespace(model=model, name="tiny")
    base = RoutedModel(model, Schedule.dense(4), None)
    q = QualitySettings(longctx=("needle",), longctx_lengths=(300,), longctx_examples=1)
    exs = _examples(tok, n=1, lengths=(300,))[:1]
    obj = longctx_section(lm, base, [], 0.5, exs, q, progress=False)
    methods = {r["method"] for r in obj["rows"]}
    assert "dense" in methods and any(m.startswith("attention") for m in methods)
    assert not any(m.startswith("gemfilter") for m in methods)
    assert len(obj["skipped"]) == 1 and obj["skipped"][0].startswith("gemfilter at sparsity 0.5: ")
    assert "Not scored: gemfilter at sparsity 0.5" in obj["markdown"]
