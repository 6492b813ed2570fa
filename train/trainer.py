"""Router training with the LLM frozen (method.md section 3).

Forward: the routed model in mask mode with hard top-k keep masks exactly as at inference (skipped
keys masked when kv_policy=skip); gradients reach the shared LearnedRouter through the straight-
through gate hard + sigmoid(logit) - sigmoid(logit).detach() (core/routed.py).

Loss = w_g(t) * guide + w_s * sparsity + w_d * distillation, equal weights (1, 1, 1) by default:
- guide: BCE(sigmoid(logit), static router's keep mask) over the routable tokens of every routed
  block (forced tokens excluded: they are kept whatever the score); w_g decays linearly to 0;
- sparsity: sum over routed blocks of relu(s_l - achieved_l), achieved_l = mean over routable tokens
  of 1 - sigmoid(logit) (FTP Eq. 5, one-sided: hard top-k cannot over-prune);
- distillation: KL(dense || routed) at T=1 on the continuation positions, the positions evaluation
  scores (the last c tokens of each window run every block, as in decoding).

Determinism and resume: the data order is a function of (seed, step) only (a per-epoch permutation
from a generator seeded by (seed, epoch)), the learning-rate and guide-weight schedules are functions
of the step, and there is no other randomness, so a run resumed from a checkpoint takes exactly the
steps an uninterrupted run takes. Checkpoints hold router + AdamW state tensors as safetensors and
the scalars as JSON (no pickle anywhere).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokenskip.errors import UserError
from tokenskip.fileio import load_safetensors, read_json, save_safetensors_atomic, write_json_atomic
from tokenskip.precision import autocast, dtype_name, model_device, model_dtype
from tokenskip.routed import (DEFAULT_WINDOW, RoutedModel, block_keep_count, default_positions, forced_tokens, keep_mask,
                              routing_scores)
from tokenskip.routers import LearnedRouter, RouteContext, StaticRouter, router_features
from tokenskip.schedule import Schedule

from .common import deterministic
from .distributed import SINGLE, Dist

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_JSON = "checkpoint.json"


@dataclass
class TrainSettings:
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 4
    seq_len: int = 256
    cont_len: int = 32
    windows: int = 64  # training windows (the data order cycles over them)
    seed: int = 0
    kv_policy: str = "skip"
    guide_weight: float = 1.0  # w_g at step 0, decays linearly to 0 at the last step
    sparsity_weight: float = 1.0
    distill_weight: float = 1.0
    warmup: int = 10  # linear LR warm-up steps, then cosine to 10%
    checkpoint_every: int = 25
    calib_windows: int = 8  # windows of the calibration split for feature standardisation
    ste_temperature: float = 0.0  # 0: STE through sigmoid(logit); > 0: centred on the top-k threshold
    score_window: int = DEFAULT_WINDOW  # query rows of the attention-score feature (a router input)
    ste_keys: bool = False  # kv_policy=skip: straight-through gradient over the key mask as well
    init: str = "static"  # a fresh router starts as the static router ("static") or at random ("random")
    # extra attention sinks (first fraction f of the positions) tried for the static start; the
    # candidate with the lowest calibration KL starts training (needs validate_every > 0)
    sink_candidates: tuple[float, ...] = (0.0,)
    validate_every: int = 0  # > 0: KL on the calibration windows (deployment function) every N steps;
    #                          the router with the lowest one is the result

    def check(self) -> None:
        if self.steps < 1:
            raise UserError(f"--steps {self.steps}: must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr {self.lr}: must be a positive number")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be >= 1")
        if not (self.ste_temperature >= 0 and math.isfinite(self.ste_temperature)):
            raise UserError(f"--ste-temperature {self.ste_temperature}: must be >= 0 (0 = plain sigmoid)")
        if self.validate_every < 0:
            raise UserError(f"--validate-every {self.validate_every}: must be >= 0")
        if not self.sink_candidates or any(not 0.0 <= f < 0.5 for f in self.sink_candidates):
            raise UserError(f"--sink-candidates {self.sink_candidates}: fractions in [0, 0.5)")
        if self.init not in ("static", "random"):
            raise UserError(f"--init-router {self.init}: choose static or random")
        if self.score_window < 1:
            raise UserError(f"--score-window {self.score_window}: must be >= 1")
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every {self.checkpoint_every}: must be >= 1")


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_kl: float = float("inf")  # lowest validation KL so far, and the router that had it
    best_step: int = -1
    best: dict | None = None
    sinks: dict | None = None  # the extra-sink candidates tried for the start, and the one chosen


# -- schedules of the step ----------------------------------------------------------------------------

def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - s.warmup) / span))))


def guide_weight_at(step: int, s: TrainSettings) -> float:
    return s.guide_weight * max(0.0, 1.0 - step / max(1, s.steps - 1))


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Window indices of a step: a function of (seed, step) only, so resuming is exact."""
    out = []
    for j in range(batch):
        flat = step * batch + j
        epoch, pos = divmod(flat, n)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=gen)[pos]))
    return torch.tensor(out, dtype=torch.long)


