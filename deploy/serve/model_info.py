"""What the server needs to know about the model behind a backend: its name, context length,
cache geometry and routing schedule (for the KV budget and the routed-block metrics).

Read from what each backend already holds: the RoutedModel (PyTorch), the export sidecar
(ONNX Runtime), or the export the engines were built from (TensorRT, via engine.json's
export_dir). When the geometry is unknown the KV budget is off and the server says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from tokenskip.kv_bytes import kv_cache_bytes
from tokenskip.schedule import Schedule


@dataclass
class ModelInfo:
    name: str
    max_length: int | None = None
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


def from_sidecar(name: str, meta: dict, max_length: int | None) -> ModelInfo:
    c = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    config = None
    if all(isinstance(c.get(k), int) for k in ("num_layers", "num_attention_heads", "head_dim")):
        config = SimpleNamespace(num_hidden_layers=c["num_layers"], num_attention_heads=c["num_attention_heads"],
                                 num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                                 head_dim=c["head_dim"], hidden_size=c.get("hidden_size"))
    layers = meta.get("layers") if isinstance(meta.get("layers"), list) else []
    schedule = None
    if layers and any(isinstance(entry, dict) and entry.get("routed") for entry in layers):
        schedule = Schedule(tuple(float(entry.get("sparsity", 0.0)) if entry.get("routed") else 0.0
                                  for entry in layers))
    return ModelInfo(name=name, max_length=max_length, config=config, schedule=schedule,
                     kv_policy=str(meta.get("kv_policy") or "skip"), dtype=str(meta.get("dtype") or "float32"))


def model_info(backend, name: str) -> ModelInfo:
    routed = getattr(backend, "routed", None)
    max_length = getattr(backend, "max_length", None)
    if routed is not None:  # PyTorch
        schedule = routed.schedule if routed.router is not None and any(
            routed.layer_is_routed(i) for i in range(len(routed.layers))) else None
        dtype = next(routed.model.parameters()).dtype
        return ModelInfo(name=name, max_length=max_length, config=routed.model.config, schedule=schedule,
                         kv_policy=routed.kv_policy, dtype=str(dtype).replace("torch.", ""))
    meta = getattr(backend, "meta", None) or {}
    if "graphs" in meta:  # an export sidecar (ONNX Runtime)
        return from_sidecar(name, meta, max_length)
    export_dir = meta.get("export_dir")  # engine.json (TensorRT): the export it was built from
    if isinstance(export_dir, str) and Path(export_dir).is_dir():
        from tokenskip.export.sidecar import read_export

        try:
            return from_sidecar(name, read_export(export_dir), max_length or meta.get("max_seq_len"))
        except Exception:  # noqa: BLE001 - geometry is optional: serve without a KV budget
            pass
    return ModelInfo(name=name, max_length=max_length or meta.get("max_seq_len"))
