"""tokenskip.timing, the one benchmarking toolkit: the percentile against numpy, the timer's clock
and device sync, and the alternation loop's order and warm-up exclusion, on a fake clock (so the
checks are exact and cannot pass by accident). Plus tokenskip.synthetic's random-weight builder."""

from __future__ import annotations

import statistics
import types

import numpy as np
import pytest

from tokenskip import timing


# ------------------------------------------------------------------------------------ percentile
@pytest.mark.parametrize("n", [1, 2, 5, 8, 11])
@pytest.mark.parametrize("q", [0, 10, 25, 50, 90, 99, 100])
def test_percentile_is_numpys_linear_percentile(n, q):
    values = np.random.default_rng(n * 101 + q).exponential(size=n).tolist()  # skewed, like latencies
    assert timing.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=0)


def test_percentile_interpolates_and_median_is_the_usual_one():
    v = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4, ranks 0..3
    assert timing.percentile(v, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert timing.percentile(v, 50) == 2.5 == statistics.median(v)
    assert timing.median([5.0, 1.0, 9.0]) == 5.0
    assert np.isnan(timing.percentile([], 50))  # no samples: nan, not a number made up
    with pytest.raises(ValueError, match="0-100"):
        timing.percentile(v, 0.9 * 1000)  # the old 0-1 convention must not silently mean p0.9


# ------------------------------------------------------------------------------------------ timer
class FakeClock:
    """perf_counter stand-in: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_timer_times_the_call_between_two_syncs(clock):
    events = []

    def sync():
        events.append("sync")
        clock.now += 1.0  # time spent draining the device before the start / before the stop

    def work():
        events.append("work")
        clock.now += 0.25
        return "out"

    out, seconds = timing.Timer(sync).measure(work)
    assert out == "out" and events == ["sync", "work", "sync"]
    assert seconds == pytest.approx(1.25)  # the closing sync counts (the work finishes there), the opening one not
    assert timing.Timer()(work) == pytest.approx(0.25)


def test_stopwatch_counts_from_its_start(clock):
    clock.now += 5.0
    since = timing.stopwatch()
    clock.now += 2.5
    assert since() == pytest.approx(2.5)


def test_timer_refuses_sync_with_cuda_events():
    with pytest.raises(ValueError, match="not both"):
        timing.Timer(lambda: None, cuda_events=True)
    assert timing.Timer.for_device("cuda:0").cuda_events and not timing.Timer.for_device("cpu").cuda_events


# ------------------------------------------------------------------------------------ alternation
def test_round_order_rotates():
    assert [timing.round_order("AB", r) for r in range(4)] == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]
    assert [timing.round_order("ABC", r) for r in range(4)] == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]


def test_alternate_order_and_warmup_exclusion(clock):
    """Each side's call takes a known time on the fake clock; warm-up calls take far longer (cold
    caches) and must not appear among the samples; the call log shows the alternation."""
    log = []
    cost = {"A": 1.0, "B": 2.0, "C": 3.0}

    def side(name):
        def run():
            log.append(name)
            warm = log.count(name) <= 2  # this side's first two calls are the warm-up
            clock.now += cost[name] + (1000.0 if warm else 0.0) + 0.01 * len(log)  # + drift over time
        return run

    result = timing.alternate({n: side(n) for n in "ABC"}, repeats=4, warmup=2)
    assert log == list("ABC" "ABC" "ABC" "BCA" "CAB" "ABC")  # 2 warm-up rounds, then rotating rounds
    # sample i of a side is its cost plus the drift at the position it ran in (1-based index in the log)
    for name in "ABC":
        positions = [i + 1 for i, n in enumerate(log) if n == name][2:]
        assert result.samples[name] == pytest.approx([cost[name] + 0.01 * p for p in positions])
        assert max(result.samples[name]) < 1000  # warm-up excluded
    s = result.summary()["B"]
    assert s.n == 4 and s.median == pytest.approx(timing.median(result.samples["B"]))
    assert s.p90 == pytest.approx(np.percentile(result.samples["B"], 90)) and result.p90("B") == s.p90
    assert s.mean == pytest.approx(np.mean(result.samples["B"]))


def test_alternate_with_self_timed_sides():
    """Sides that time themselves (untimed setup, then the timed part) report their own seconds."""
    calls = {"dense": 0, "routed": 0}

    def side(name, seconds):
        def run():
            calls[name] += 1
            return seconds
        return run

    result = timing.alternate({"dense": side("dense", 0.5), "routed": side("routed", 0.2)}, 3, 1, timing.self_timed)
    assert result.samples == {"dense": [0.5] * 3, "routed": [0.2] * 3} and calls == {"dense": 4, "routed": 4}


def test_alternate_refuses_no_rounds():
    with pytest.raises(ValueError, match="repeats"):
        timing.alternate({"a": lambda: None}, repeats=0, warmup=0)
    with pytest.raises(ValueError, match="no sides"):
        timing.alternate({}, repeats=1, warmup=0)


# -------------------------------------------------------------------------------------- synthetic
def test_synthetic_llama_is_built_in_the_dtype_with_the_shape():
    import torch

    from tokenskip.synthetic import build_model

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = build_model(shape, "cpu", torch.float16)
    again = (torch.manual_seed(0), build_model(shape, "cpu", torch.float16))[1]
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float16} and not any(p.requires_grad for p in params)
    assert model.config.num_key_value_heads == 2 and len(model.model.layers) == 2 and not model.training
    assert model.get_input_embeddings().weight.shape == (128, 32)
    assert torch.equal(params[0], next(again.parameters()))  # seeded: repeatable weights
    assert torch.get_default_dtype() == torch.float32  # the default dtype is restored