# -- feature standardisation ---------------------------------------------------------------------------

class _FeatureRecorder(StaticRouter):
    """Routes as the static router (the guide target) while recording the learned router's
    features of the routable tokens, for the feature mean/std."""

    needs_attention = True

    def __init__(self, n_tail: int) -> None:
        super().__init__()
        self.n_tail = n_tail
        self.rows: list[torch.Tensor] = []

    def scores(self, ctx: RouteContext) -> torch.Tensor:
        feats = router_features(ctx)  # [B,S,4]
        routable = ctx.valid & ~forced_tokens(ctx.valid, 0)  # [B,S] (ctx.valid is already the prompt part)
        self.rows.append(feats[routable])  # [n,4]
        return super().scores(ctx)


@torch.no_grad()
def standardise_features(router: LearnedRouter, model, schedule: Schedule, calib: torch.Tensor, cont_len: int,
                         kv_policy: str, batch_size: int = 4, score_window: int = DEFAULT_WINDOW) -> None:
    """Set router.feature_mean/std from one static-routed pass over calibration windows."""
    rec = _FeatureRecorder(cont_len)
    routed = RoutedModel(model, schedule, rec, kv_policy=kv_policy, score_window=score_window)
    for start in range(0, len(calib), batch_size):
        routed(calib[start:start + batch_size], n_tail=cont_len, num_logits=1)
    if not rec.rows:
        return  # no routed block: nothing to standardise
    feats = torch.cat(rec.rows).double()  # [n,4]
    mean, std = feats.mean(0), feats.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant feature (e.g. s_l) stays unscaled
    router.feature_mean.copy_(mean.float())
    router.feature_std.copy_(std.float())


# -- losses ----------------------------------------------------------------------------------------------

def static_keep_mask(schedule: Schedule, layer: int, valid: torch.Tensor, positions: torch.Tensor,
                     forced: torch.Tensor, n_tail: int) -> torch.Tensor:
    """[B,S] float: the static router's hard keep mask for a block (the guide target), selected
    exactly as the routed model selects."""
    ctx = RouteContext(layer=layer, sparsity=schedule.sparsity[layer], positions=positions, valid=valid, attn=None)
    sel = routing_scores(StaticRouter().scores(ctx), valid, forced)  # [B,S]
    return keep_mask(sel, block_keep_count(schedule, layer, valid.shape[1], n_tail))[1]


