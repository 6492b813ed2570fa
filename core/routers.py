"""Routers: who decides which tokens a block runs on.

All routers return a raw score per token; the routed model turns scores into a keep set the same
way for every router (forced tokens +inf, padding -inf, top-k, ascending order). So swapping the
router never changes how tokens are selected, only their ranking.

- static ("sink + recency"): keep the first token, then the most recent ones. FTP's static router;
  it drives the sparsity search and is the guide-loss target.
- random: seeded noise, a baseline.
- learned: FTP's shared router, an MLP 4 -> 64 -> 1 over four per-token features (normalised
  position, latest attention received, its rank, and the block's target sparsity).
- attention: the training-free baseline (LazyLLM / GemFilter style): keep the tokens the prompt's
  last tokens attend to most, read from the same attention-score table the learned router sees.
- hybrid: half the budget by recency, half by the question's attention (max over heads, pooled),
  refreshed by every block.
- gemfilter: hybrid's rule with ONE selection layer, as GemFilter selects: the blocks up to the
  middle of the model run dense, the last of them fills the attention table once, and the budget
  is spent on the blocks after it (`Schedule.select_after`).
- select: gemfilter's schedule and table with a LEARNED scoring of it: a soft max over each token's
  neighbourhood with learned per-offset weights, plus a learned recency tilt, trained on where the
  answers of long-prompt questions sit (`tokenskip train-select`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import fp32_region

ROUTER_KINDS = ("dense", "static", "random", "learned", "attention", "hybrid", "gemfilter", "select")
# kinds with weights, built from a routers folder (--routers DIR): the command that writes one
TRAINED_KINDS = {"learned": "tokenskip fit` or `tokenskip train", "select": "tokenskip train-select"}
NUM_FEATURES = 4
HIDDEN = 64


@dataclass
class RouteContext:
    """What a router may look at for one block."""

    layer: int
    sparsity: float  # the block's target sparsity s_l
    positions: Tensor  # [B,S] int64 original position ids
    valid: Tensor  # [B,S] bool: the routed part (False on padding and on a scored tail)
    attn: Tensor | None  # [B,S] float32 latest attention score each token received (learned router)


class Router(nn.Module):
    needs_attention = False  # whether the routed model must keep the attention-score table
    # how the routed model fills that table for this router (tokenskip.routed, run_block)
    score_window: int | None = None  # window query rows; None: the routed model's (--score-window)
    score_heads = "mean"  # reduction over heads: "mean" or "max"
    score_refresh = True  # False: only the block before the first routed one fills the table

    def scores(self, ctx: RouteContext) -> Tensor:  # [B,S] float32, higher = keep
        raise NotImplementedError

    def schedule_for(self, num_layers: int, overall: float):
        """The schedule this router runs at an overall sparsity (--sparsity): the uniform one
        (middle blocks routed alike) unless the router's rule needs another shape."""
        from .schedule import Schedule

        return Schedule.uniform(num_layers, overall)


class StaticRouter(Router):
    """Recency: a later position scores higher. The first token is forced by the routed model."""

    def scores(self, ctx: RouteContext) -> Tensor:
        return ctx.positions.to(torch.float32)  # [B,S]


