"""Per-block sparsity schedules.

A schedule is the vector s_l (fraction of tokens that skip block l). Each s_l is stored as an exact
keep fraction keep_num/keep_den (resolution 1e-4) so that every backend (PyTorch, the ONNX function
bodies, the CUDA plugins) computes the same integer k = ceil(keep * S) without float rounding
disagreements (0.7 * 10 is 7.000000000000001 in float64, 7 in float32).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .ops_reference import keep_count

RESOLUTION = 10_000  # sparsities are quantised to 1e-4
MIN_KEEP = 2  # the first valid token (attention sink) and the last one (next-token logits)


def check_sparsity(value: float, flag: str = "--sparsity") -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value < 1.0):
        raise UserError(f"{flag} {value}: must be in [0, 1)")
    return float(value)


@dataclass(frozen=True)
class Schedule:
    """Per-block sparsities, quantised to 1e-4."""

    sparsity: tuple[float, ...]
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        q = tuple(round(check_sparsity(s, "schedule sparsity") * RESOLUTION) / RESOLUTION for s in self.sparsity)
        object.__setattr__(self, "sparsity", q)

    @property
    def num_layers(self) -> int:
        return len(self.sparsity)

    def keep_fraction(self, layer: int) -> tuple[int, int]:
        """(keep_num, keep_den) with keep_num/keep_den = 1 - s_l exactly."""
        num = RESOLUTION - round(self.sparsity[layer] * RESOLUTION)
        g = math.gcd(num, RESOLUTION)
        return num // g, RESOLUTION // g

    def is_routed(self, layer: int) -> bool:
        return self.sparsity[layer] > 0.0

    @functools.cached_property
    def first_routed(self) -> int | None:
        """The first routed block (None: a dense schedule)."""
        return next((layer for layer, s in enumerate(self.sparsity) if s > 0.0), None)

    def window_runs(self, layer: int, refresh: bool) -> bool:
        """Whether block `layer` computes an attention-score router's window (RoutedModel and
        flops.forward_flops ask here). refresh: every block does. Otherwise (a one-selection
        router) only the block before the first routed one: its window rows see every key of the
        routed part, so it overwrites the whole table and an earlier block's window is discarded."""
        first = self.first_routed
        return refresh or first is None or layer == first - 1

    def keep_count(self, layer: int, routable: int) -> int:
        """Tokens kept out of `routable` routable tokens in block `layer`."""
        if not self.is_routed(layer):
            return routable
        num, den = self.keep_fraction(layer)
        return keep_count(routable, num, den, MIN_KEEP)

    def overall(self, routable: int | None = None) -> float:
        """Skipped (token, block) pairs / all pairs. With `routable`, counts exact integer k."""
        if routable is None:
            return sum(self.sparsity) / len(self.sparsity)
        kept = sum(self.keep_count(layer, routable) for layer in range(self.num_layers))
        return 1.0 - kept / (routable * self.num_layers)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def dense(cls, num_layers: int) -> "Schedule":
        return cls(tuple(0.0 for _ in range(num_layers)))

    @classmethod
    def _middle(cls, num_layers: int, overall: float, first: int, last: int, where: str, meta: dict) -> "Schedule":
        """Blocks [first, num_layers - last) at one sparsity, the others dense, mean = `overall`
        (`where` says, in the error, why the outer blocks are dense)."""
        routed = num_layers - first - last
        per_block = overall * num_layers / routed
        if per_block >= 0.95:
            raise UserError(f"--sparsity {overall}: {where} the {routed} routed blocks need {per_block:.2f} each "
                            "(at most 0.95); choose a lower sparsity")
        return cls(tuple([0.0] * first + [per_block] * routed + [0.0] * last), meta=meta)

    @classmethod
    def uniform(cls, num_layers: int, overall: float, dense_first: int = 2, dense_last: int = 2) -> "Schedule":
        """The same sparsity on every routed block, the outer blocks dense, mean = `overall`.
        The first and last blocks transform tokens most (FTP's redundancy statistics), so they stay
        dense; the middle blocks carry the whole budget.
        """
        check_sparsity(overall)
        if num_layers - dense_first - dense_last <= 0:
            dense_first = dense_last = 0
        return cls._middle(num_layers, overall, dense_first, dense_last, "with the outer blocks dense",
                           {"kind": "uniform", "target": overall})

    @classmethod
    def select_after(cls, num_layers: int, overall: float, select: int, dense_last: int = 2) -> "Schedule":
        """Blocks 0..select-1 dense (the last of them is the selection layer of a one-selection
        router, GemFilter-style), the same sparsity on the blocks after it, the last `dense_last`
        dense; mean = `overall` (so the FLOPs of the uniform schedule, up to attention's quadratic
        term)."""
        check_sparsity(overall)
        if num_layers - select - dense_last < 1 <= num_layers - select:  # a small model: no dense tail
            dense_last = 0
        if not 1 <= select or num_layers - select - dense_last < 1:
            raise UserError(f"selection layer {select}: must leave routed blocks between it and the last "
                            f"{dense_last} of {num_layers}")
        return cls._middle(num_layers, overall, select, dense_last,
                           f"with the first {select} blocks dense (the selection layer)",
                           {"kind": "select_after", "select": select, "target": overall})

    # -- files ------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"sparsity": list(self.sparsity), "overall": self.overall(), **self.meta}

    @classmethod
    def from_json(cls, obj: dict, where: str = "schedule") -> "Schedule":
        values = obj.get("sparsity") if isinstance(obj, dict) else None
        if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
            raise UserError(f"{where}: expected a JSON object with a non-empty list 'sparsity' of numbers")
        for i, v in enumerate(values):
            if not (0.0 <= v < 1.0):
                raise UserError(f"{where}: sparsity of block {i} is {v}, must be in [0, 1)")
        meta = {k: v for k, v in obj.items() if k not in ("sparsity", "overall")}
        return cls(tuple(float(v) for v in values), meta=meta)

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None) -> "Schedule":
        from .fileio import read_json

        sched = cls.from_json(read_json(path, "schedule file"), where=f"schedule file {path}")
        if num_layers is not None and sched.num_layers != num_layers:
            raise UserError(f"schedule file {path} has {sched.num_layers} blocks but the model has {num_layers}")
        return sched

    def describe(self) -> str:
        return json.dumps([round(s, 4) for s in self.sparsity])