def router_losses(routed: RoutedModel, ids: torch.Tensor, dense_logp: torch.Tensor, cont_len: int,
                  ste_temperature: float = 0.0, mean=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(guide, sparsity, distill, achieved hard sparsity) for one batch ids [B,L].

    `mean(total, count)` turns a sum over this batch's items into their mean; with several
    processes it is Dist.global_mean, so every term is the mean over the global batch."""
    mean = mean or (lambda total, count: total / count)
    out = routed(ids, n_tail=cont_len, mode="mask", trace=True, ste=ste_temperature or True,
                 num_logits=cont_len + 1)
    logp = F.log_softmax(out.logits[:, :-1].float(), dim=-1)  # [B,c,V]
    kl_tok = (dense_logp.exp() * (dense_logp - logp)).sum(-1)  # [B,c]
    distill = mean(kl_tok.sum(), kl_tok.numel())
    valid = torch.ones_like(ids, dtype=torch.bool)
    positions = default_positions(valid)  # [B,S]
    forced = forced_tokens(valid, cont_len)
    routable = (valid & ~forced).float()  # [B,S]
    denom = routable.sum().clamp(min=1)
    guides, sparse, hard_skip, blocks = [], [], 0.0, 0
    for li, tr in enumerate(out.traces):
        if tr.logits is None:  # not a routed block
            continue
        prob = torch.sigmoid(tr.logits.float())  # [B,S]
        target = static_keep_mask(routed.schedule, li, valid, positions, forced, cont_len)
        bce = F.binary_cross_entropy_with_logits(tr.logits.float(), target, reduction="none")
        guides.append(mean((bce * routable).sum(), denom))
        achieved = mean(((1 - prob) * routable).sum(), denom)
        sparse.append(F.relu(routed.schedule.sparsity[li] - achieved))
        hard_skip += float(mean(((~tr.keep_mask).float() * routable).sum(), denom))
        blocks += 1
    zero = distill.new_zeros(())
    guide = torch.stack(guides).mean() if guides else zero
    sparsity = torch.stack(sparse).sum() if sparse else zero
    achieved_overall = hard_skip / routed.schedule.num_layers
    return guide, sparsity, distill, achieved_overall


# -- checkpoints ------------------------------------------------------------------------------------------

def _identity(settings: TrainSettings, schedule: Schedule, model_name: str, dtype: str = "fp32") -> dict:
    """What must match for a checkpoint to be resumed (anything else would change the result).
    The number of processes may change: it changes only float rounding (docs/gpu.md)."""
    d = asdict(settings)
    d.pop("checkpoint_every")
    return {"settings": d, "schedule": list(schedule.sparsity), "model": model_name, "dtype": dtype}


def save_checkpoint(ckpt_dir: Path, router: LearnedRouter, opt: torch.optim.Optimizer, state: TrainState,
                    identity: dict, scaler=None) -> None:
    tensors = {f"router.{k}": v for k, v in router.state_dict().items()}
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        for name, value in opt.state.get(p, {}).items():
            tensors[f"optim.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    for k, v in (state.best or {}).items():
        tensors[f"best.{k}"] = v
    name = f"state-{state.step:07d}.safetensors"
    save_safetensors_atomic(tensors, ckpt_dir / name, metadata={"step": str(state.step)})
    write_json_atomic(ckpt_dir / CHECKPOINT_JSON, {"step": state.step, "file": name, "identity": identity,
                                                   "history": state.history, "best_kl": state.best_kl,
                                                   "best_step": state.best_step, "start": state.sinks,
                                                   **({"scaler": scaler.state_dict()} if scaler is not None else {})})
    for old in ckpt_dir.glob("state-*.safetensors"):  # only the newest is needed
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(ckpt_dir: Path, router: LearnedRouter, opt: torch.optim.Optimizer, identity: dict,
                    scaler=None) -> TrainState | None:
    meta_path = ckpt_dir / CHECKPOINT_JSON
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path, "checkpoint")
    if meta.get("identity") != json.loads(json.dumps(identity)):
        raise UserError(f"checkpoint {ckpt_dir} was made with other settings (schedule, model, dtype, steps, lr, "
                        "seed, ...); rerun with the same options or pass --no-resume to start over")
    tensors = load_safetensors(ckpt_dir / meta["file"], "checkpoint weights")
    router.load_state_dict({k[len("router."):]: v for k, v in tensors.items() if k.startswith("router.")})
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
        if st:  # AdamW keeps `step` on the CPU, the moments beside the parameter
            opt.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in st.items()}
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")} or None
    if scaler is not None and "scaler" in meta:
        scaler.load_state_dict(meta["scaler"])
    return TrainState(step=int(meta["step"]), history=list(meta.get("history", [])),
                      best_kl=float(meta.get("best_kl", float("inf"))), best_step=int(meta.get("best_step", -1)),
                      best=best, sinks=meta.get("start"))


# -- the loop ---------------------------------------------------------------------------------------------

def train_router(model, schedule: Schedule, train_ids: torch.Tensor, calib_ids: torch.Tensor, settings: TrainSettings,
                 out_dir: str | Path, model_name: str = "", resume: bool = True, init_router: LearnedRouter | None = None,
                 progress: bool = True, stop_after: int | None = None, dist: Dist | None = None) -> LearnedRouter:
    """Train the shared router on windows train_ids [N,L]; writes out_dir/{tokenskip.json,router.safetensors}.

    Runs where the model is, in its dtype (bf16/fp16 under autocast, the router and AdamW state in
    fp32, a GradScaler for fp16). `dist` (tokenskip.train.distributed) splits each step's global
    batch over processes; only rank 0 writes. `stop_after` stops (as an interruption would) after
    that many steps of this call, for tests.
    """
    from tokenskip.config import RoutingConfig, save_routing
    from tokenskip.evaluate import continuation_logprobs

    settings.check()
    if schedule.num_layers != model.config.num_hidden_layers:
        raise UserError(f"schedule has {schedule.num_layers} blocks but the model has {model.config.num_hidden_layers}")
    if not any(schedule.is_routed(i) for i in range(schedule.num_layers)):
        raise UserError("the schedule routes no block (all sparsities are 0): nothing to train")
    dist = dist or SINGLE
    if settings.batch_size < dist.world:
        raise UserError(f"--batch-size {settings.batch_size}: the global batch must hold at least one window "
                        f"per process ({dist.world} processes)")
    progress = progress and dist.is_main
    device, dtype = model_device(model), model_dtype(model)
    train_ids, calib_ids = train_ids.to(device), calib_ids.to(device)
    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    deterministic(settings.seed)
    router = LearnedRouter().to(device)  # fp32 whatever the LLM's dtype
    if init_router is not None:
        router.load_state_dict(init_router.state_dict())
    else:
        standardise_features(router, model, schedule, calib_ids, settings.cont_len, settings.kv_policy,
                             score_window=settings.score_window)
        if settings.init == "static":
            router.init_as_static(seed=settings.seed)
    dist.broadcast_module(router)  # every process starts from rank 0's router, as DDP does
    opt = torch.optim.AdamW(router.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None  # fp16 gradients underflow
    identity = _identity(settings, schedule, model_name, dtype_name(dtype))
    state = None
    if resume:
        state = dist.resume_on_main(lambda: load_checkpoint(ckpt_dir, router, opt, identity, scaler), router, opt,
                                    scaler)
    elif ckpt_dir.exists() and dist.is_main:
        for f in ckpt_dir.iterdir():
            f.unlink()
    state = state or TrainState()
    routed = RoutedModel(model, schedule, router, kv_policy=settings.kv_policy, score_window=settings.score_window)
    routed.ste_keys = settings.ste_keys
    base = RoutedModel(model, Schedule.dense(schedule.num_layers), None, kv_policy=settings.kv_policy)
    n = train_ids.shape[0]
    cache: dict[int, torch.Tensor] = {}

    def teacher(i: int) -> torch.Tensor:
        """Dense continuation log-probs of window i [c,V], computed once, one window at a time (so
        the values never depend on which windows shared a batch: resuming stays exact)."""
        if i not in cache:
            with torch.no_grad():
                cache[i] = continuation_logprobs(base, train_ids[i:i + 1], settings.cont_len)[0]
        return cache[i]

    validate = None
    if settings.validate_every > 0:
        from tokenskip.evaluate import dense_reference, evaluate

        mine = calib_ids[dist.share(len(calib_ids))]  # this process's share of the calibration windows
        ref = dense_reference(base, mine, settings.cont_len, progress=False) if len(mine) else None

        def val_kl() -> float:
            return dist.window_mean(len(calib_ids), lambda sl: evaluate(routed, calib_ids[sl], settings.cont_len, ref,
                                                                         "val", progress=False).per_window["kl"])

        def validate() -> None:
            """KL to dense on the calibration windows, as deployment computes it; keep the best."""
            kl = val_kl()
            if state.step == 0:  # the starting router (static-initialised: the static router's KL)
                state.history.append({"step": 0, "val_kl": round(kl, 6)})
            elif state.history and state.history[-1]["step"] == state.step:
                state.history[-1]["val_kl"] = round(kl, 6)
            if kl < state.best_kl:
                state.best_kl, state.best_step = kl, state.step
                state.best = {k: v.detach().clone() for k, v in router.state_dict().items()}

        if state.step == 0:
            if init_router is None and settings.init == "static" and len(settings.sink_candidates) > 1:
                tried = {}
                for f in settings.sink_candidates:  # the start: static, or static with extra sinks
                    router.init_as_static(seed=settings.seed, sinks=f)
                    tried[f] = val_kl()
                best = min(settings.sink_candidates, key=lambda f: (tried[f], f))
                router.init_as_static(seed=settings.seed, sinks=best)
                state.sinks = {"chosen": best, "val_kl": {str(f): round(v, 6) for f, v in tried.items()}}
            validate()
    bar = tqdm(total=settings.steps, initial=state.step, desc="train router", disable=not progress, leave=False)
    done_here = 0
    router.train()
    while state.step < settings.steps:
        step = state.step
        idx = batch_indices(step, n, settings.batch_size, settings.seed)[dist.share(settings.batch_size)]
        ids = train_ids[idx.to(device)]  # [b,L] this process's share of the global batch
        dense_logp = torch.stack([teacher(i) for i in idx.tolist()])  # [b,c,V]
        with autocast(device, dtype):
            guide, sparse, distill, achieved = router_losses(routed, ids, dense_logp, settings.cont_len,
                                                             settings.ste_temperature, mean=dist.global_mean)
            wg = guide_weight_at(step, settings)
            loss = wg * guide + settings.sparsity_weight * sparse + settings.distill_weight * distill
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        opt.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        dist.sum_gradients(router.parameters())  # the global batch's gradient on every process
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        rec = {"step": step + 1, "loss": float(loss.detach()), "guide": float(guide.detach()),
               "sparsity_loss": float(sparse.detach()), "kl": float(distill.detach()), "achieved": achieved}
        state.history.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()})
        state.step += 1
        done_here += 1
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", kl=f"{rec['kl']:.3f}", guide=f"{rec['guide']:.3f}",
                        sparsity=f"{achieved:.3f}")
        if validate is not None and (state.step % settings.validate_every == 0 or state.step == settings.steps):
            validate()
        if (state.step % settings.checkpoint_every == 0 or state.step == settings.steps) and dist.is_main:
            save_checkpoint(ckpt_dir, router, opt, state, identity, scaler)
        if stop_after is not None and done_here >= stop_after and state.step < settings.steps:
            bar.close()
            raise KeyboardInterrupt(f"stopped after {done_here} steps (test hook)")
    bar.close()
    router.eval()
    if state.best is not None:  # ship the router that validated best (step 0 = the starting router)
        router.load_state_dict(state.best)
    dist.check_same(router, "the trained router")
    cfg = RoutingConfig(model=model_name, num_layers=schedule.num_layers, router="learned",
                        schedule=list(schedule.sparsity), kv_policy=settings.kv_policy, seed=settings.seed,
                        score_window=settings.score_window,
                        model_type=model.config.model_type, hidden_size=model.config.hidden_size,
                        extra={"training": {**asdict(settings), "dtype": dtype_name(dtype),
                                            "final": state.history[-1] if state.history else {},
                                            "best_step": state.best_step, "start": state.sinks,
                                            "best_val_kl": None if state.best is None else state.best_kl},
                               "schedule_meta": {k: v for k, v in schedule.meta.items() if k != "history"}})
    if dist.is_main:
        save_routing(out, cfg, router)
        write_json_atomic(out / "train_history.json", {"history": state.history})
    dist.barrier()
    return router
