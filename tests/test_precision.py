"""bf16/fp16 against fp32 on the CPU (docs/gpu.md, "Precision"): the frozen LLM in half precision,
the router, its features and the attention-score table in fp32, router training under autocast.

Tolerances (measured values in docs/gpu.md):
- routed model, tiny random Llama: mean KL(fp32 || bf16) of the next-token distributions <= 1e-4,
  kept-token sets of the learned router >= 95% the same;
- smollm2-135m (slow test), 4 held-out windows of 256 tokens, last 32 scored: KL(fp32 || bf16) <= 0.005
  for dense and static-routed (measured 0.0012), <= 0.05 for a learned router (seed 0, standardised,
  untrained: measured 0.017; about 1.5% of its kept tokens change, as its attention-score feature
  reads bf16 hidden states), whose kept sets are >= 93% the same in every block (measured 96.2%
  worst, 98.5% mean);
- a short router training: every logged loss, guide and KL within 2% (relative) of fp32 (measured 0.44%).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from tests.test_train import TEXT, _make_model

KL_TINY = 1e-4
KEPT_TINY = 0.95
KL_REAL = 0.005
KL_REAL_LEARNED = 0.05
KEPT_REAL = 0.93
LOSS_REL = 0.02


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(softmax a || softmax b) per position."""
    la, lb = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
    return (la.exp() * (la - lb)).sum(-1)


def _kept_overlap(ta, tb) -> float:
    """Fraction of the kept tokens two traces of one block share."""
    shape = (ta.index.shape[0], int(max(ta.index.max(), tb.index.max())) + 1)
    ma = torch.zeros(shape).scatter(1, ta.index.cpu(), 1.0)
    mb = torch.zeros(shape).scatter(1, tb.index.cpu(), 1.0)
    return float((ma * mb).sum() / ta.index.numel())


@pytest.fixture(scope="module")
def tiny_pair(tiny_llama):
    model, _ = tiny_llama
    half = copy.deepcopy(model).to(torch.bfloat16)
    return model, half


def test_bf16_routed_model_matches_fp32(tiny_pair):
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import LearnedRouter, StaticRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train.trainer import standardise_features

    fp32, bf16 = tiny_pair
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (4, 64))  # [B,S]
    sched = Schedule((0.0, 0.5, 0.5, 0.3))
    learned = LearnedRouter()
    standardise_features(learned, fp32, sched, ids, 8, "skip")
    for router in (StaticRouter(), learned):
        a = RoutedModel(fp32, sched, router)(ids, n_tail=8, trace=True)
        b = RoutedModel(bf16, sched, router)(ids, n_tail=8, trace=True)
        assert b.logits.dtype == torch.bfloat16
        assert float(_kl(a.logits, b.logits).mean()) <= KL_TINY
        for ta, tb in zip(a.traces, b.traces):
            if ta.index is None:
                continue
            assert tb.logits.dtype == torch.float32  # router scores stay fp32
            assert _kept_overlap(ta, tb) >= KEPT_TINY


def test_attention_score_feature_is_fp32_under_half_precision(tiny_pair):
    """The score window is computed in fp32 from bf16 queries/keys, also under autocast."""
    from tokenskip.block import window_attention_scores

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    allowed = torch.ones(2, 16, 16, dtype=torch.bool).tril()
    ok = torch.ones(2, 16, dtype=torch.bool)
    ref, _ = window_attention_scores(q, k, allowed, ok, 4, 8 ** -0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = window_attention_scores(q.bfloat16(), k.bfloat16(), allowed, ok, 4, 8 ** -0.5)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=2e-2, rtol=0)  # only the bf16 inputs' rounding, not bf16 softmax
    from tokenskip.routers import LearnedRouter

    r = LearnedRouter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(torch.randn(2, 16, 4))
    assert out.dtype == torch.float32 and all(p.dtype == torch.float32 for p in r.parameters())


def _train(model, tmp, name, steps=6, **kw):
    from tokenskip.schedule import Schedule
    from tokenskip.train.trainer import TrainSettings, train_router

    torch.manual_seed(3)
    ids = torch.randint(0, 256, (6, 32))
    st = TrainSettings(steps=steps, seq_len=32, cont_len=8, batch_size=2, windows=6, checkpoint_every=2, lr=0.05)
    router = train_router(model, Schedule((0.0, 0.5, 0.5, 0.2)), ids, ids[:2], st, tmp / name, progress=False, **kw)
    return router, json.loads((tmp / name / "train_history.json").read_text())["history"]


