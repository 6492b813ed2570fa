"""The PyTorch backend ("torch" in the registry): a RoutedModel behind the `base.Backend` protocol.

Its cache is a list with one LayerKV per block (None for a removed block), preallocated for the
tokens `expect_new_tokens` announces (tokenskip.kv_buffer), with a CUDA-graphed decode step on a
GPU when a generation announced its length (tokenskip.cuda_graphs); kv_rows.TORCH_OPS regroups its
rows for the server.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenskip.cuda_graphs import decode_cache
from tokenskip.errors import UserError
from tokenskip.models import DEFAULT_MODEL

from .base import BackendSpec, CacheOps, Created, ModelFacts, register_backend
from .kv_cache import check_limit
from .kv_rows import TORCH_OPS


def load_routed(spec: BackendSpec):
    """spec -> (LoadedModel, RoutedModel, RoutingConfig). With a routers folder and no model, the
    base model named in the folder is used. No routing fields at all means dense. The LLM is loaded
    once, in spec.dtype, on spec.device (tokenskip.precision)."""
    from tokenskip.config import build_routed, load_routing
    from tokenskip.models import load_model

    model, router = spec.model, spec.router
    if model is None:
        model = (load_routing(spec.routers_dir)[0].model if spec.routers_dir is not None else None) or DEFAULT_MODEL
    if router is None:
        scheduled = spec.sparsity is not None or spec.schedule
        router = "learned" if spec.routers_dir else ("static" if scheduled else "dense")
    torch.manual_seed(spec.seed)
    lm = load_model(model, dtype=spec.dtype, device=spec.device)
    routed, cfg = build_routed(lm.model, router=router, sparsity=spec.sparsity, schedule=spec.schedule,
                               routers_dir=spec.routers_dir, kv_policy=spec.kv_policy, seed=spec.seed,
                               model_name=model)
    return lm, routed, cfg


@register_backend("torch", features=("bench", "bench-serve"))
class TorchBackend:
    """The PyTorch RoutedModel: prefill routes, decode runs every block (or threshold-skips)."""

    name = "torch"

    def __init__(self, routed, threshold_skip: bool = False) -> None:
        self.routed = routed
        self.threshold_skip = threshold_skip
        self.device = next(routed.model.parameters()).device
        self.max_length = getattr(routed.model.config, "max_position_embeddings", None)
        self.stats: dict = {}
        self.new_tokens: int | None = None  # KV room per prefill, set by expect_new_tokens() (tokenskip.kv_buffer)
        if threshold_skip:
            from tokenskip.routers import LearnedRouter

            if not isinstance(routed.router, LearnedRouter):
                raise UserError("--threshold-skip needs a learned router (--routers DIR written by `tokenskip train`)")
            self.stats = {"decode_tokens": 0, "routed_block_visits": 0, "skipped_blocks": 0}

    def check_length(self, prompt: int, new: int) -> None:
        check_limit("model", prompt, new, self.max_length)

    @staticmethod
    def cache_nbytes(cache) -> int:
        """Bytes of K/V (+ positions, validity) the per-layer caches hold for the batch."""
        return sum(t.nbytes for kv in cache if kv is not None for t in (kv.key, kv.value, kv.pos, kv.valid))

    def expect_new_tokens(self, new: int) -> None:
        """Tokens the next prefills' KV caches preallocate room for (the generation loop says;
        with it, a GPU decode may run as a CUDA graph, which a server's regrouped rows never do)."""
        self.new_tokens = new

    def cache_ops(self) -> CacheOps:
        return TORCH_OPS

    def model_facts(self) -> ModelFacts:
        routed = self.routed
        schedule = routed.schedule if routed.router is not None and any(
            routed.layer_is_routed(i) for i in range(len(routed.layers))) else None
        dtype = next(routed.model.parameters()).dtype
        return ModelFacts(max_length=self.max_length, config=routed.model.config, schedule=schedule,
                          kv_policy=routed.kv_policy, dtype=str(dtype).replace("torch.", ""))

    @classmethod
    def create(cls, spec: BackendSpec) -> Created:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        lm, routed, cfg = load_routed(spec)
        backend = cls(routed, threshold_skip=spec.threshold_skip)
        return Created(backend, lm.tokenizer, {"backend": "torch", "model": spec.model or DEFAULT_MODEL,
                                               "router": cfg.router, "kv_policy": cfg.kv_policy,
                                               "sparsity": routed.schedule.overall()
                                               if routed.router is not None else 0.0})

    @classmethod
    def open(cls, spec: BackendSpec) -> "TorchBackend":
        return cls.create(spec).backend

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor):
        if self.threshold_skip and ids.shape[0] != 1:
            raise UserError(f"--threshold-skip decodes one prompt at a time, got a batch of {ids.shape[0]}")
        logits, cache = self.routed.prefill(ids.to(self.device), mask.to(self.device), padded=not bool(mask.all()))
        return logits.float(), decode_cache(self.routed, cache, self.new_tokens, graphs=not self.threshold_skip)

    @property
    def chunked_prefill(self) -> bool:  # base.Backend: the server may prefill long prompts in chunks
        return not self.threshold_skip

    @torch.no_grad()
    def prefill_chunk(self, ids: Tensor, positions: Tensor, cache):
        """The next prompt tokens [B,S] of every row, routed among themselves, attending to the cache
        (RoutedModel.forward with a past) -> (logits [B,V] of the last, past + these tokens)."""
        ids, positions = ids.to(self.device), positions.to(self.device)
        out = self.routed(ids, torch.ones_like(ids), position_ids=positions, past=cache, last_only=True,
                          return_cache=True)
        return out.logits[:, -1].float(), out.cache

    @torch.no_grad()
    def decode(self, token: Tensor, position: Tensor, cache):
        token, position = token.to(self.device), position.to(self.device)
        if not self.threshold_skip:
            logits, cache = self.routed.decode_step(token, position, cache)
            return logits.float(), cache
        from .threshold_skip import threshold_decode_step

        logits, cache, skipped = threshold_decode_step(self.routed, token, position, cache)
        routed_blocks = sum(self.routed.layer_is_routed(i) for i in range(len(self.routed.layers)))
        self.stats["decode_tokens"] += 1
        self.stats["routed_block_visits"] += routed_blocks
        self.stats["skipped_blocks"] += len(skipped)
        return logits.float(), cache
