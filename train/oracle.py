"""An oracle keep-set builder: how far is static routing from the best keep sets of the same size?

The oracle keeps, in every routed block, exactly the schedule's k_l tokens (the forced sink, the
prompt's last token and the scored continuation included), chosen WITH HINDSIGHT: it reads the
scored continuation and the dense model's predictions. It is an upper-bound reference for what a
router could reach, never a deployable router.

Method (first-order value with the key path, iterated and re-executed). Each (block, token) gets a
gate z in the routed model's own mask mode (`RoutedModel(mode="mask", ste=True)` with `ste_keys`):
the forward value is the hard keep mask, and the gradient of the continuation KL(dense || routed)
w.r.t. z reaches both the token's block update (query path: h + gate * delta) and its presence as
a key (attention with log z added to the key's logit, kv_policy=skip). z sits at 1 - eps for kept
and eps for skipped tokens, so d KL / d z is the exact derivative of that multiplicative gate near
the hard point (a skipped key's gradient would be zero at z = 0 exactly). v = -dKL/dz is the
first-order value of keeping a token; swapping a kept token for a skipped one in the same block
keeps k_l. First-order gains are badly off beyond a few swaps (see `oracle_keep`), so each round
ranks all blocks' swaps by predicted gain, re-executes the top 2 / 4 / 8 / 16 and accepts the best
by actual KL if it beats the current set.
`OracleRouter` hands the keep sets to `RoutedModel` as per-block scores, so the oracle runs
through the same block code as every router, and its keep sets are scored through the deployment
function (routed prefill of the prompt, cached decode of the continuation).

    python -m tokenskip.train.oracle --sparsity 0.3 --windows 16 --out docs/results/oracle-0.3.json
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tokenskip.routed import RoutedModel, block_keep_count, forced_tokens, keep_mask, routing_scores
from tokenskip.routers import RouteContext, Router
from tokenskip.schedule import Schedule

EPS = 1e-3  # gate of a skipped token (kept: 1 - EPS); small enough that the forward is the hard one's


class OracleRouter(Router):
    """Precomputed per-block scores for one batch, looked up by position: table[layer] is [B,L]
    over the whole window (higher = keep). A prefill of the first P tokens reads the first P
    columns, the one-pass form all L; the routed model forces sink, last and tail tokens itself."""

    def __init__(self, table: dict[int, Tensor]) -> None:
        super().__init__()
        self.table = table

    @classmethod
    def from_keep(cls, keep: Tensor, schedule: Schedule) -> "OracleRouter":
        """keep [NL,B,L] bool -> scores 1 (keep) / 0 (skip) for the routed blocks."""
        return cls({li: keep[li].float() for li in range(schedule.num_layers) if schedule.is_routed(li)})

    def scores(self, ctx: RouteContext) -> Tensor:
        return self.table[ctx.layer].gather(1, ctx.positions)  # [B,S]


def static_keep(schedule: Schedule, valid: Tensor, n_tail: int) -> Tensor:
    """[NL,B,S] bool keep sets of the static router (sink + recency) in the one-pass form; dense
    blocks keep everything. The same selection code as RoutedModel's mask mode."""
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0).float()  # [B,S]
    return select(schedule, pos.expand(schedule.num_layers, *valid.shape), valid, n_tail)


def select(schedule: Schedule, values: Tensor, valid: Tensor, n_tail: int) -> Tensor:
    """values [NL,B,S] -> [NL,B,S] bool: per routed block the k_l best tokens, forced ones first."""
    seq = valid.shape[1]
    forced = forced_tokens(valid, n_tail)
    out = torch.ones_like(values, dtype=torch.bool) & valid
    for li in range(schedule.num_layers):
        if schedule.is_routed(li):
            sel = routing_scores(values[li], valid, forced)  # [B,S]
            out[li] = keep_mask(sel, block_keep_count(schedule, li, seq, n_tail))[1].bool()
    return out