def test_bf16_training_matches_fp32_and_resumes_exactly(tiny_pair, tmp_path):
    fp32, bf16 = tiny_pair
    r32, h32 = _train(fp32, tmp_path, "fp32")
    r16, h16 = _train(bf16, tmp_path, "bf16")
    assert all(p.dtype == torch.float32 for p in r16.parameters())
    from tokenskip.fileio import load_safetensors

    state = load_safetensors(next((tmp_path / "bf16" / "checkpoint").glob("*.safetensors")))
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith(("router.", "optim.")))
    for a, b in zip(h32, h16):
        for key in ("loss", "guide", "kl"):
            assert abs(a[key] - b[key]) <= LOSS_REL * max(abs(a[key]), 1e-3), (key, a, b)
    cfg = json.loads((tmp_path / "bf16" / "tokenskip.json").read_text())
    assert cfg["extra"]["training"]["dtype"] == "bf16"
    # interrupted and resumed in bf16: the same bytes as uninterrupted
    with pytest.raises(KeyboardInterrupt):
        _train(bf16, tmp_path, "cut", stop_after=3)
    _train(bf16, tmp_path, "cut")
    for name in ("router.safetensors", "train_history.json"):
        assert (tmp_path / "bf16" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()
    # a bf16 checkpoint is not resumed by an fp32 run (the numbers would change)
    from tokenskip.errors import UserError

    with pytest.raises(UserError, match="other settings"):
        _train(fp32, tmp_path, "cut", steps=6)


def test_fp16_training_uses_a_grad_scaler(tiny_llama, tmp_path):
    model, _ = tiny_llama
    fp16 = copy.deepcopy(model).to(torch.float16)
    router, hist = _train(fp16, tmp_path, "fp16", steps=4)
    assert all(torch.isfinite(p).all() for p in router.parameters())
    assert all(h["loss"] == h["loss"] for h in hist)  # finite losses
    meta = json.loads((tmp_path / "fp16" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["scaler"]["scale"] > 1 and meta["identity"]["dtype"] == "fp16"


def test_cli_dtype_and_device_flags(tmp_path):
    model_dir = _make_model(tmp_path / "tiny")
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT, encoding="utf-8")
    from tokenskip.cli import main

    args = ["eval", "--model", model_dir, "--router", "static", "--sparsity", "0.5", "--text", text, "--seq-len", 32,
            "--cont-len", 8, "--windows", 2, "--json"]
    runs = {dt: CliRunner().invoke(main, [*map(str, args), "--dtype", dt]) for dt in ("fp32", "bf16")}
    for dt, r in runs.items():
        assert r.exit_code == 0, r.output
    a, b = (json.loads(runs[dt].output) for dt in ("fp32", "bf16"))
    assert b["dtype"] == "bf16" and b["device"] == "cpu"
    ra, rb = a["results"][1], b["results"][1]
    assert rb["kl"] == pytest.approx(ra["kl"], abs=1e-3) and rb["flops"] == ra["flops"]
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, [*map(str, args), "--device", "cuda"])
        assert r.exit_code != 0 and "--device cuda: no CUDA GPU is visible" in r.output
        assert "Traceback" not in r.output


@pytest.mark.slow
def test_smollm2_bf16_matches_fp32(smollm2):
    """The real model, 4 held-out windows: dense and static-routed continuation distributions, and
    the kept sets of a learned router (standardised, untrained) reading the bf16 attention scores."""
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import LearnedRouter, StaticRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train.trainer import standardise_features
    from tokenskip.windows import load_windows

    fp32 = smollm2.model
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = load_windows(smollm2.tokenizer, "eval", 256, 4, 0)  # [4,256]
    n = fp32.config.num_hidden_layers
    sched = Schedule.uniform(n, 0.3)
    torch.manual_seed(0)  # the untrained router's weights: its sensitivity to bf16 depends on them (docs/gpu.md)
    learned = LearnedRouter()
    standardise_features(learned, fp32, sched, ids[:2], 32, "skip")
    for router in (None, StaticRouter(), learned):
        a = RoutedModel(fp32, sched, router)(ids, n_tail=32, trace=True, num_logits=32)
        b = RoutedModel(bf16, sched, router)(ids, n_tail=32, trace=True, num_logits=32)
        kl = float(_kl(a.logits, b.logits).mean())
        assert kl <= (KL_REAL_LEARNED if router is learned else KL_REAL), (router, kl)
        overlaps = [_kept_overlap(ta, tb) for ta, tb in zip(a.traces, b.traces) if ta.index is not None]
        if overlaps:
            assert min(overlaps) >= KEPT_REAL, (router, overlaps)
