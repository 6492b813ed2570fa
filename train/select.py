"""Train the learned one-selection router (`tokenskip train-select`, routers.SelectRouter).

What it learns: which tokens of a long prompt the question needs, read from the question's
attention at the selection layer (gemfilter's table). The labels are free: long-prompt examples
built from the TRAIN split of the built-in data (train/longctx_tasks.py generators; the evaluation
draws the eval split and the news corpus) know their answer and the span of their evidence. The
label is the answer's own tokens inside the evidence and the LEAD tokens before them: what greedy
decoding copies, and the context its copying matches on. (Labelling the whole evidence sentence
spent the ranking on words the answer does not need: at 0.4 the router kept the answer of 0.83 of
the validation questions, against 0.94 with answer labels; docs/training.md 8.9.) The router's
learned part ranks the tokens outside the recent share, and the top `k` of them are kept (k = the
block's budget less the recent share and the sink). Two losses act on that ranking; train-select
fits both and `choose` ships one:

- listwise: -log softmax(SCALE * score)_e over the candidates, averaged over the label tokens e.
  It raises the AVERAGE label probability; its learned recency tilt helps most examples and costs
  the earliest answers (at 0.4 the first fifth of depth kept 0.4 of its validation answers).
- cut: softplus(SCALE * (t_k - score_e + MARGIN)), t_k the k-th largest candidate score. It acts on
  the top-k decision itself: a label well inside the keep set costs nothing, one near or below the
  cut pushes itself up and the tokens at the cut down (first fifth at 0.4: 1.0). It keeps more
  answers where the budget is tight and spends the slots on old tokens, which costs continuation
  KL where the budget is loose (docs/training.md 8.9).

Both act on the ranking, not on a scale or a bias that top-k ignores (issue 20's complaint about the
four-feature router's sparsity and guide terms), and both push up EVERY label token, as the top-k
must keep all of them (a log of the summed label probability is satisfied by one token far ahead:
measured, it kept less evidence than the start).

Everything before the first routed block is dense, so the table each example gives is computed once
(`RoutedModel.forward(until_routed=True)`: the dense half of the model) and the fit runs on those
tables alone: seconds, deterministic under the seed. Router selection: the start (gemfilter's rule)
and the trained router are compared on validation examples from the CALIB split (disjoint from
training and evaluation text); the one that keeps more of the answers ships. Last, the per-block
sparsities after the selection block are searched with that router (search_after, FTP's genetic
search on calib windows of their own), which trades evenly spread skipping for a shape that
costs less continuation KL at the same FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokenskip.errors import UserError
from tokenskip.schedule import check_sparsity

from .longctx_tasks import TASKS, check_request, find_sub

EARLY_FRACTION = 0.27  # the earlier candidate selection depth (8 of smollm2-135m's 30 blocks)
SCALE = 4.0  # logit scale of both losses (the learned scores are log-attention sized)
MARGIN = 1.0  # how far inside the cut a label token must rank before it costs nothing
LEAD = 2  # label tokens before the answer: the context its copying matches on


@dataclass(frozen=True)
class SelectSettings:
    sparsity: float = 0.3
    examples: int = 24  # per task and length, training; validation uses a third of it
    lengths: tuple[int, ...] = (256, 512, 1024)
    tasks: tuple[str, ...] = TASKS
    steps: int = 150
    lr: float = 0.05
    seed: int = 0
    kv_policy: str = "skip"
    select_layer: int | None = None  # first routed block; None = try both candidate_layers
    losses: tuple[str, ...] = ("listwise", "cut")  # each trained at each depth; `choose` ships one
    kl_windows: int = 8  # calibration windows (split calib) scoring each candidate's continuation KL
    kl_len: int = 512  # their length; the last 64 tokens (an eighth for short ones) are the continuation
    # the schedule after the selection block, searched with the shipped router (search_after)
    search_generations: int = 5  # 0: the flat select_after schedule ships
    search_population: int = 12
    search_windows: int = 12  # calib windows of kl_len the search's fitness reads (after the kl_windows)

    def check(self, max_len: int | None = None, num_layers: int | None = None) -> None:
        check_sparsity(self.sparsity)
        if self.select_layer is not None and (self.select_layer < 1 or
                                              (num_layers is not None and self.select_layer >= num_layers)):
            raise UserError(f"--select-layer {self.select_layer}: must be in [1, {num_layers or 'the block count'})")
        check_request(list(self.tasks), list(self.lengths), self.examples, max_len)
        bad = [name for name in self.losses if name not in ("listwise", "cut")]
        if bad or not self.losses:
            raise UserError(f"--losses {','.join(self.losses)}: choose one or more of listwise, cut")
        if self.steps < 0:
            raise UserError(f"--steps {self.steps}: must be >= 0")
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr}: must be > 0")
        if self.kl_windows < 1 or self.kl_len < 16 or (max_len is not None and self.kl_len > max_len):
            raise UserError(f"calibration windows {self.kl_windows} x {self.kl_len} tokens: need >= 1 window "
                            f"of 16..{max_len or 'the context'} tokens")
        if self.search_generations < 0:
            raise UserError(f"--search-generations {self.search_generations}: must be >= 0")
        if self.search_generations and (self.search_population < 2 or self.search_windows < 1):
            raise UserError(f"--search-population {self.search_population} / --search-windows "
                            f"{self.search_windows}: need >= 2 schedules and >= 1 window to search")


# By fit budget (the pipeline's --budget; the CLI's defaults are "default"): examples per task and
# length, lengths, steps, calibration KL windows, their length, and the schedule search's
# generations, population and windows. 256-token prompts are in the mix so that short prompts are
# ranked as the long ones are: without them article_qa at 256 tokens read 0.74x dense at 0.3, with
# them 0.84x, nothing lost at 512 (docs/training.md 8.10). The pipeline's "small" leaves the search
# out (about 6 minutes on 2 CPU cores; the pipeline stays within its 20).
BUDGETS = {"tiny": (2, (256,), 5, 2, 64, 1, 2, 1), "small": (16, (256, 512, 1024), 150, 8, 512, 0, 12, 12),
           "default": (24, (256, 512, 1024), 150, 8, 512, 5, 12, 12)}


def settings_for(budget: str, sparsity: float, seed: int = 0, kv_policy: str = "skip") -> SelectSettings:
    examples, lengths, steps, kl_windows, kl_len, generations, population, search_windows = BUDGETS[budget]
    return SelectSettings(sparsity=sparsity, examples=examples, lengths=lengths, steps=steps, seed=seed,
                          kv_policy=kv_policy, kl_windows=kl_windows, kl_len=kl_len,
                          search_generations=generations, search_population=population,
                          search_windows=search_windows)


def done_before(out_dir: str | Path, settings: SelectSettings, model_name: str) -> bool:
    """Whether `out_dir` holds a select router trained with exactly these settings (a rerun reuses it)."""
    from tokenskip.fileio import read_json

    out = Path(out_dir)
    if not (out / "tokenskip.json").is_file() or not (out / "select.json").is_file():
        return False
    try:
        rec = read_json(out / "select.json", "select.json")
    except UserError:
        return False
    return rec.get("model") == model_name and rec.get("settings") == _settings_json(settings)


def _settings_json(settings: SelectSettings) -> dict:
    return {**asdict(settings), "lengths": list(settings.lengths), "tasks": list(settings.tasks),
            "losses": list(settings.losses)}


@dataclass
class Item:
    """One example as the router sees it at the selection layer."""

    table: torch.Tensor  # [S] float32 the attention-score table the first routed block reads
    positions: torch.Tensor  # [S] int64
    candidates: torch.Tensor  # [S] bool: tokens the learned part ranks (not the sink, not the recent share)
    target: torch.Tensor  # [S] bool: the label (answer_span), within the candidates
    keep: int  # tokens the first routed block keeps


def _examples(tokenizer, split: str, settings: SelectSettings, n: int, seed: int):
    from tokenskip.data import load_split

    from .longctx_tasks import make_examples

    text = load_split(split)
    return make_examples(tokenizer, list(settings.tasks), list(settings.lengths), n, seed, wiki=text, news=text)


def answer_span(ex) -> tuple[int, int]:
    """[start, end) of the label in ex.prompt: the answer's tokens where they stand inside the
    evidence, and the LEAD tokens before. A tokenizer that splits the answer differently in context
    (none of the built-in tasks does with smollm2's) gets the whole evidence span instead."""
    at = find_sub(ex.prompt[ex.evidence[0]:ex.evidence[1]], ex.answer)
    if not at:
        return ex.evidence[0], ex.evidence[1]
    start = ex.evidence[0] + at[0]
    return max(0, start - LEAD), start + len(ex.answer)


@torch.no_grad()
def selection_items(routed, examples, progress: bool = False, desc: str = "selection tables") -> list[Item]:
    """Each example's table, candidates and label (answer_span) at the first routed block (dense
    prefix only)."""
    from tokenskip.precision import model_device
    from tokenskip.routers import recent_share
    from tokenskip.selection import block_keep_count

    router, sched = routed.router, routed.schedule
    first = sched.first_routed
    device = model_device(routed.model)
    items = []
    for ex in tqdm(examples, desc=desc, disable=not progress, leave=False):
        ids = torch.tensor([ex.prompt], device=device)  # [1,S]
        table = routed(ids, until_routed=True).table[0].float().cpu()  # [S]
        seq = table.shape[0]
        positions = torch.arange(seq)
        recent = recent_share(positions.float() / max(seq - 1, 1), router.recent, sched.sparsity[first])  # [S]
        candidates = ~recent & (positions > 0)
        target = torch.zeros(seq, dtype=torch.bool)
        start, end = answer_span(ex)
        target[start:end] = True
        items.append(Item(table, positions, candidates, target & candidates, block_keep_count(sched, first, seq, 0)))
    return items


def listwise_loss(router, items: list[Item]) -> torch.Tensor:
    """Mean over the examples with a label among the candidates of the mean over their label
    tokens of -log softmax(SCALE * learned score) over the candidates."""
    losses = []
    for it in items:
        if not it.target.any():
            continue  # the label is in the recent share: kept whatever the router learns
        valid = torch.ones_like(it.candidates)
        score = router.learned_scores(it.table[None], valid[None], it.positions[None])[0]  # [S]
        logp = torch.log_softmax(SCALE * score[it.candidates], 0)  # [C]
        losses.append(-logp[it.target[it.candidates]].mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def learned_slots(it: Item) -> int:
    """How many candidates the first routed block keeps: its budget less the tokens kept whatever
    the scores say (the recent share and the sink; the last token is in the recent share)."""
    return it.keep - (it.candidates.numel() - int(it.candidates.sum()))


def cut_loss(router, items: list[Item]) -> torch.Tensor:
    """Mean over the examples with a label among the candidates of the mean over their label
    tokens of softplus(SCALE * (t_k - score + MARGIN)), t_k the k-th largest candidate score
    (k = learned_slots): zero for labels well inside the keep set, the gradient at the cut."""
    losses = []
    for it in items:
        k = learned_slots(it)
        if not it.target.any() or k < 1:
            continue  # the label is in the recent share (kept whatever the router learns), or no slot to win
        valid = torch.ones_like(it.candidates)
        score = router.learned_scores(it.table[None], valid[None], it.positions[None])[0]  # [S]
        cand = score[it.candidates]  # [C]
        cut = torch.topk(cand, min(k, cand.numel())).values[-1]  # t_k: the last kept candidate's score
        losses.append(F.softplus(SCALE * (cut - cand[it.target[it.candidates]] + MARGIN)).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


@torch.no_grad()
def answer_kept(router, items: list[Item], sparsity: float) -> float:
    """Mean fraction of each example's label tokens (the answer and its lead-in, answer_span) the
    first routed block keeps, ranked by the router's full rule (recent share, forced sink and last
    token, top-k): what deployment keeps. Examples whose label is all in the recent share count
    not (kept whatever the router does)."""
    from tokenskip.routers import RouteContext
    from tokenskip.selection import forced_tokens, routing_scores

    fractions = []
    for it in items:
        seq = it.table.shape[0]
        valid = torch.ones(1, seq, dtype=torch.bool)
        ctx = RouteContext(layer=0, sparsity=sparsity, positions=it.positions[None], valid=valid, attn=it.table[None])
        sel = routing_scores(router.scores(ctx), valid, forced_tokens(valid, 0))[0]  # [S]
        kept = torch.zeros(seq, dtype=torch.bool)
        kept[torch.topk(sel, it.keep).indices] = True
        full = int(it.target.sum())  # label in the candidates (the recent share's is kept anyway)
        if full:
            fractions.append(float((kept & it.target).sum()) / full)
    return sum(fractions) / max(len(fractions), 1)


def candidate_layers(num_layers: int, sparsity: float, select_layer: int | None = None) -> list[int]:
    """The first routed blocks train-select tries, latest first: `select_layer` when given, else
    half the depth (gemfilter's; the question's attention is sharpest there in smollm2-135m) and
    EARLY_FRACTION of it. At 0.4 the blocks after the middle would skip >90% each and the selection
    collapses; from an earlier layer more blocks share the budget, and of first routed blocks
    6/8/9/10/12 of smollm2's 30, 8 kept the most evidence (docs/training.md 8.7). Those whose schedule
    cannot hold `sparsity` are left out; none left is the user's error."""
    from tokenskip.schedule import Schedule

    layers = [select_layer] if select_layer is not None else sorted(
        {num_layers // 2, max(1, round(EARLY_FRACTION * num_layers))}, reverse=True)
    fits, last_error = [], None
    for layer in layers:
        try:
            Schedule.select_after(num_layers, sparsity, layer)
            fits.append(layer)
        except UserError as e:
            last_error = e
    if not fits:
        raise last_error
    return fits


LOSSES = {"listwise": listwise_loss, "cut": cut_loss}


def _fit_at(lm, layer: int, settings: SelectSettings, train_ex, val_ex, progress: bool) -> list[dict]:
    """Train a SelectRouter whose first routed block is `layer` with each of LOSSES (the tables are
    computed once); for each, its validation answer_kept picks the start or the trained state.
    Returns one candidate per loss: the router, schedule and the record's numbers."""
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import SelectRouter

    start_router = SelectRouter(select_layer=layer)
    schedule = start_router.schedule_for(lm.model.config.num_hidden_layers, settings.sparsity)
    routed = RoutedModel(lm.model, schedule, start_router, kv_policy=settings.kv_policy)
    first = schedule.first_routed
    train_items = selection_items(routed, train_ex, progress, f"selection tables, block {first - 1} (train)")
    val_items = selection_items(routed, val_ex, progress, f"selection tables, block {first - 1} (validation)")
    s_block = schedule.sparsity[first]
    start_kept = answer_kept(start_router, val_items, s_block)
    out = []
    for name in settings.losses:
        loss_fn = LOSSES[name]
        router = SelectRouter(select_layer=layer)
        router.load_state_dict(start_router.state_dict())
        with torch.no_grad():
            start = {"loss": float(loss_fn(router, train_items)), "val_answer_kept": start_kept}
        opt = torch.optim.Adam(router.parameters(), lr=settings.lr)
        bar = tqdm(range(settings.steps), desc=f"train-select (block {first - 1}, {name})", disable=not progress,
                   leave=False)
        for _ in bar:
            loss = loss_fn(router, train_items)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        with torch.no_grad():
            trained = {"loss": float(loss_fn(router, train_items)),
                       "val_answer_kept": answer_kept(router, val_items, s_block)}
        trained_state = {k: v.detach().clone() for k, v in router.state_dict().items()}
        ships = "trained" if trained["val_answer_kept"] >= start["val_answer_kept"] else "start"
        if ships == "start":
            router.load_state_dict(start_router.state_dict())
        out.append({"router": router, "schedule": schedule, "record": {
            "select_layer": layer, "selection_layer": first - 1, "loss": name,
            "routed_block_sparsity": round(s_block, 4),
            "train_examples": len(train_items), "val_examples": len(val_items),
            "start": start, "trained": trained, "ships": ships,
            "val_answer_kept": max(start["val_answer_kept"], trained["val_answer_kept"]),
            "offset_bias": [round(float(v), 3) for v in trained_state["offset_bias"]],
            "offsets": [-router.BACK, router.AHEAD], "recency": round(float(trained_state["recency"]), 4)}})
    return out


ANSWER_TOLERANCE = 0.02  # a candidate qualifies keeping >= the best one's validation answers less this


def qualifying(records: list[dict]) -> list[int]:
    """The candidates whose validation answer_kept is within ANSWER_TOLERANCE of the best one's."""
    best = max(r["val_answer_kept"] for r in records)
    return [i for i, r in enumerate(records) if r["val_answer_kept"] >= best - ANSWER_TOLERANCE]


def choose(records: list[dict]) -> int:
    """Which candidate (depth x loss) ships: among those keeping (nearly) as many validation answers
    as the best one (`qualifying`), the lowest calibration continuation KL (the first when no KL was
    scored). Long prompts first, as the issue rules: a router that drops early answers is not
    shippable; then continuation quality, which the candidates trade differently: the middle depth
    runs 13 blocks at ~70% skip at 0.3 where the earlier one spreads the budget over 20, and the cut
    loss spends slots on old tokens (docs/training.md 8.7, 8.9)."""
    ok = qualifying(records)
    return min(ok, key=lambda i: (records[i].get("calib_kl", 0.0), i))


def _calib_windows(lm, settings: SelectSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Calib-split windows [N,L]: the first kl_windows score the candidates (router selection), the
    next search_windows are the schedule search's fitness: one draw, so the two never share a token
    (sample_windows cuts a non-overlapping grid), and both are disjoint from the training and
    evaluation text."""
    from .common import windows

    count = settings.kl_windows + (settings.search_windows if settings.search_generations else 0)
    ids = windows(lm.tokenizer, "calib", None, settings.kl_len, count, settings.seed + 2)  # [N,L]
    return ids[:settings.kl_windows], ids[settings.kl_windows:]


def _cont_len(settings: SelectSettings) -> int:
    return max(1, min(64, settings.kl_len // 8))


class _CalibKL:
    """Mean continuation KL to dense on the selection windows (the deployment function: routed
    prefill, decode through the KV cache); the dense reference is computed once."""

    def __init__(self, lm, calib: torch.Tensor, settings: SelectSettings) -> None:
        from tokenskip.evaluate import dense_reference
        from tokenskip.routed import RoutedModel
        from tokenskip.schedule import Schedule

        self.lm, self.calib, self.cont, self.kv_policy = lm, calib, _cont_len(settings), settings.kv_policy
        base = RoutedModel(lm.model, Schedule.dense(lm.model.config.num_hidden_layers), None, kv_policy=self.kv_policy)
        self.dense = dense_reference(base, calib, self.cont, progress=False)

    def __call__(self, schedule, router) -> float:
        from tokenskip.evaluate import evaluate
        from tokenskip.routed import RoutedModel

        routed = RoutedModel(self.lm.model, schedule, router, kv_policy=self.kv_policy)
        kl = evaluate(routed, self.calib, self.cont, self.dense, "select", progress=False).per_window["kl"]
        return round(float(sum(kl) / len(kl)), 6)


@torch.no_grad()
def _val_accuracy(lm, schedule, router, val_ex, kv_policy: str) -> float:
    """Share of the validation questions answered as dense-style greedy decoding would (the
    deployment function, train/longctx.py): what a schedule change must not cost."""
    from tokenskip.routed import RoutedModel

    from .longctx import score_examples

    correct, _ = score_examples(RoutedModel(lm.model, schedule, router, kv_policy=kv_policy), val_ex)
    return round(sum(correct) / max(len(correct), 1), 4)


def search_after(lm, fit: dict, settings: SelectSettings, calib_kl: _CalibKL, search_ids: torch.Tensor, val_ex,
                 progress: bool) -> dict:
    """Search the per-block sparsities of the blocks after the selection block (the chosen router
    fixed; the blocks before it stay dense, so the table still sees every token) and ship the
    result only where it helps: lower KL on the selection windows and the validation questions
    answered within ANSWER_TOLERANCE of the flat schedule. Returns the record; sets fit["schedule"]
    when the searched schedule ships.

    Why: at 0.4 the flat select_after schedule (60% skipped in each of blocks 8-27) costs
    continuation KL against static's 46% in blocks 2-27; recency in those blocks does not win it
    back (a 0.9 recent share: +0.014 over static on 48 Wikipedia windows), and routing blocks 2-6
    by recency loses the early facts (first depth fifth 0/3). A searched shape (sparser with depth)
    lowers it by ~0.01 at equal FLOPs (docs/training.md 8.11)."""
    from .search import SearchSettings, search_schedule

    flat, router = fit["schedule"], fit["router"]
    n = flat.num_layers
    last_routed = max(layer for layer in range(n) if flat.is_routed(layer))
    ss = SearchSettings(target=settings.sparsity, population=settings.search_population,
                        generations=settings.search_generations, seed=settings.seed,
                        dense_first=flat.first_routed, dense_last=n - 1 - last_routed)
    res = search_schedule(lm.model, router, search_ids, _cont_len(settings), ss, settings.kv_policy, seeds=[flat],
                          router_name="select", progress=progress,
                          extra_meta={"select": flat.first_routed, "shape": "searched after the selection block"})
    searched = res.schedule
    kl_flat = fit["record"].get("calib_kl")
    if kl_flat is None:
        kl_flat = fit["record"]["calib_kl"] = calib_kl(flat, router)
    rec = {"generations": ss.generations, "population": ss.population, "windows": int(search_ids.shape[0]),
           "sparsity": [round(v, 4) for v in searched.sparsity], "calib_kl_flat": kl_flat}
    if searched.first_routed != flat.first_routed:  # the table would come from another block than trained on
        return {**rec, "ships": "flat", "why": "the search left the first routed block dense"}
    rec["calib_kl_searched"] = calib_kl(searched, router)
    rec["val_accuracy_flat"] = _val_accuracy(lm, flat, router, val_ex, settings.kv_policy)
    rec["val_accuracy_searched"] = _val_accuracy(lm, searched, router, val_ex, settings.kv_policy)
    helps = rec["calib_kl_searched"] < kl_flat
    keeps = rec["val_accuracy_searched"] >= rec["val_accuracy_flat"] - ANSWER_TOLERANCE
    if helps and keeps:
        fit["schedule"] = searched
        return {**rec, "ships": "searched"}
    return {**rec, "ships": "flat", "why": "no lower calibration KL" if not helps else "fewer validation answers"}


def train_select(lm, out_dir: str | Path, settings: SelectSettings = SelectSettings(), progress: bool = True,
                 log=print) -> dict:
    """Fit a SelectRouter at each candidate selection layer (candidate_layers), take the one
    `choose` picks (answers kept, then calibration KL), search the schedule after its selection block
    (search_after; kept only where it helps), and write the result as a routers folder
    (tokenskip.json + router.safetensors + select.json with the fit's record, every candidate's
    numbers and the search's included). Returns that record."""
    from tokenskip.config import RoutingConfig, save_routing
    from tokenskip.fileio import write_json_atomic

    from .common import deterministic

    max_len = int(getattr(lm.model.config, "max_position_embeddings", 2048))
    n_layers = lm.model.config.num_hidden_layers
    settings.check(max_len, n_layers)
    layers = candidate_layers(n_layers, settings.sparsity, settings.select_layer)
    deterministic(settings.seed)
    t0 = time.time()
    out = Path(out_dir)
    train_ex = _examples(lm.tokenizer, "train", settings, settings.examples, settings.seed)
    val_ex = _examples(lm.tokenizer, "calib", settings, max(1, settings.examples // 3), settings.seed + 1)
    fits = [fit for layer in layers for fit in _fit_at(lm, layer, settings, train_ex, val_ex, progress)]
    ok = qualifying([f["record"] for f in fits])
    calib_ids, search_ids = _calib_windows(lm, settings)
    calib_kl = _CalibKL(lm, calib_ids, settings) if len(ok) > 1 or settings.search_generations else None
    if len(ok) > 1:  # continuation KL decides between the candidates that keep enough of the answers
        for i in ok:
            fits[i]["record"]["calib_kl"] = calib_kl(fits[i]["schedule"], fits[i]["router"])
    tried = [f["record"] for f in fits]
    best = choose(tried)
    search = (search_after(lm, fits[best], settings, calib_kl, search_ids, val_ex, progress)
              if settings.search_generations else None)
    router, schedule, chosen = fits[best]["router"], fits[best]["schedule"], tried[best]
    cfg = RoutingConfig(model=lm.name, num_layers=n_layers, router="select", schedule=list(schedule.sparsity),
                        kv_policy=settings.kv_policy, score_window=router.score_window, seed=settings.seed,
                        model_type=lm.model.config.model_type, hidden_size=lm.model.config.hidden_size,
                        extra={"schedule_meta": schedule.meta})
    record = {"model": lm.name, "settings": _settings_json(settings), **chosen, "schedule_search": search,
              "candidates": [{k: v for k, v in r.items() if k not in ("offset_bias", "offsets")} for r in tried],
              "seconds": round(time.time() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    save_routing(out, cfg, router)
    write_json_atomic(out / "select.json", record)
    for r in tried:
        log(f"train-select: selection at block {r['selection_layer']} (routed blocks skip "
            f"{r['routed_block_sparsity']:.2f} each), {r['loss']} loss: answers kept on validation "
            f"{r['start']['val_answer_kept']:.3f} (start) -> {r['trained']['val_answer_kept']:.3f} (trained)"
            + (f"; calibration KL {r['calib_kl']:.4f}" if "calib_kl" in r else ""))
    if search is not None:
        log(f"train-select: schedule after block {chosen['selection_layer']} searched ({search['generations']} "
            f"generations x {search['population']}, {search['windows']} windows): calibration KL "
            f"{search['calib_kl_flat']:.4f} (flat)"
            + (f" -> {search['calib_kl_searched']:.4f}, validation answers {search['val_accuracy_flat']:.3f} -> "
               f"{search['val_accuracy_searched']:.3f}" if "calib_kl_searched" in search else "")
            + f"; ships the {search['ships']} schedule" + (f" ({search['why']})" if "why" in search else ""))
    log(f"train-select: ships the {chosen['ships']} router selecting at block {chosen['selection_layer']} "
        f"({chosen['loss']} loss); "
        f"{record['seconds']:.0f}s; wrote {out}")
    return record
