"""Analytic KV-cache size of one sequence, dense vs routed, as the caches are actually stored.

Under kv_policy=skip a routed block attends only over the tokens it kept, so its cache holds
k_l = keep_count(l, prompt) prompt tokens instead of all of them (method.md section 5); under
kv_policy=dense skipped tokens stay keys and every block caches the whole prompt. Decode runs
every block, so each decoded token adds one entry to every block's cache.

Per cached token and block, tokenskip's caches (core/block.py LayerKV, the exported
`past.{l}.key/value/pos/valid`) hold K and V (num_kv_heads x head_dim each, in the model dtype)
plus the token's original position (int64) and a validity flag (bool). `index_bytes` counts those
two; pass 0 for the bare K/V figure other servers quote. The serving scheduler admits sequences
against a budget of these bytes (`tokenskip serve --kv-cache-gb`), which is how a routed server
admits more concurrent sequences than a dense one.
"""

from __future__ import annotations

from .schedule import Schedule

INDEX_BYTES = 8 + 1  # int64 position + bool validity per cached token per block

_ITEMSIZE = {"float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
             "float64": 8, "fp8": 1, "float8": 1, "int8": 1}


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype, a numpy dtype or a name ('float16', 'bf16', ...)."""
    size = getattr(dtype, "itemsize", None)  # torch.dtype (>= 2.1) and numpy dtypes
    if isinstance(size, int) and size > 0:
        return size
    name = str(dtype).replace("torch.", "").lower()
    if name not in _ITEMSIZE:
        raise ValueError(f"unknown KV-cache dtype {dtype!r} (choose from {', '.join(sorted(_ITEMSIZE))})")
    return _ITEMSIZE[name]


def kv_dims(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of an HF config (or any object with those fields)."""
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    d = getattr(config, "head_dim", None) or config.hidden_size // nh
    return config.num_hidden_layers, nkv, d


def cached_tokens(num_layers: int, schedule: Schedule | None, prompt_len: int, new_tokens: int,
                  kv_policy: str = "skip") -> list[int]:
    """Tokens each block caches after prefilling `prompt_len` tokens and decoding `new_tokens`."""
    if kv_policy not in ("skip", "dense"):
        raise ValueError(f"kv_policy must be 'skip' or 'dense', got {kv_policy!r}")
    if schedule is not None and schedule.num_layers != num_layers:
        raise ValueError(f"schedule has {schedule.num_layers} blocks, the model has {num_layers}")
    out = []
    for layer in range(num_layers):
        routed = schedule is not None and schedule.is_routed(layer) and kv_policy == "skip"
        out.append((schedule.keep_count(layer, prompt_len) if routed else prompt_len) + new_tokens)
    return out


def kv_cache_bytes(config, schedule: Schedule | None, prompt_len: int, new_tokens: int, kv_policy: str = "skip",
                   dtype="float32", index_bytes: int = INDEX_BYTES) -> int:
    """Bytes of one sequence's KV cache (all blocks) holding the prompt and `new_tokens` decoded
    tokens. schedule None (or an unrouted model) = dense."""
    if prompt_len < 1 or new_tokens < 0:
        raise ValueError(f"prompt_len must be >= 1 and new_tokens >= 0, got {prompt_len}, {new_tokens}")
    layers, nkv, d = kv_dims(config)
    per_token = 2 * nkv * d * dtype_bytes(dtype) + index_bytes  # K + V + position/validity
    return per_token * sum(cached_tokens(layers, schedule, prompt_len, new_tokens, kv_policy))
