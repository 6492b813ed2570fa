"""Quality of a routed model, measured exactly as deployment computes it.

Each window of L tokens is a prompt of L - c tokens and a continuation of c tokens. The prompt goes
through routed prefill (what `generate` runs: the same forced tokens, the same attention-score
window over prompt rows only), then the continuation is decoded teacher-forced through the KV cache
(every block runs for every continuation token and attends to each layer's cached, kept keys).
Only the continuation is scored: perplexity, KL(dense || routed) and top-1 agreement with dense.
Nothing the router reads depends on the scored tokens (docs/design.md, "Causality").
Whole-window perplexity would score skipped tokens' own predictions, which are bad by design
(benchmarks.md).

Per-window values are kept, so every figure carries a paired bootstrap 95% CI (tokenskip.stats).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import stats
from .flops import routed_flops_ratio
from .precision import model_device
from .routed import RoutedModel


@torch.no_grad()
def continuation_logprobs(routed: RoutedModel, ids: torch.Tensor, n_cont: int) -> torch.Tensor:
    """ids [B,L] -> log-probs [B,c,V] of the predictions of the last c tokens: routed prefill of
    ids[:, :L-c], then one teacher-forced decode call for the continuation (equal to c single
    decode steps, tested). A model with no router is the dense model through the same code."""
    bsz, seq = ids.shape
    prompt, cont = ids[:, :seq - n_cont], ids[:, seq - n_cont:]  # [B,P], [B,c]
    first, cache = routed.prefill(prompt)  # [B,V] predicts cont[:, 0]
    parts = [first.unsqueeze(1)]
    if n_cont > 1:
        pos = torch.arange(seq - n_cont, seq - 1, device=ids.device).expand(bsz, -1)  # [B,c-1]
        rest, _ = routed.decode_step(cont[:, :-1], pos, cache, all_logits=True)  # [B,c-1,V]
        parts.append(rest)
    return F.log_softmax(torch.cat(parts, 1).float(), dim=-1)  # [B,c,V]


def token_nll(log_probs: torch.Tensor, ids: torch.Tensor, n_cont: int) -> torch.Tensor:
    """log_probs [B,c,V], ids [B,L] -> per-token NLL [B,c] of the continuation."""
    targets = ids[:, -n_cont:]  # [B,c]
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass
class WindowScores:
    """Per-window means over the continuation of one method (the bootstrap's unit)."""

    nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)  # KL(dense || method)
    top1: list[float] = field(default_factory=list)  # argmax agreement with dense

    def add(self, lp: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor, n_cont: int) -> None:
        """lp, ref [B,c,V] log-probs of the method and of dense on windows ids [B,L]."""
        self.nll += token_nll(lp, ids, n_cont).mean(-1).tolist()
        self.kl += (ref.exp() * (ref - lp)).sum(-1).mean(-1).tolist()
        self.top1 += (ref.argmax(-1) == lp.argmax(-1)).float().mean(-1).tolist()


@dataclass
class EvalResult:
    method: str
    ppl: float
    nll: float
    kl: float  # mean KL(dense || method) over continuation positions
    top1: float  # argmax agreement with dense
    flops: float  # analytic FLOPs of the routed prefill relative to dense prefill
    sparsity: float  # achieved overall sparsity over prompt tokens
    windows: int
    seq_len: int
    cont_len: int
    ppl_ratio: float = float("nan")  # ppl / dense ppl
    kl_ci: list[float] | None = None  # paired bootstrap 95% CI
    ppl_ratio_ci: list[float] | None = None
    top1_ci: list[float] | None = None
    per_window: dict | None = None  # {"nll": [...], "kl": [...], "top1": [...]}

    def to_json(self) -> dict:
        return asdict(self)


def _describe(routed: RoutedModel, seq: int, n_cont: int) -> tuple[float, float]:
    """(FLOPs of the routed prompt prefill relative to dense, achieved sparsity over the prompt)."""
    cfg = routed.model.config
    schedule = routed.schedule if routed.router is not None else None
    prompt = seq - n_cont
    ratio = routed_flops_ratio(routed, prompt)
    sparsity = schedule.overall(prompt) if schedule is not None else 0.0
    if routed.removed_layers:  # whole blocks skipped by every token
        sparsity = len(routed.removed_layers) / cfg.num_hidden_layers
    return ratio, sparsity


def _result(method: str, scores: WindowScores, dense: WindowScores, flops: float, sparsity: float, seq: int,
            n_cont: int, idx) -> EvalResult:
    nll, dense_nll = sum(scores.nll) / len(scores.nll), sum(dense.nll) / len(dense.nll)
    res = EvalResult(method=method, ppl=math.exp(nll), nll=nll, kl=sum(scores.kl) / len(scores.kl),
                     top1=sum(scores.top1) / len(scores.top1), flops=flops, sparsity=sparsity,
                     windows=len(scores.nll), seq_len=seq, cont_len=n_cont, ppl_ratio=math.exp(nll - dense_nll),
                     per_window={"nll": scores.nll, "kl": scores.kl, "top1": scores.top1})
    if idx is not None:
        res.kl_ci = list(stats.mean_ci(scores.kl, idx))
        res.ppl_ratio_ci = list(stats.ratio_ci(scores.nll, dense.nll, idx))
        res.top1_ci = list(stats.mean_ci(scores.top1, idx))
    return res


