"""What the server needs to know about the model behind a backend: its name, context length,
cache geometry and routing schedule (for the KV budget and the routed-block metrics).

Each backend says it through `Backend.model_facts()` (deploy/runtime/base.py), from what it
already holds: the RoutedModel (PyTorch), the export sidecar (ONNX Runtime), or the export the
engines were built from (TensorRT, via engine.json's export_dir). When the geometry is unknown
the KV budget is off and the server says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenskip.kv_bytes import kv_cache_bytes
from tokenskip.schedule import Schedule

from ..runtime.base import Backend, ModelFacts, facts_from_sidecar


@dataclass
class ModelInfo:
    name: str
    max_length: int | None = None
    max_batch: int | None = None  # rows one backend call takes (an engine's profile); None: no limit
    config: object | None = None  # num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim
    schedule: Schedule | None = None  # None: dense
    kv_policy: str = "skip"
    dtype: str = "float32"

    @property
    def routed_layers(self) -> list[int]:
        if self.schedule is None:
            return []
        return [layer for layer in range(self.schedule.num_layers) if self.schedule.is_routed(layer)]

    @property
    def num_layers(self) -> int | None:
        return getattr(self.config, "num_hidden_layers", None)

    def kv_bytes(self, prompt_len: int, new_tokens: int) -> int | None:
        """Analytic KV-cache bytes of one sequence (tokenskip.kv_bytes), None when unknown."""
        if self.config is None:
            return None
        return kv_cache_bytes(self.config, self.schedule, prompt_len, new_tokens, self.kv_policy, self.dtype)

    def token_blocks(self, prompt_len: int) -> tuple[int, int]:
        """(run, skipped) (token, block) pairs of one prompt's prefill, by the schedule's keep counts."""
        layers = self.num_layers or 0
        if self.schedule is None:
            return prompt_len * layers, 0
        run = sum(self.schedule.keep_count(layer, prompt_len) for layer in range(layers))
        return run, prompt_len * layers - run


def from_facts(name: str, facts: ModelFacts) -> ModelInfo:
    return ModelInfo(name=name, **facts.as_dict())


def from_sidecar(name: str, meta: dict, max_length: int | None) -> ModelInfo:
    """From an export sidecar (export.json) without opening the export (bench-serve's sides)."""
    return from_facts(name, facts_from_sidecar(meta, max_length))


def model_info(backend: Backend, name: str) -> ModelInfo:
    """What the backend says about its model (`Backend.model_facts`), under the served name."""
    return from_facts(name, backend.model_facts())
