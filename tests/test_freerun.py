"""Free-running text (core/freerun.py): the repetition metric, and that greedy continuations are
the tokens `generate` produces (the same routed prefill and cached decode), scored against dense."""

from __future__ import annotations

import pytest
import torch

from tokenskip.freerun import format_free_running, free_running, greedy_tokens, prefix_len, repetition_rate
from tokenskip.routed import RoutedModel
from tokenskip.routers import RandomRouter, StaticRouter
from tokenskip.schedule import Schedule


def test_repetition_rate_counts_repeated_ngrams():
    assert repetition_rate(list(range(20))) == 0.0  # nothing repeats
    loop = [1, 2, 3, 4, 5] * 4  # a 5-token sentence said four times
    grams = len(loop) - 3
    assert repetition_rate(loop) == pytest.approx((grams - 5) / grams)  # every 4-gram after the first loop
    assert repetition_rate([7] * 10) == pytest.approx(6 / 7)
    assert repetition_rate([1, 2, 3]) == 0.0  # shorter than one 4-gram
    assert prefix_len(torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4]]), torch.tensor([[1, 2, 3, 5], [1, 2, 3, 4]])).tolist() == [3, 1]


def test_greedy_tokens_are_what_generate_produces(tiny_llama):
    """The free-running check decodes exactly as deployment: same tokens as the TorchBackend's
    generation loop for a routed model."""
    from tokenskip.deploy.runtime.torch_backend import TorchBackend
    from tokenskip.deploy.runtime.generation import Sampling, generate_tokens

    model, _ = tiny_llama
    routed = RoutedModel(model, Schedule((0.0, 0.5, 0.5, 0.0)), StaticRouter())
    prompt = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(3))
    ours = greedy_tokens(routed, prompt, 12)  # [2,12]
    gen = generate_tokens(TorchBackend(routed), prompt.tolist(), Sampling(12), pad_id=0)
    assert ours.tolist() == [list(t) for t in gen.tokens]


def test_free_running_against_dense(tiny_llama):
    model, _ = tiny_llama
    n = model.config.num_hidden_layers
    dense = RoutedModel(model, Schedule.dense(n), None)
    same = RoutedModel(model, Schedule.dense(n), None)
    rand = RoutedModel(model, Schedule((0.0, 0.7, 0.7, 0.0)), RandomRouter(seed=0))
    prompts = torch.randint(3, 250, (6, 20), generator=torch.Generator().manual_seed(4))
    rows = free_running([("same", same), ("random", rand)], dense, prompts, 16, batch_size=4, progress=False)
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["dense", "same", "random"]
    assert by["same"]["greedy_agree"] == 1.0 and by["same"]["greedy_prefix"] == 16.0
    assert by["same"]["rep4"] == by["dense"]["rep4"] and by["same"]["rep4_minus_dense_ci"] == [0.0, 0.0]
    assert by["random"]["greedy_agree"] < 1.0  # routing 70% of two blocks away changes the text
    lo, hi = by["random"]["greedy_agree_ci"]
    assert lo <= by["random"]["greedy_agree"] <= hi
    assert len(by["random"]["per_prompt"]["rep4"]) == 6
    table = format_free_running(rows)
    assert table.count("\n") == 4 and "| random |" in table