class RandomRouter(Router):
    """Uniform noise per (seed, block, position), reproducible on CPU.

    The noise is indexed by a token's position, not by its place in the batch, so a prompt is
    routed the same alone or in a batch, and prefill of a prefix routes it as a longer one-pass
    window would (the causality rule, docs/design.md)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def scores(self, ctx: RouteContext) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + ctx.layer)
        table = torch.rand(int(ctx.positions.max()) + 1, generator=gen, dtype=torch.float32)  # [P]
        return table[ctx.positions.cpu()].to(ctx.positions.device)  # [B,S]


def normalized_rank(values: Tensor, valid: Tensor) -> Tensor:
    """values [B,S] -> rank among the valid tokens of each row (0 = largest), divided by (L-1).

    A sort, then its inverse permutation by a scatter (the second argsort of a double argsort, in
    O(S) and with ops every backend translates directly); padding sorts last. Ties are broken by
    position (stable sort), as everywhere.
    """
    masked = values.masked_fill(~valid, float("-inf"))  # [B,S]
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices  # [B,S] position of rank r
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)  # [B,S]
    rank = torch.zeros_like(order).scatter(-1, order, ranks).to(torch.float32)  # [B,S] rank of each position
    denom = (valid.sum(-1, keepdim=True) - 1).clamp(min=1).to(torch.float32)  # [B,1]
    return rank / denom


def router_features(ctx: RouteContext) -> Tensor:
    """The four FTP router inputs, [B,S,4]: position/(L-1), attention, its rank, s_l."""
    valid = ctx.valid
    denom = (valid.sum(-1, keepdim=True) - 1).clamp(min=1).to(torch.float32)  # [B,1]
    pos = ctx.positions.to(torch.float32) / denom  # [B,S]
    attn = ctx.attn if ctx.attn is not None else torch.zeros_like(pos)  # [B,S]
    rank = normalized_rank(attn, valid)  # [B,S]
    sparsity = torch.full_like(pos, float(ctx.sparsity))  # [B,S]
    return torch.stack([pos, attn, rank, sparsity], dim=-1)  # [B,S,4]


class LearnedRouter(Router):
    """FTP's shared router: standardised features -> Linear(4,64) -> ReLU -> Linear(64,1).

    One router serves every block; the s_l feature is what lets it adapt its ranking per block.
    `feature_mean`/`feature_std` are set from calibration data before training (buffers, so they
    are saved with the weights and baked into the exported graph).
    """

    needs_attention = True

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("feature_mean", torch.zeros(NUM_FEATURES))
        self.register_buffer("feature_std", torch.ones(NUM_FEATURES))

    def forward(self, features: Tensor) -> Tensor:  # [B,S,4] -> [B,S] logits
        # fp32 whatever the LLM's dtype or an enclosing autocast: the scores decide which tokens run
        with fp32_region(features):
            z = (features.float() - self.feature_mean) / self.feature_std
            return self.mlp(z).squeeze(-1)

    def scores(self, ctx: RouteContext) -> Tensor:
        return self.forward(router_features(ctx))

    @torch.no_grad()
    def init_as_static(self, scale: float = 2.0, seed: int = 0, sinks: float = 0.0) -> "LearnedRouter":
        """Start as the static router: logit = scale * standardised position, through two hidden
        units (ReLU(z) - ReLU(-z) = z), so the top-k is exactly sink + recency. `sinks` f > 0 adds a
        third unit that ranks the first f of the positions (normalised position < f) above
        everything else, earliest first: extra attention sinks in the manner of StreamingLLM,
        expressed in the router's own position feature (a fraction, like the feature). The other
        hidden units get small random input weights and zero output weights: they contribute
        nothing until training finds a use for them."""
        gen = torch.Generator().manual_seed(seed)
        first, last = self.mlp[0], self.mlp[2]
        first.weight.copy_(torch.randn(first.weight.shape, generator=gen) * 0.1)
        first.bias.zero_()
        last.weight.zero_()
        last.bias.zero_()
        first.weight[:3].zero_()
        first.weight[0, 0], first.weight[1, 0] = 1.0, -1.0
        last.weight[0, 0], last.weight[0, 1] = scale, -scale
        if sinks > 0:  # bonus 1 - p/f for p < f, as ReLU(w z + b) over the standardised position z
            mu, sd = float(self.feature_mean[0]), float(self.feature_std[0])
            first.weight[2, 0], first.bias[2] = -sd / sinks, (sinks - mu) / sinks
            last.weight[0, 2] = 1000.0 * scale
        return self


class AttentionRouter(Router):
    """Training-free baseline: rank tokens by the attention they received from the prompt's last
    tokens (LazyLLM's criterion; GemFilter's, but per block rather than once from an early layer).

    It reads the routed model's attention-score table (docs/design.md, "Attention-score feature"):
    the mean over heads and over the last w kept query rows of the routed part (the prompt) of each
    key's attention probability, from the most recent block that executed the key. The first two
    blocks run dense under every schedule we ship, so the table is filled before any routed block
    reads it. So it sees content at no training cost, and the scores never read a scored
    continuation (the window's rows come from the routed part only: the causality rule).

    score = attention * L_valid (1 for a uniform spread, whatever the length) + recency * position
    / (L_valid - 1): the recency term only breaks ties and orders tokens no window query has seen
    yet (table value 0), the newest first, as the static router would. Sink and last tokens are
    forced by the routed model, as for every router."""

    needs_attention = True

    def __init__(self, recency: float = 1e-3) -> None:
        super().__init__()
        self.recency = recency

    def scores(self, ctx: RouteContext) -> Tensor:
        n = ctx.valid.sum(-1, keepdim=True).to(torch.float32)  # [B,1] tokens of the routed part
        pos = ctx.positions.to(torch.float32) / (n - 1).clamp(min=1)  # [B,S] in [0, 1]
        attn = ctx.attn.to(torch.float32) if ctx.attn is not None else torch.zeros_like(pos)  # [B,S]
        return attn * n + self.recency * pos  # [B,S]


class HybridRouter(Router):
    """Training-free retrieval + recency (issue 20). The newest `recent` share of the block's keep
    budget ranks first, as the static router ranks it (continuation quality); the rest goes to the
    tokens the prompt's last `window` tokens (the question) attend to most (retrieval):

    - max over heads (heads="max"): the few retrieval heads are not averaged away by the rest;
    - a short window (16 rows, about the question) rather than the learned router's 64;
    - max-pooled over neighbouring positions (SnapKV; `reach` = (back, ahead), default 3 and 3: a
      pool of 7): a phrase is kept whole, not only its most-attended token; the first token is left
      out of the pooling (it is forced anyway, and its sink attention would spread to its neighbours);
    - refresh=True: every executed block updates the table, as for the other routers; False: only
      the last dense block before the first routed one (GemFilter's one selection layer). Measured on
      smollm2-135m (needle, 512 tokens, sparsity 0.3): the refresh kept more needles.

    Everything it reads is over the routed part only (ctx.valid), so it is causal."""

    needs_attention = True

    def __init__(self, window: int = 16, heads: str = "max", reach: tuple[int, int] = (3, 3), recent: float = 0.5,
                 refresh: bool = True) -> None:
        super().__init__()
        back, ahead = reach
        if heads not in ("mean", "max") or min(back, ahead) < 0 or not 0.0 <= recent <= 1.0:
            raise ValueError(f"hybrid router: heads mean|max, reach (back, ahead) >= 0, recent in [0,1] "
                             f"(got {heads}, {reach}, {recent})")
        self.score_window, self.score_heads, self.reach, self.recent = window, heads, (back, ahead), recent
        self.score_refresh = refresh

    def scores(self, ctx: RouteContext) -> Tensor:
        n, pos, attn = attention_share(ctx.attn, ctx.valid, ctx.positions)  # [B,1], [B,S], [B,S]
        attn = reach_max(attn, *self.reach)  # [B,S]
        recent = recent_share(pos, self.recent, ctx.sparsity)  # [B,S]
        # attn * n <= n, so 2n + position ranks the recent share above everything, newest first
        # (integer positions stay exact in fp32, unlike a large constant plus a fraction)
        return torch.where(recent, 2 * n + ctx.positions.to(torch.float32), attn + 1e-3 * pos)  # [B,S]


def attention_share(attn: Tensor | None, valid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What the retrieval routers (hybrid, gemfilter, select) read, over the routed part only:
    n [B,1] its token count, pos [B,S] = position / (n - 1) in [0, 1], and the attention table
    [B,S] scaled by n (1 = a uniform spread, whatever the length), 0 on the sink (forced anyway:
    its attention would spread to its neighbours), on padding and on a scored tail."""
    n = valid.sum(-1, keepdim=True).to(torch.float32)  # [B,1]
    pos = positions.to(torch.float32) / (n - 1).clamp(min=1)  # [B,S]
    a = attn.to(torch.float32) if attn is not None else torch.zeros_like(pos)  # [B,S]
    return n, pos, torch.where(valid & (positions > 0), a, torch.zeros_like(a)) * n


def recent_share(pos: Tensor, recent: float, sparsity: float) -> Tensor:
    """pos [..,S] -> bool [..,S]: the newest `recent` share of a block's keep budget (1 - s_l), which
    the retrieval routers rank first (continuation quality) whatever their attention score."""
    return pos > 1.0 - recent * (1.0 - float(sparsity))


def neighbour_slices(score: Tensor, back: int, ahead: int, fill: float = 0.0) -> Tensor:
    """score [B,S] -> [B,S,K], K = back + ahead + 1: [b, i, k] = score[b, i + k - back] (`fill` beyond
    the ends). Shifted slices rather than unfold/max_pool1d, which would pin the exported graph to
    the example length."""
    seq = score.shape[1]
    padded = F.pad(score, (back, ahead), value=fill)  # [B,S+K-1]: padded[:, j + back] = score[:, j]
    return torch.stack([padded[:, i:i + seq] for i in range(back + ahead + 1)], -1)  # [B,S,K]


def reach_max(score: Tensor, back: int, ahead: int) -> Tensor:
    """score [B,S] (>= 0) -> [B,S]: token i takes the largest score of tokens i-back .. i+ahead (a 1-D
    max-pool, stride 1, same length). Reaching back keeps the words that FOLLOW an attended phrase:
    the question quotes the evidence's start, and the answer is what comes after it (the induction
    pattern), so a symmetric pool keeps the quote but cuts the answer."""
    if back == 0 and ahead == 0:
        return score
    return neighbour_slices(score, back, ahead).amax(-1)  # [B,S]


class GemFilterRouter(HybridRouter):
    """GemFilter-style selection (issue 20): the hybrid rule (half recency, half the tokens the
    question's last 16 rows attend to, max over heads, max-pooled over 7 positions) read from ONE
    selection layer: the blocks through `select_layer - 1` run dense, the table is what the last
    of them computed (score_refresh=False), and every later block ranks by it.

    Why: in smollm2-135m the question finds its evidence in the attention of a few middle blocks
    only, and a per-block refresh mostly reads blocks that do not (docs/training.md 8.5: needle at
    512 tokens, sparsity 0.3, n = 24, by selection layer: 14 -> 20/24, 16 -> 6/24, dense 23/24;
    refreshed hybrid 11/24, static 11/24). The default layer, num_layers // 2, is GemFilter's middle
    of the model; the best layer is model-specific (a sweep, as GemFilter does)."""

    def __init__(self, select_layer: int | None = None) -> None:
        super().__init__(refresh=False)
        self.select_layer = select_layer

    def schedule_for(self, num_layers: int, overall: float):
        from .schedule import Schedule

        select = num_layers // 2 if self.select_layer is None else self.select_layer
        return Schedule.select_after(num_layers, overall, select)


class SelectRouter(Router):
    """The learned one-selection router (issue 20): gemfilter's schedule shape (the blocks before
    `select_layer` dense, `Schedule.select_after`; train-select picks the layer, and the saved
    schedule carries it) and its table (the question's last 16 rows, max over heads, read
    once from the last dense block), scored by a learned function instead of a fixed pool:

        score_i = (1/T) logsumexp_o T (log(a_{i+o} + eps) + b_o) + w * position_i / (L - 1)

    over offsets o in [-BACK, AHEAD], where a is the table scaled by the routed part's length (1 for
    a uniform spread). The per-offset weights b_o say which neighbours' attention a token inherits
    (a learned, soft max-pool: T = 8 makes it close to a max of the neighbours' attention, each
    scaled by e^{b_o}); w tilts towards recent tokens. The
    newest `recent` share of the keep budget ranks first, as hybrid/gemfilter rank it.

    Why this input: in smollm2-135m the question's attention at the selection layer already points
    at the evidence (docs/training.md 8.5), but at the phrase the question quotes, while the answer
    is what FOLLOWS it; a fixed symmetric pool cuts it off. A hidden-state probe and a logistic
    weighting of neighbours were screened and found weaker (docs/training.md 8.6).

    The start (untrained) is gemfilter's pool of 7 (b_o = 0 on [-3, 3]) with a faint reach beyond it
    (b_o = -3: a neighbour 4-16 back or 4-8 ahead counts at 5% of its attention, so the loss has a
    gradient there), w = 0.
    Training (train/select.py) fits b and w to where the answers of train-split long-prompt
    examples sit (the answer's tokens inside the evidence and the two before them); trained, the
    pool reaches 1-8 tokens back and hardly ahead. Causal: the table, positions and lengths are over
    the routed part only."""

    needs_attention = True
    BACK, AHEAD, T, EPS = 16, 8, 8.0, 1e-4
    RECENT_RANK = 1.0e4  # recent tokens score this + position; learned scores are clamped below it

    def __init__(self, select_layer: int | None = None, recent: float = 0.5) -> None:
        super().__init__()
        self.score_window, self.score_heads, self.score_refresh = 16, "max", False
        self.select_layer, self.recent = select_layer, recent
        self.offset_bias = nn.Parameter(torch.full((self.BACK + self.AHEAD + 1,), -3.0))  # [K] b_o, o = -BACK..AHEAD
        self.recency = nn.Parameter(torch.zeros(()))  # w
        with torch.no_grad():
            self.offset_bias[self.BACK - 3:self.BACK + 4] = 0.0  # the start: gemfilter's symmetric pool of 7

    schedule_for = GemFilterRouter.schedule_for

    def learned_scores(self, attn: Tensor | None, valid: Tensor, positions: Tensor) -> Tensor:
        """The learned part [B,S] (what training fits), before the recent share is ranked first."""
        return self._learned(*attention_share(attn, valid, positions)[1:])

    def _learned(self, pos: Tensor, a: Tensor) -> Tensor:  # pos, a [B,S] (attention_share) -> [B,S]
        with fp32_region(a):
            la = torch.log(a + self.EPS)  # [B,S]
            shifted = neighbour_slices(la, self.BACK, self.AHEAD, math.log(self.EPS))  # [B,S,K] offsets -BACK..AHEAD
            pooled = torch.logsumexp(self.T * (shifted + self.offset_bias.float()), -1) / self.T  # [B,S]
            return pooled + self.recency.float() * pos  # [B,S]

    def scores(self, ctx: RouteContext) -> Tensor:
        _, pos, a = attention_share(ctx.attn, ctx.valid, ctx.positions)  # [B,S], [B,S]
        learned = self._learned(pos, a)  # [B,S]
        recent = recent_share(pos, self.recent, ctx.sparsity)  # [B,S]
        bound = self.RECENT_RANK / 2
        return torch.where(recent, self.RECENT_RANK + ctx.positions.to(torch.float32),
                           learned.clamp(-bound, bound))  # [B,S]


def make_router(kind: str, seed: int = 0) -> Router | None:
    """A router by name; `dense` means no routing at all (None). `learned` starts untrained."""
    if kind == "dense":
        return None
    if kind == "static":
        return StaticRouter()
    if kind == "random":
        return RandomRouter(seed)
    if kind == "learned":
        return LearnedRouter()
    if kind == "attention":
        return AttentionRouter()
    if kind == "hybrid":
        return HybridRouter()
    if kind == "gemfilter":
        return GemFilterRouter()
    if kind == "select":
        return SelectRouter()
    raise ValueError(f"unknown router {kind!r} (choose from {', '.join(ROUTER_KINDS)})")
