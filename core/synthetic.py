"""LLaMA-shaped models with random weights, built from a config: no download, no checkpoint.

Speed and memory do not depend on weight values, so the GPU benchmark (a LLaMA-2-7B shape) and
`tokenskip bench-export --random-llama` (a 1.1B shape) measure models made here. The weights are
created directly on the target device in the target dtype: a 7B model built in fp32 on the CPU
first would need 28 GB of host memory and a copy, for numbers nobody reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
# about 1.1B parameters (TinyLlama's shape): hidden 2048, 22 layers, GQA 32/4
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def build_model(shape: dict, device: str | torch.device, dtype: torch.dtype):
    """A random-weight LlamaForCausalLM of `shape` (LlamaConfig keyword arguments), created on
    `device` in `dtype`, in eval mode with gradients off. Seed with torch.manual_seed first for
    repeatable weights. Attention runs through SDPA (HF's fast default, the GPU baseline)."""
    import torch  # here, so that the shapes above import without torch (bench-export's parent process)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)  # allocated and initialised in place: no fp32 host copy
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype).eval().requires_grad_(False)
    return model
