"""Quality of a routed model, scored on the continuation after a routed prompt.

Each window of L tokens is a prompt of L - c routed tokens plus a continuation of c tokens that
runs every block and attends to the prompt's kept keys (decode semantics, method.md section 5). In
one forward pass that is: force-keep the last c tokens, route the rest (RoutedModel n_tail=c).
Only the continuation is scored: its perplexity, KL(dense || routed) and top-1 agreement with dense.
Whole-window perplexity would score skipped tokens' own predictions, which are bad by design
(benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .flops import flops_ratio
from .routed import RoutedModel


@dataclass
class DenseReference:
    """Dense log-probs over the continuation positions, computed once per data set."""

    log_probs: torch.Tensor  # [N,c,V] float32
    nll: float  # mean over continuation tokens


@dataclass
class EvalResult:
    method: str
    ppl: float
    nll: float
    kl: float  # mean KL(dense || method) over continuation positions
    top1: float  # argmax agreement with dense
    flops: float  # analytic block FLOPs relative to dense
    sparsity: float  # achieved overall sparsity over prompt tokens
    windows: int
    seq_len: int
    cont_len: int
    ppl_ratio: float = float("nan")  # ppl / dense ppl

    def to_json(self) -> dict:
        return asdict(self)


def _continuation_logprobs(routed: RoutedModel, ids: torch.Tensor, n_cont: int, route: bool) -> torch.Tensor:
    """ids [B,L] -> log-probs [B,c,V] of the predictions for the last c tokens."""
    if route:
        out = routed(ids, n_tail=n_cont, num_logits=n_cont + 1)
    else:
        out = routed.dense_forward(ids, num_logits=n_cont + 1)
    logits = out.logits[:, :-1].float()  # [B,c,V]: position t predicts token t+1
    return F.log_softmax(logits, dim=-1)


def _nll(log_probs: torch.Tensor, ids: torch.Tensor, n_cont: int) -> torch.Tensor:
    """log_probs [B,c,V], ids [B,L] -> per-token NLL [B,c]."""
    targets = ids[:, -n_cont:]  # [B,c]
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def dense_reference(routed: RoutedModel, windows: torch.Tensor, n_cont: int, batch_size: int = 4,
                    progress: bool = True) -> DenseReference:
    parts, nlls = [], []
    for start in tqdm(range(0, len(windows), batch_size), desc="dense", disable=not progress, leave=False):
        ids = windows[start:start + batch_size]
        lp = _continuation_logprobs(routed, ids, n_cont, route=False)
        parts.append(lp)
        nlls.append(_nll(lp, ids, n_cont))
    return DenseReference(torch.cat(parts), torch.cat(nlls).mean().item())


@torch.no_grad()
def evaluate(routed: RoutedModel, windows: torch.Tensor, n_cont: int, dense: DenseReference, method: str = "routed",
             batch_size: int = 4, progress: bool = True) -> EvalResult:
    """Score `routed` on windows [N,L] against the dense reference."""
    n, seq = windows.shape
    if not 0 < n_cont < seq - 1:
        raise ValueError(f"continuation length {n_cont} must be in [1, {seq - 2}]")
    nlls, kls, agree = [], [], []
    for start in tqdm(range(0, n, batch_size), desc=method, disable=not progress, leave=False):
        ids = windows[start:start + batch_size]
        lp = _continuation_logprobs(routed, ids, n_cont, route=routed.router is not None or bool(routed.removed_layers))
        ref = dense.log_probs[start:start + batch_size]  # [B,c,V]
        nlls.append(_nll(lp, ids, n_cont))
        kls.append((ref.exp() * (ref - lp)).sum(-1))  # [B,c] KL(dense || routed)
        agree.append((ref.argmax(-1) == lp.argmax(-1)).float())
    nll = torch.cat(nlls).mean().item()
    schedule = routed.schedule if routed.router is not None else None
    cfg = routed.model.config
    window = routed.score_window if routed.router is not None and routed.router.needs_attention else 0
    ratio = flops_ratio(cfg, schedule, seq, n_cont, routed.kv_policy, window, routed.removed_layers)
    sparsity = schedule.overall(seq - n_cont) if schedule is not None else 0.0
    if routed.removed_layers:  # whole blocks skipped by every token
        sparsity = len(routed.removed_layers) / cfg.num_hidden_layers
    return EvalResult(method=method, ppl=math.exp(nll), nll=nll, kl=torch.cat(kls).mean().item(),
                      top1=torch.cat(agree).mean().item(), flops=ratio, sparsity=sparsity, windows=n,
                      seq_len=seq, cont_len=n_cont, ppl_ratio=math.exp(nll) / math.exp(dense.nll))


def dense_result(dense: DenseReference, seq: int, n_cont: int) -> EvalResult:
    """The dense row of a table, straight from the reference (no second forward pass)."""
    return EvalResult(method="dense", ppl=math.exp(dense.nll), nll=dense.nll, kl=0.0, top1=1.0, flops=1.0,
                      sparsity=0.0, windows=dense.log_probs.shape[0], seq_len=seq, cont_len=n_cont, ppl_ratio=1.0)