def routed_kl(rm: RoutedModel, ids: Tensor, ref: Tensor, n_cont: int) -> Tensor:
    """KL(dense || routed) per row [B] over the continuation, one-pass mask mode (rm.router set)."""
    out = rm(ids, n_tail=n_cont, mode="mask", ste=True, num_logits=n_cont + 1)
    lp = F.log_softmax(out.logits[:, :-1].float(), -1)  # [B,c,V] predictions of the continuation
    return (ref.exp() * (ref - lp)).sum(-1).mean(-1)


def gate_gradients(rm: RoutedModel, ids: Tensor, keep: Tensor, ref: Tensor, n_cont: int,
                   eps: float = EPS) -> tuple[Tensor, Tensor]:
    """(KL per row [B], dKL/dz [NL,B,S]) at the keep sets `keep` [NL,B,S]: gates on the query and
    the key path of every routed (block, token); dense blocks get zeros."""
    sched = rm.schedule
    z = {li: torch.where(keep[li], 1 - eps, eps).float().requires_grad_(True)
         for li in range(sched.num_layers) if sched.is_routed(li)}  # leaf gates [B,S]
    rm.router = OracleRouter({li: torch.logit(g) for li, g in z.items()})  # sigmoid(logit z) = z
    rm.ste_keys = True
    with torch.enable_grad():
        kl = routed_kl(rm, ids, ref, n_cont)
        kl.sum().backward()
    grad = torch.zeros(keep.shape, dtype=torch.float32)
    for li, g in z.items():
        grad[li] = g.grad
    return kl.detach(), grad


def ranked_swaps(schedule: Schedule, keep: Tensor, grad: Tensor, valid: Tensor, n_tail: int,
                 per_block: int = 64) -> list[tuple[float, int, int, int]]:
    """(predicted KL decrease, block, token out, token in) for one row's keep sets [NL,1,S], best
    first: per routed block the j-th worst kept token (value v = -dKL/dz) paired with the j-th
    best skipped one, while the pair pays to first order (at most `per_block` pairs a block).
    Forced tokens never move, so counts stay k_l."""
    free = valid[0] & ~forced_tokens(valid, n_tail)[0]  # [S] tokens the oracle decides
    v = -grad[:, 0]  # [NL,S]
    out = []
    for li in range(schedule.num_layers):
        if not schedule.is_routed(li):
            continue
        kept = torch.nonzero(free & keep[li, 0]).squeeze(-1)
        skipped = torch.nonzero(free & ~keep[li, 0]).squeeze(-1)
        lo = kept[torch.argsort(v[li, kept], stable=True)]  # worst kept first
        hi = skipped[torch.argsort(-v[li, skipped], stable=True)]  # best skipped first
        n = min(len(lo), len(hi), per_block)
        gain = (v[li, hi[:n]] - v[li, lo[:n]]).tolist()  # decreasing: a prefix pays
        out += [(g, li, int(o), int(i)) for g, o, i in zip(gain, lo[:n].tolist(), hi[:n].tolist()) if g > 0]
    return sorted(out, key=lambda t: (-t[0], t[1], t[2]))


def apply_swaps(keep: Tensor, swaps) -> Tensor:
    out = keep.clone()
    for _, li, old, new in swaps:
        out[li, 0, old], out[li, 0, new] = False, True
    return out


@torch.no_grad()
def batch_kl(model, schedule: Schedule, ids: Tensor, cands: list[Tensor], ref: Tensor, n_cont: int) -> list[float]:
    """Continuation KL of each candidate keep set [NL,1,L] for one window ids [1,L]: one batched
    gather-mode pass with the continuation force-kept (equal to prefill + decode for a router that
    reads nothing of the continuation, as here: docs/design.md, causality rule)."""
    keep = torch.cat(cands, 1)  # [NL,n,L]
    rm = RoutedModel(model, schedule, OracleRouter.from_keep(keep, schedule), kv_policy="skip")
    out = rm(ids.expand(keep.shape[1], -1), n_tail=n_cont, mode="gather", num_logits=n_cont + 1)
    lp = F.log_softmax(out.logits[:, :-1].float(), -1)  # [n,c,V]
    return (ref.exp() * (ref - lp)).sum(-1).mean(-1).tolist()


