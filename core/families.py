"""Model-family adapters: where a Hugging Face causal LM keeps the modules that routing drives.

Routing calls a decoder's own modules (embedding, rotary embedding, norms, projections, MLP, LM
head) but runs attention itself (tokenskip.block), so it must know each family's module names.
This file is the one place that names them: `Family` holds the attribute paths, the registry maps
HF's `config.model_type` to one. A family whose blocks compute what Llama's do (pre-norm; rotary
attention with separate q/k/v/o projections, optional per-head q/k norms applied before RoPE; a
residual MLP after a second norm) but under other names is added with one `register_family` call.
A family whose computation differs (Gemma's (1 + w) norm and scaled embedding, a fused qkv
projection) needs block code, not an adapter.

Contract on the modules themselves (true of every HF family registered here): the rotary
embedding is called as rotary_emb(hidden [B,S,H], positions [B,S]) -> (cos, sin) [B,S,d]; the
attention module has `head_dim` and `scaling` attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

from torch import nn

from .errors import UserError


class ModelParts(NamedTuple):
    """The model-level modules of one *ForCausalLM (resolved per call: a cheap attribute walk)."""

    layers: nn.ModuleList  # the decoder blocks, in order
    embed_tokens: nn.Module
    rotary_emb: nn.Module
    norm: nn.Module  # final norm, before lm_head
    lm_head: nn.Module


class LayerParts(NamedTuple):
    """The modules of one decoder block that tokenskip.block.run_block calls."""

    input_norm: nn.Module
    attn: nn.Module  # has head_dim, scaling
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module | None  # per-head norms before RoPE (Qwen3); None: the family has none
    k_norm: nn.Module | None
    post_attn_norm: nn.Module
    mlp: nn.Module


@dataclass(frozen=True)
class Family:
    """Attribute paths (dotted) of one HF family's modules. Defaults are HF's Llama names."""

    model_type: str  # HF config.model_type
    # from the *ForCausalLM
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    rotary_emb: str = "model.rotary_emb"
    norm: str = "model.norm"
    lm_head: str = "lm_head"
    # from one decoder layer
    input_norm: str = "input_layernorm"
    attn: str = "self_attn"
    post_attn_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"
    # from the attention module
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    # norm classes (by name) whose forward is exactly HF's LlamaRMSNorm formula: the fused
    # gather+norm kernel (tokenskip.fused) may stand in for them
    llama_rms_norms: frozenset[str] = frozenset()
    _model_getter: attrgetter = field(init=False, repr=False, compare=False)
    _layer_getter: attrgetter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.q_norm is None) != (self.k_norm is None):
            raise ValueError(f"family {self.model_type!r}: q_norm and k_norm go together (both or neither)")
        object.__setattr__(self, "_model_getter", attrgetter(
            self.layers, self.embed_tokens, self.rotary_emb, self.norm, self.lm_head))
        in_attn = [self.q_proj, self.k_proj, self.v_proj, self.o_proj]
        if self.q_norm is not None:
            in_attn += [self.q_norm, self.k_norm]
        paths = [self.input_norm, self.post_attn_norm, self.mlp, self.attn, *(f"{self.attn}.{p}" for p in in_attn)]
        object.__setattr__(self, "_layer_getter", attrgetter(*paths))

    def model_parts(self, model: nn.Module) -> ModelParts:
        return ModelParts(*self._model_getter(model))

    def layer_parts(self, layer: nn.Module) -> LayerParts:
        input_norm, post_attn_norm, mlp, attn, q, k, v, o, *qk_norm = self._layer_getter(layer)
        q_norm, k_norm = qk_norm or (None, None)
        return LayerParts(input_norm, attn, q, k, v, o, q_norm, k_norm, post_attn_norm, mlp)

    def is_llama_rms_norm(self, norm: nn.Module) -> bool:
        return type(norm).__name__ in self.llama_rms_norms


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make `family` the adapter for its model_type. Registering an equal family again is a no-op;
    a different one under a taken model_type is an error (two adapters for one family)."""
    old = _REGISTRY.get(family.model_type)
    if old is not None and old != family:
        raise ValueError(f"model type {family.model_type!r} already has a family adapter: {old}")
    _REGISTRY[family.model_type] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def family_of(model_or_config) -> Family:
    """The adapter for a model (anything with .config) or an HF config, by config.model_type."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    family = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UserError(f"model type {model_type!r} is not supported (supported: {', '.join(_REGISTRY)})")
    return family


# The built-ins: HF's names; each RMSNorm class's forward is LlamaRMSNorm's (checked in transformers 5.25).
LLAMA = register_family(Family("llama", llama_rms_norms=frozenset({"LlamaRMSNorm"})))
MISTRAL = register_family(Family("mistral", llama_rms_norms=frozenset({"MistralRMSNorm"})))
QWEN2 = register_family(Family("qwen2", llama_rms_norms=frozenset({"Qwen2RMSNorm"})))
QWEN3 = register_family(Family("qwen3", q_norm="q_norm", k_norm="k_norm",
                               llama_rms_norms=frozenset({"Qwen3RMSNorm"})))
