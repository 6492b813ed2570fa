"""Model-family adapters (tokenskip.families): a family with other module names is added by
registering one Family, and every path that runs blocks (routed prefill, decode, mask mode,
threshold-skip decoding, the ShortGPT baseline) then gives exactly the numbers it gives for the
original Llama layout. Also: the four built-ins resolve on real HF classes, and an unknown
model type is a one-line UserError."""

from __future__ import annotations

import copy

import pytest
import torch

from tokenskip import families
from tokenskip.errors import UserError
from tokenskip.families import Family, family_of, register_family
from tokenskip.routed import RoutedModel
from tokenskip.routers import LearnedRouter, StaticRouter
from tokenskip.schedule import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")

RENAMED = Family("renamed-llama", layers="backbone.blocks", embed_tokens="backbone.tok", rotary_emb="backbone.rope",
                 norm="backbone.final_norm", lm_head="head", input_norm="ln1", attn="attn", post_attn_norm="ln2",
                 mlp="ffn", q_proj="wq", k_proj="wk", v_proj="wv", o_proj="wo",
                 llama_rms_norms=frozenset({"LlamaRMSNorm"}))


def _move(parent: torch.nn.Module, old: str, new: str) -> None:
    module = getattr(parent, old)
    delattr(parent, old)  # the old name is gone: any hard-coded HF name now raises AttributeError
    setattr(parent, new, module)


@pytest.fixture(scope="module")
def pair():
    """(original tiny LlamaForCausalLM, a copy with every module routing touches renamed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rope_theta=10000.0)
    original = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    renamed = copy.deepcopy(original)
    _move(renamed, "model", "backbone")
    _move(renamed, "lm_head", "head")
    for old, new in [("layers", "blocks"), ("embed_tokens", "tok"), ("rotary_emb", "rope"), ("norm", "final_norm")]:
        _move(renamed.backbone, old, new)
    for layer in renamed.backbone.blocks:
        for old, new in [("self_attn", "attn"), ("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2"),
                         ("mlp", "ffn")]:
            _move(layer, old, new)
        for p in "qkvo":
            _move(layer.attn, f"{p}_proj", f"w{p}")
    renamed.config.model_type = "renamed-llama"
    return original, renamed


@pytest.fixture
def registered(monkeypatch):
    """RENAMED registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))
    return register_family(RENAMED)