@torch.no_grad()
def evaluate_methods(methods: list[tuple[str, RoutedModel]], windows: torch.Tensor, n_cont: int,
                     batch_size: int = 4, progress: bool = True, seed: int = 0,
                     dense_model: RoutedModel | None = None) -> list[EvalResult]:
    """Score every method on the same windows [N,L] against dense (the first result), batch by
    batch, so dense log-probs never pile up in memory. CIs use one shared set of bootstrap draws.
    `dense_model` (router None) defaults to the first method's model without routing."""
    n, seq = windows.shape
    if not 0 < n_cont < seq - 1:
        raise ValueError(f"continuation length {n_cont} must be in [1, {seq - 2}]")
    if dense_model is None:
        if not methods:
            raise ValueError("no methods to evaluate")
        base = methods[0][1]
        dense_model = RoutedModel(base.model, base.schedule, None, kv_policy=base.kv_policy)
    windows = windows.to(model_device(dense_model.model))
    dense, scores = WindowScores(), [WindowScores() for _ in methods]
    bar = tqdm(total=n * (len(methods) + 1), desc="quality", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        ids = windows[start:start + batch_size]  # [B,L]
        ref = continuation_logprobs(dense_model, ids, n_cont)  # [B,c,V]
        dense.add(ref, ref, ids, n_cont)
        bar.update(len(ids))
        for (name, routed), sc in zip(methods, scores):
            bar.set_postfix_str(name)
            sc.add(continuation_logprobs(routed, ids, n_cont), ref, ids, n_cont)
            bar.update(len(ids))
    bar.close()
    idx = stats.resample_indices(n, seed=seed) if n > 1 else None
    out = [_result("dense", dense, dense, 1.0, 0.0, seq, n_cont, idx)]
    for (name, routed), sc in zip(methods, scores):
        out.append(_result(name, sc, dense, *_describe(routed, seq, n_cont), seq, n_cont, idx))
    return out


def compare(a: EvalResult, b: EvalResult, seed: int = 0) -> dict:
    """Paired difference a - b (KL, and log perplexity ratio) with bootstrap 95% CIs: does a beat b?"""
    if a.per_window is None or b.per_window is None or a.windows != b.windows:
        raise ValueError("compare() needs per-window scores of the same windows")
    idx = stats.resample_indices(a.windows, seed=seed)
    kl = stats.diff_ci(a.per_window["kl"], b.per_window["kl"], idx)
    nll = stats.diff_ci(a.per_window["nll"], b.per_window["nll"], idx)
    return {"a": a.method, "b": b.method, "kl_diff": kl[0], "kl_diff_ci": [kl[1], kl[2]],
            "ppl_ratio": math.exp(nll[0]), "ppl_ratio_ci": [math.exp(nll[1]), math.exp(nll[2])],
            "a_better_kl": kl[2] < 0, "b_better_kl": kl[1] > 0}


# -- a stored dense reference (the sparsity search scores ~100 schedules on the same windows) ------

@dataclass
class DenseReference:
    """Dense continuation log-probs of a (small) window set, computed once."""

    log_probs: torch.Tensor  # [N,c,V] float32
    nll: float  # mean over continuation tokens


@torch.no_grad()
def dense_reference(routed: RoutedModel, windows: torch.Tensor, n_cont: int, batch_size: int = 4,
                    progress: bool = True) -> DenseReference:
    dense_model = RoutedModel(routed.model, routed.schedule, None, kv_policy=routed.kv_policy)
    windows = windows.to(model_device(routed.model))
    parts, nlls = [], []
    for start in tqdm(range(0, len(windows), batch_size), desc="dense", disable=not progress, leave=False):
        ids = windows[start:start + batch_size]
        lp = continuation_logprobs(dense_model, ids, n_cont)
        parts.append(lp)
        nlls.append(token_nll(lp, ids, n_cont))
    return DenseReference(torch.cat(parts), torch.cat(nlls).mean().item())


@torch.no_grad()
def evaluate(routed: RoutedModel, windows: torch.Tensor, n_cont: int, dense: DenseReference, method: str = "routed",
             batch_size: int = 4, progress: bool = True) -> EvalResult:
    """Score `routed` on windows [N,L] against a stored dense reference (no CIs: the search's
    fitness). Same deployment function as `evaluate_methods`."""
    n, seq = windows.shape
    if not 0 < n_cont < seq - 1:
        raise ValueError(f"continuation length {n_cont} must be in [1, {seq - 2}]")
    scores = WindowScores()
    windows = windows.to(model_device(routed.model))
    for start in tqdm(range(0, n, batch_size), desc=method, disable=not progress, leave=False):
        ids = windows[start:start + batch_size]
        scores.add(continuation_logprobs(routed, ids, n_cont), dense.log_probs[start:start + batch_size], ids, n_cont)
    dense_scores = WindowScores(nll=[dense.nll] * n)
    return _result(method, scores, dense_scores, *_describe(routed, seq, n_cont), seq, n_cont, None)
