"""Shared fixtures: a tiny random Llama (fast, no downloads) and the real default model (slow)."""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(path, seed: int = 0, layers: int = 4):
    """A tiny random LlamaForCausalLM saved as a local HF folder (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rope_theta=10000.0,
                      eos_token_id=1)  # the char tokenizer's <eos> (LlamaConfig's default 2 is a space there)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def random_learned_router(seed: int = 0):
    """A LearnedRouter with random weights (a stand-in for a trained one: its rankings are not
    recency's, so routing and export paths are exercised for real)."""
    from tokenskip.routers import LearnedRouter

    torch.manual_seed(seed)
    router = LearnedRouter()
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    router.feature_std.fill_(0.5)
    return router


def export_tiny(model, name: str, routed, cfg, out, **kw) -> dict:
    """exporter.export_model for a test model held in memory (a tokenizer stub: nothing to save)."""
    import types

    from tokenskip.export import exporter

    loaded = types.SimpleNamespace(model=model, tokenizer=types.SimpleNamespace(save_pretrained=lambda p: None),
                                   name=name)
    return exporter.export_model(loaded, routed, cfg, out, **kw)


def bench_serve_args(model_dir, *extra) -> list[str]:
    """`tokenskip bench-serve` on a tiny local model, PyTorch servers, one thread, 40-token prompts
    and 4 new tokens, plus `extra` flags."""
    return ["--backend", "torch", "--model", str(model_dir), "--sparsity", "0.5", "--prompt-len", "40",
            "--max-tokens", "4", "--threads", "1", *map(str, extra)]


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_char_tokenizer(path, vocab_size: int | None = None, chat_template: str | None = None):
    """A character-level tokenizer saved next to a model: <unk>=0, <eos>=1, printable ASCII at ids
    2..96. With vocab_size, ids 97..vocab_size-1 become one distinct non-ASCII character each, so
    EVERY id the model can emit decodes to exactly one character (text length = token count).
    chat_template: a Jinja chat template (CHAT_TEMPLATE is a small one)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    for i in range(len(vocab), vocab_size or 0):
        vocab[chr(0x100 + i)] = i  # Latin Extended and beyond: single characters, never ASCII
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(path)
    return tok


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is fastest, and immune to a busy shared machine. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def lib():
    """The TensorRT plugin library, compiled once per session for sm_90 (tokenskip.plugins.testing);
    skips with the reason when the `cuda` extra (nvcc) is not installed."""
    from tokenskip.errors import UserError
    from tokenskip.plugins.testing import compiled_library

    try:
        return compiled_library("90")
    except UserError as exc:
        if "nvcc" in str(exc):
            print(f"SKIP REASON: {exc}")
            pytest.skip(f"CUDA compiler extra not installed: {exc}")
        raise


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(path)
    model.requires_grad_(False)
    return model, path


@pytest.fixture(scope="session")
def tiny_deploy(tmp_path_factory):
    """(model, folder): a tiny random Llama (seed 1) + char tokenizer, loadable with --model <folder>."""
    path = tmp_path_factory.mktemp("tiny-deploy")
    model = make_tiny_llama(path, seed=1)
    make_char_tokenizer(path)
    model.requires_grad_(False)
    return model, path


@pytest.fixture(scope="session")
def tiny_export(tiny_deploy, tmp_path_factory):
    """(routed, folder): the tiny model exported once per session (static router, uneven schedule,
    kv_policy=skip), shared by the runtime and engine-build tests."""
    pytest.importorskip("onnxruntime")
    exporter = pytest.importorskip("tokenskip.export.exporter")
    from tokenskip.config import build_routed
    from tokenskip.models import load_model
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import StaticRouter
    from tokenskip.schedule import Schedule

    _, folder = tiny_deploy
    lm = load_model(str(folder))
    _, cfg = build_routed(lm.model, router="static", sparsity=0.3, model_name=str(folder))
    sched = Schedule((0.0, 0.5, 0.3, 0.6))
    cfg.schedule = list(sched.sparsity)
    routed = RoutedModel(lm.model, sched, StaticRouter())
    out = tmp_path_factory.mktemp("tiny-export") / "exp"
    exporter.export_model(lm, routed, cfg, out, max_seq_len=64, check=False)
    return routed, out


@pytest.fixture(scope="session")
def smollm2():
    from tokenskip.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_export(smollm2, tmp_path_factory):
    """ONE real export of smollm2-135m (static router, overall 0.3, kv_policy=skip) shared by the
    export, engine-build and deploy tests (about 30 s on 2 cores)."""
    from tokenskip.config import build_routed
    from tokenskip.export.exporter import export_model

    out = tmp_path_factory.mktemp("smol-export") / "static-0.3-skip"
    routed, cfg = build_routed(smollm2.model, router="static", sparsity=0.3, kv_policy="skip",
                               model_name="smollm2-135m")
    export_model(smollm2, routed, cfg, out, max_seq_len=2048)
    return out


def metric_samples(url: str) -> dict:
    """A live server's /metrics as {(sample name, sorted label items): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text)
            for s in fam.samples}


@pytest.fixture(scope="session")
def tiny_served(tmp_path_factory):
    """A folder `tokenskip serve --model` loads in a subprocess: tiny random Llama (seed 1) + a 256-id
    char tokenizer (every id decodes to one character); the model's EOS is the tokenizer's."""
    path = tmp_path_factory.mktemp("tiny-served")
    make_tiny_llama(path, seed=1)
    make_char_tokenizer(path, vocab_size=256)
    return path


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """(model, tokenizer, folder): tiny random Llama (seed 1) + a 256-id char tokenizer with a chat
    template; the model's EOS is the tokenizer's (make_tiny_llama), so servers stop where it says."""
    path = tmp_path_factory.mktemp("tiny-chat")
    model = make_tiny_llama(path, seed=1)
    tok = make_char_tokenizer(path, vocab_size=256, chat_template=CHAT_TEMPLATE)
    model.requires_grad_(False)
    return model, tok, path
