"""Shared fixtures: a tiny random Llama (fast, no downloads) and the real default model (slow)."""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(path, seed: int = 0, layers: int = 4):
    """A tiny random LlamaForCausalLM saved as a local HF folder (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(path)
    model.requires_grad_(False)
    return model, path


@pytest.fixture(scope="session")
def smollm2():
    from tokenskip.models import load_model

    return load_model("smollm2-135m")