@dataclass
class OracleResult:
    keep: Tensor  # [NL,1,L] bool best keep sets found
    kl_start: float  # one-pass KL at the start keep sets
    kl: float  # one-pass KL at `keep`
    history: list[float] = field(default_factory=list)  # best KL after the start and each round
    swaps: list[int] = field(default_factory=list)  # swaps accepted per round (0: none paid)


STEPS = (2, 4, 8, 16)  # swaps tried per round, the best by actual KL kept


def oracle_keep(model, schedule: Schedule, ids: Tensor, ref: Tensor, n_cont: int, rounds: int = 2,
                steps: tuple[int, ...] = STEPS, eps: float = EPS) -> OracleResult:
    """Oracle keep sets for one window ids [1,L] given dense continuation log-probs ref [1,c,V].

    Starts from the static router's keep sets (sink + recency; mask mode always keeps exactly k_l,
    so an all-kept start is not expressible). Each round: the gradient at the best set (one
    forward + backward), then the top-n swaps by predicted gain, over all blocks, for each n in
    `steps`, re-executed (one batched forward); the best by actual KL is accepted if it beats the
    current one. First-order gains are far off for big steps (measured: predicted decreases of
    1-7 nats where the whole KL is 0.05, and one swap in every block doubling the KL), hence
    small global steps chosen by execution. The result is never worse than static."""
    valid = torch.ones_like(ids, dtype=torch.bool)
    rm = RoutedModel(model, schedule, None, kv_policy="skip")
    keep = static_keep(schedule, valid, n_tail=n_cont)
    kl, grad = gate_gradients(rm, ids, keep, ref, n_cont, eps)
    res = OracleResult(keep, float(kl[0]), float(kl[0]), [float(kl[0])], [])
    for r in range(rounds):
        swaps = ranked_swaps(schedule, res.keep, grad, valid, n_cont)
        ns = sorted({min(n, len(swaps)) for n in steps if swaps})
        cands = [apply_swaps(res.keep, swaps[:n]) for n in ns]
        kls = batch_kl(model, schedule, ids, cands, ref, n_cont) if cands else []
        best = min(range(len(kls)), key=kls.__getitem__, default=None)
        if best is None or kls[best] >= res.kl:
            res.swaps.append(0)
            break
        res.keep, res.kl = cands[best], kls[best]
        res.history.append(res.kl)
        res.swaps.append(ns[best])
        if r + 1 < rounds:
            grad = gate_gradients(rm, ids, res.keep, ref, n_cont, eps)[1]
    return res


# -- diagnostics: what a router would need to see --------------------------------------------------