def batch(vocab: int, seq: int = 24, padded: bool = True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    if padded:
        mask[1, :5] = 0  # left padding
    return ids, mask


def test_renamed_model_is_not_reachable_by_hf_names(pair):
    _, renamed = pair
    assert not hasattr(renamed, "model") and not hasattr(renamed.backbone.blocks[0], "self_attn")
    with pytest.raises(UserError, match="'renamed-llama' is not supported"):
        RoutedModel(renamed, Schedule.dense(3), None)  # not registered: refused, not guessed


@pytest.mark.parametrize("padded", [False, True])
def test_renamed_family_dense_reproduces_hf(pair, registered, padded):
    original, renamed = pair
    ids, mask = batch(original.config.vocab_size, padded=padded)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = original(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # [B,S,V]
        same_code = RoutedModel(original, Schedule.dense(3), None)(ids, mask).logits
        got = RoutedModel(renamed, Schedule.dense(3), None)(ids, mask).logits
    assert torch.equal(got, same_code)
    assert torch.equal(got[mask.bool()], ref[mask.bool()])  # every real position, bit for bit (padding: garbage)


@pytest.mark.parametrize("kv_policy", ["skip", "dense"])
def test_renamed_family_routed_equals_original(pair, registered, kv_policy):
    """Prefill (gather), mask emulation and cached decode: bit-identical across the two layouts."""
    original, renamed = pair
    sched = Schedule((0.0, 0.5, 0.4))
    ids, mask = batch(original.config.vocab_size)
    a_model = RoutedModel(original, sched, StaticRouter(), kv_policy=kv_policy)
    b_model = RoutedModel(renamed, sched, StaticRouter(), kv_policy=kv_policy)
    with torch.no_grad():
        for kw in (dict(mode="gather", trace=True), dict(mode="mask", n_tail=4, trace=True)):
            a, b = a_model(ids, mask, **kw), b_model(ids, mask, **kw)
            assert torch.equal(a.logits, b.logits)
            assert [t.k for t in b.traces] == [t.k for t in a.traces]
            assert b.traces[1].k < ids.shape[1]  # routing really skipped tokens
        ids1, mask1 = ids[:1], mask[:1]
        la, ca = a_model.prefill(ids1, mask1)
        lb, cb = b_model.prefill(ids1, mask1)
        assert torch.equal(la, lb) and [c.length for c in ca] == [c.length for c in cb]
        token, position = la.argmax(-1, keepdim=True), mask1.sum(-1, keepdim=True)  # [1,1]
        assert torch.equal(a_model.decode_step(token, position, ca)[0], b_model.decode_step(token, position, cb)[0])


def test_renamed_family_threshold_skip_and_shortgpt(pair, registered):
    """The two other block drivers: threshold-skip decoding (its kv_policy=dense K/V of a skipped
    token included) and ShortGPT's Block Influence."""
    from tokenskip.deploy.runtime.threshold_skip import threshold_decode_step
    from tokenskip.train.baselines import block_influence

    original, renamed = pair
    torch.manual_seed(2)
    router = LearnedRouter()
    router.mlp[2].bias.data.fill_(-20.0)  # keep probability ~0: every routed block skips the new token
    sched = Schedule((0.0, 0.5, 0.4))
    ids, mask = batch(original.config.vocab_size, padded=False)
    out = []
    for model in (original, renamed):
        routed = RoutedModel(model, sched, router, kv_policy="dense")
        with torch.no_grad():
            logits, cache = routed.prefill(ids[:1])
            step = threshold_decode_step(routed, logits.argmax(-1, keepdim=True), torch.tensor([[ids.shape[1]]]),
                                         cache)
        out.append(step)
    (la, ca, sa), (lb, cb, sb) = out
    assert sa == sb == [1, 2] and torch.equal(la, lb)
    assert all(torch.equal(x.key, y.key) and torch.equal(x.value, y.value) for x, y in zip(ca, cb))
    assert block_influence(renamed, ids) == block_influence(original, ids)


@pytest.mark.parametrize("name", ["Llama", "Mistral", "Qwen2", "Qwen3"])
def test_builtin_families_resolve_real_hf_classes(name):
    """Each built-in finds every module of a real tiny HF model, lists its RMSNorm class as the
    fused kernel's formula, and its routed dense forward equals HF's bit for bit."""
    import transformers

    cfg = getattr(transformers, f"{name}Config")(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                 max_position_embeddings=512, head_dim=16)
    torch.manual_seed(3)
    model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval().requires_grad_(False)
    family = family_of(model)
    assert family.model_type == name.lower()
    parts = family.layer_parts(family.model_parts(model).layers[0])
    assert family.is_llama_rms_norm(parts.input_norm) and family.is_llama_rms_norm(family.model_parts(model).norm)
    assert (parts.q_norm is not None) == (name == "Qwen3") == (parts.k_norm is not None)
    ids, mask = batch(256)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = RoutedModel(model, Schedule.dense(2), None)(ids, mask).logits
    assert torch.equal(got[mask.bool()], ref[mask.bool()])


def test_unknown_model_type_is_one_line_user_error():
    from transformers import GPT2Config

    with pytest.raises(UserError) as info:
        family_of(GPT2Config())
    assert str(info.value) == "model type 'gpt2' is not supported (supported: llama, mistral, qwen2, qwen3)"
    with pytest.raises(UserError, match="model type None is not supported"):
        family_of(object())


def test_registry_refuses_a_second_adapter_for_a_type(registered):
    assert register_family(RENAMED) is RENAMED  # the same adapter again: a no-op
    with pytest.raises(ValueError, match="already has a family adapter"):
        register_family(Family("llama", attn="attention"))
    with pytest.raises(ValueError, match="q_norm and k_norm go together"):
        Family("half", q_norm="q_norm")
    assert families.supported_model_types()[-1] == "renamed-llama"
