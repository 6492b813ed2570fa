"""What a routed model is, as a file: `tokenskip.json` (+ `router.safetensors` for a learned router).

Everything needed to rebuild the same routed model lives in that folder: the base model id, the
per-block schedule, the router kind and weights (feature standardisation included, as buffers),
kv_policy and the attention-score window. Train writes it; eval, export and generate read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .fileio import load_safetensors, read_json, save_safetensors_atomic, write_json_atomic
from .routed import DEFAULT_WINDOW, KV_POLICIES, RoutedModel
from .routers import ROUTER_KINDS, TRAINED_KINDS, make_router
from .schedule import Schedule, check_sparsity

CONFIG_NAME = "tokenskip.json"
WEIGHTS_NAME = "router.safetensors"
FORMAT = "tokenskip-router"


@dataclass
class RoutingConfig:
    model: str
    num_layers: int
    router: str  # a kind of tokenskip.routers.ROUTER_KINDS
    schedule: list[float]
    kv_policy: str = "skip"
    score_window: int = DEFAULT_WINDOW
    seed: int = 0
    model_type: str = ""
    hidden_size: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self, where: str = CONFIG_NAME) -> None:
        if self.router not in ROUTER_KINDS:
            raise UserError(f"{where}: unknown router {self.router!r} (choose from {', '.join(ROUTER_KINDS)})")
        if self.kv_policy not in KV_POLICIES:
            raise UserError(f"{where}: kv_policy must be one of {', '.join(KV_POLICIES)}, got {self.kv_policy!r}")
        if len(self.schedule) != self.num_layers:
            raise UserError(f"{where}: schedule has {len(self.schedule)} blocks, num_layers is {self.num_layers}")
        if self.score_window < 1:
            raise UserError(f"{where}: score_window must be >= 1")

    def to_json(self) -> dict:
        import tokenskip
        import transformers

        d = asdict(self)
        d.update(format=FORMAT, version=1,
                 versions={"tokenskip": tokenskip.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__})
        return d

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "RoutingConfig":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise UserError(f"{where}: not a tokenskip router config (format != {FORMAT!r})")
        known = {f for f in cls.__dataclass_fields__}
        try:
            cfg = cls(**{k: v for k, v in obj.items() if k in known})
        except TypeError as exc:
            raise UserError(f"{where}: {exc}") from None
        Schedule.from_json({"sparsity": cfg.schedule}, where=where)
        cfg.validate(where)
        return cfg


def save_routing(out_dir: str | Path, cfg: RoutingConfig, router=None) -> None:
    """Write tokenskip.json (+ router.safetensors for a trained router kind) atomically."""
    out_dir = Path(out_dir)
    cfg.validate()
    if cfg.router in TRAINED_KINDS:
        if router is None:
            raise ValueError(f"a {cfg.router} router config needs the router weights")
        save_safetensors_atomic(router.state_dict(), out_dir / WEIGHTS_NAME, metadata={"format": FORMAT})
    write_json_atomic(out_dir / CONFIG_NAME, cfg.to_json())


def load_routing(routers_dir: str | Path) -> tuple[RoutingConfig, object]:
    """Read a routers folder -> (config, router module or None for dense)."""
    routers_dir = Path(routers_dir)
    if not routers_dir.is_dir():
        raise UserError(f"--routers {routers_dir}: no such folder")
    cfg_path = routers_dir / CONFIG_NAME
    cfg = RoutingConfig.from_json(read_json(cfg_path, "router config"), where=str(cfg_path))
    router = make_router(cfg.router, cfg.seed)
    if cfg.router in TRAINED_KINDS:
        state = load_safetensors(routers_dir / WEIGHTS_NAME, "router weights")
        try:
            router.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise UserError(f"router weights {routers_dir / WEIGHTS_NAME} do not fit the router: {first}") from None
    return cfg, router


def check_matches_model(cfg: RoutingConfig, model, where: str, model_name: str = "") -> None:
    """Refuse a routers folder trained for another model (layer count or width differ)."""
    c = model.config
    if cfg.num_layers != c.num_hidden_layers or (cfg.hidden_size and cfg.hidden_size != c.hidden_size):
        here = model_name or "the model"
        raise UserError(f"{where} was made for a model with {cfg.num_layers} layers / hidden {cfg.hidden_size} "
                        f"({cfg.model}), but {here} has {c.num_hidden_layers} layers / hidden {c.hidden_size}")


def build_routed(model, *, router: str = "static", sparsity: float | None = None, schedule: str | Path | None = None,
                 routers_dir: str | Path | None = None, kv_policy: str | None = None, seed: int = 0,
                 model_name: str = "") -> tuple[RoutedModel, RoutingConfig]:
    """The one way every command turns CLI choices into a RoutedModel.

    routers_dir wins (it carries router, schedule and kv_policy); otherwise `router` with either a
    uniform `sparsity` or a `schedule` file. kv_policy given explicitly overrides the folder's.
    """
    n = model.config.num_hidden_layers
    if routers_dir is not None:
        cfg, module = load_routing(routers_dir)
        check_matches_model(cfg, model, f"--routers {routers_dir}", model_name)
        if kv_policy is not None:
            cfg.kv_policy = kv_policy
        sched = Schedule(tuple(cfg.schedule))
    else:
        if router not in ROUTER_KINDS:
            raise UserError(f"--router {router}: choose from {', '.join(ROUTER_KINDS)}")
        if router in TRAINED_KINDS:
            raise UserError(f"--router {router} needs --routers DIR (a folder written by `{TRAINED_KINDS[router]}`)")
        module = make_router(router, seed)
        if router == "dense":
            sched = Schedule.dense(n)
        elif schedule is not None:
            sched = Schedule.load(schedule, n)
        elif sparsity is not None:  # the router's own schedule shape (uniform, or gemfilter's select_after)
            sched = module.schedule_for(n, check_sparsity(sparsity))
        else:
            raise UserError(f"--router {router} needs --sparsity X or --schedule FILE")
        cfg = RoutingConfig(model=model_name, num_layers=n, router=router, schedule=list(sched.sparsity),
                            kv_policy=kv_policy or "skip", seed=seed, model_type=model.config.model_type,
                            hidden_size=model.config.hidden_size)
    if module is not None:  # the router runs where the LLM runs, in fp32 whatever the LLM's dtype
        from .precision import model_device

        module.to(device=model_device(model))
    routed = RoutedModel(model, sched, module, kv_policy=cfg.kv_policy, score_window=cfg.score_window)
    return routed, cfg