def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def diagnostics(masks: list[np.ndarray], statics: list[np.ndarray], routed: list[int]) -> dict:
    """masks/statics: per window [NR,P] bool over the prompt (routed blocks only). Per block:
    keep rate in the first / middle / last third of the prompt and at positions 1-4 (sinks after
    the forced first token), Jaccard with static recency, and Jaccard with the previous routed
    block (static: 1; two random sets of the same size: f^2 / (2f - f^2), f the keep fraction)."""
    m, s = np.stack(masks), np.stack(statics)  # [N,NR,P]
    p = m.shape[-1]
    thirds = [slice(0, p // 3), slice(p // 3, 2 * p // 3), slice(2 * p // 3, p)]
    rate = [[float(m[:, j, t].mean()) for t in thirds] for j in range(m.shape[1])]
    early = [float(m[:, j, 1:5].mean()) for j in range(m.shape[1])]
    jac_static = [float(np.mean([jaccard(m[w, j], s[w, j]) for w in range(len(m))])) for j in range(m.shape[1])]
    jac_prev = [None] + [float(np.mean([jaccard(m[w, j], m[w, j - 1]) for w in range(len(m))]))
                         for j in range(1, m.shape[1])]
    f = float(m.mean())
    return {"blocks": routed, "keep_rate_thirds": rate, "keep_rate_pos1_4": early, "jaccard_static": jac_static,
            "jaccard_prev_block": jac_prev, "keep_fraction": f, "jaccard_random_same_size": f * f / (2 * f - f * f),
            "mean": {"keep_rate_thirds": np.mean(rate, 0).tolist(), "keep_rate_pos1_4": float(np.mean(early)),
                     "jaccard_static": float(np.mean(jac_static)),
                     "jaccard_prev_block": float(np.mean(jac_prev[1:])) if len(jac_prev) > 1 else None}}


def pack(mask: np.ndarray) -> str:
    """A bool vector as hex of np.packbits (big-endian bits): `unpack(hex, n)` reverses it."""
    return np.packbits(mask.astype(np.uint8)).tobytes().hex()


def unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


# -- the measurement: oracle vs static through the deployment function ----------------------------

def run(model, tokenizer, sparsity: float, n_windows: int, seq_len: int = 512, n_cont: int = 64, rounds: int = 2,
        seed: int = 0, split: str = "eval", progress: bool = True) -> dict:
    """Oracle keep sets per held-out window, then dense / static / oracle scored by
    `continuation_logprobs` (routed prefill of the prompt, cached decode of the continuation),
    uniform schedule, kv_policy=skip, paired bootstrap CIs; plus diagnostics and packed masks."""
    from tqdm.auto import tqdm

    from tokenskip import stats
    from tokenskip.evaluate import WindowScores, _describe, _result, compare, continuation_logprobs
    from tokenskip.routers import StaticRouter
    from tokenskip.train.common import deterministic, windows

    deterministic(seed)
    nl = model.config.num_hidden_layers
    sched = Schedule.uniform(nl, sparsity)
    ids = windows(tokenizer, split, None, seq_len, n_windows, seed)  # [N,L]
    dense = RoutedModel(model, sched, None, kv_policy="skip")
    static = RoutedModel(model, sched, StaticRouter(), kv_policy="skip")
    oracle = RoutedModel(model, sched, None, kv_policy="skip")
    routed = [li for li in range(nl) if sched.is_routed(li)]
    prompt = seq_len - n_cont
    sc = {name: WindowScores() for name in ("dense", "static", "oracle")}
    masks, statics, searches, packed = [], [], [], []
    bar = tqdm(range(len(ids)), desc=f"oracle @{sparsity:g}", disable=not progress)
    t0 = time.time()
    for w in bar:
        x = ids[w:w + 1]  # [1,L]
        with torch.no_grad():
            ref = continuation_logprobs(dense, x, n_cont)  # [1,c,V]
        res = oracle_keep(model, sched, x, ref, n_cont, rounds=rounds)
        oracle.router = OracleRouter.from_keep(res.keep, sched)
        with torch.no_grad():
            lps = {"dense": ref, "static": continuation_logprobs(static, x, n_cont),
                   "oracle": continuation_logprobs(oracle, x, n_cont)}
        for name, lp in lps.items():
            sc[name].add(lp, ref, x, n_cont)
        m = res.keep[routed, 0, :prompt].numpy()  # [NR,P] the prompt's keep sets
        masks.append(m)
        statics.append(static_keep(sched, torch.ones_like(x, dtype=torch.bool), n_cont)[routed, 0, :prompt].numpy())
        packed.append([pack(row) for row in m])
        searches.append({"kl_start": res.kl_start, "kl_best": res.kl, "history": res.history,
                         "swaps": res.swaps})
        bar.set_postfix(static=f"{sc['static'].kl[-1]:.4f}", oracle=f"{sc['oracle'].kl[-1]:.4f}")
    n = len(ids)
    idx = stats.resample_indices(n, seed=seed)
    rows = [_result("dense", sc["dense"], sc["dense"], 1.0, 0.0, seq_len, n_cont, idx)]
    for name, rm in (("static", static), ("oracle", oracle)):
        rows.append(_result(name, sc[name], sc["dense"], *_describe(rm, seq_len, n_cont), seq_len, n_cont, idx))
    diff = compare(rows[2], rows[1], seed=seed)
    top1 = stats.diff_ci(sc["oracle"].top1, sc["static"].top1, idx)
    diff.update(top1_diff=top1[0], top1_diff_ci=[top1[1], top1[2]])
    return {"config": {"model_type": model.config.model_type, "sparsity": sparsity, "schedule": list(sched.sparsity),
                       "kv_policy": "skip", "split": split, "windows": n, "seq_len": seq_len, "cont_len": n_cont,
                       "rounds": rounds, "steps": list(STEPS), "eps": EPS, "seed": seed, "seconds": round(time.time() - t0, 1)},
            "results": [r.to_json() for r in rows], "oracle_vs_static": diff, "search": searches,
            "diagnostics": diagnostics(masks, statics, routed),
            "masks": {"format": "per window, per routed block (config blocks order): hex of np.packbits of the "
                                "prompt's keep mask (train.oracle.unpack(hex, prompt_len))",
                      "blocks": routed, "prompt_len": prompt, "windows": packed}}


def _table(out: dict) -> str:
    lines = ["| method | KL [95% CI] | ppl ratio [95% CI] | top-1 [95% CI] | FLOPs |", "|---|---|---|---|---|"]
    for r in out["results"][1:]:
        lines.append(f"| {r['method']} | {r['kl']:.4f} [{r['kl_ci'][0]:.4f}, {r['kl_ci'][1]:.4f}] | "
                     f"{r['ppl_ratio']:.4f} [{r['ppl_ratio_ci'][0]:.4f}, {r['ppl_ratio_ci'][1]:.4f}] | "
                     f"{r['top1']:.3f} [{r['top1_ci'][0]:.3f}, {r['top1_ci'][1]:.3f}] | {r['flops']:.3f} |")
    d = out["oracle_vs_static"]
    lines.append(f"oracle - static: KL {d['kl_diff']:+.4f} [{d['kl_diff_ci'][0]:+.4f}, {d['kl_diff_ci'][1]:+.4f}], "
                 f"ppl ratio {d['ppl_ratio']:.4f} [{d['ppl_ratio_ci'][0]:.4f}, {d['ppl_ratio_ci'][1]:.4f}], "
                 f"top-1 {d['top1_diff']:+.4f} [{d['top1_diff_ci'][0]:+.4f}, {d['top1_diff_ci'][1]:+.4f}]")
    g = out["diagnostics"]["mean"]
    lines.append(f"oracle keep rate by prompt third {[round(v, 3) for v in g['keep_rate_thirds']]}, positions 1-4 "
                 f"{g['keep_rate_pos1_4']:.3f}; Jaccard with static {g['jaccard_static']:.3f}, with the previous "
                 f"block {g['jaccard_prev_block']:.3f} (random sets: "
                 f"{out['diagnostics']['jaccard_random_same_size']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from tokenskip.errors import UserError
    from tokenskip.models import DEFAULT_MODEL, load_model
    from tokenskip.schedule import check_sparsity

    ap = argparse.ArgumentParser(prog="python -m tokenskip.train.oracle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="built-in name or local Hugging Face folder")
    ap.add_argument("--sparsity", type=float, required=True, help="overall sparsity (uniform schedule)")
    ap.add_argument("--windows", type=int, default=16, help="held-out eval windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--cont-len", type=int, default=64, help="scored continuation (force-kept) tokens")
    ap.add_argument("--rounds", type=int, default=2, help="gradient + line-search rounds per window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        check_sparsity(a.sparsity)
        if a.windows < 2:
            raise UserError(f"--windows {a.windows}: need at least 2 for bootstrap CIs")
        if not 0 < a.cont_len < a.seq_len - 2:
            raise UserError(f"--cont-len {a.cont_len}: must be in [1, {a.seq_len - 3}]")
        lm = load_model(a.model)
        out = run(lm.model, lm.tokenizer, a.sparsity, a.windows, a.seq_len, a.cont_len, a.rounds, a.seed,
                  progress=not a.no_progress)
    except UserError as exc:
        raise SystemExit(f"error: {exc.message}") from None
    out["config"]["model"] = a.model
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(_table(out))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
