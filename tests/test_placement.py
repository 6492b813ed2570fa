"""A model placed by accelerate (load_model(device_map=...), here with blocks offloaded to disk, the
part of a multi-GPU / 70B placement that runs on a CPU): the routed model runs each block where
accelerate put it and computes exactly what the normally loaded model computes, in gather
forward, prefill + cached decode, and router training (mask mode, gradients)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")

from tokenskip.models import load_model  # noqa: E402
from tokenskip.routed import RoutedModel  # noqa: E402
from tokenskip.schedule import Schedule  # noqa: E402

from conftest import random_learned_router  # noqa: E402

OFFLOADED = (1, 3)


def offload_map(layers: int) -> dict:
    """Blocks OFFLOADED on disk, everything else in CPU RAM."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i in OFFLOADED else "cpu" for i in range(layers)})
    return device_map


@pytest.fixture(scope="module")
def pair(tiny_deploy, tmp_path_factory):
    _, folder = tiny_deploy
    plain = load_model(str(folder))
    placed = load_model(str(folder), device_map=offload_map(plain.model.config.num_hidden_layers),
                        offload_folder=tmp_path_factory.mktemp("offload"))
    router = random_learned_router()
    sched = Schedule((0.0, 0.5, 0.4, 0.0))

    def routed(lm):
        return RoutedModel(lm.model, sched, router, kv_policy="skip", score_window=8).eval()

    return routed(plain), routed(placed), router


def resident(routed, layer):
    return routed.layers[layer].self_attn.q_proj.weight.device.type != "meta"


def test_offloaded_blocks_are_not_resident(pair):
    _, placed, _ = pair
    assert all(not resident(placed, i) for i in OFFLOADED) and resident(placed, 0)


def test_forward_prefill_and_decode_match(pair):
    plain, placed, _ = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        a, b = plain(ids, mask, trace=True), placed(ids, mask, trace=True)
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6)
        for ta, tb in zip(a.traces, b.traces):
            assert (ta.index is None) == (tb.index is None)
            if ta.index is not None:
                assert torch.equal(ta.index, tb.index)
        la, ca = plain.prefill(ids, mask)
        lb, cb = placed.prefill(ids, mask)
        tok, pos = la.argmax(-1, keepdim=True), mask.sum(-1, keepdim=True)
        for _ in range(4):
            la, ca = plain.decode_step(tok, pos, ca)
            lb, cb = placed.decode_step(tok, pos, cb)
            torch.testing.assert_close(lb, la, rtol=0, atol=1e-6)
            tok, pos = la.argmax(-1, keepdim=True), pos + 1
    assert all(not resident(placed, i) for i in OFFLOADED)  # dropped again after every call


def test_router_gradients_through_offloaded_blocks_match(pair):
    plain, placed, router = pair
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(2))
    grads = []
    for routed in (plain, placed):
        router.zero_grad()
        out = routed(ids, None, mode="mask", ste=True)
        out.logits.float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in router.parameters()])
    assert any(g.abs().sum() > 0 for g in grads[0])  # the check can fail: gradients do reach the router
    for ga, gb in zip(*grads):
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-6)


def test_block_level_hooks_are_run_by_the_routed_model(pair, monkeypatch):
    """accelerate hooks on the decoder layer itself (what a multi-GPU device_map puts on each block:
    AlignDevicesHook(place_submodules=True); here with offload, so a hook that did not run leaves
    meta weights). The routed model never calls layer.forward, so it must run them: without
    tokenskip.placement the same model fails."""
    import copy

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from tokenskip import placement

    plain, _, router = pair
    model = copy.deepcopy(plain.model)
    for i in OFFLOADED:
        layer = model.model.layers[i]
        weights = {k: v.clone() for k, v in layer.state_dict().items()}
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights,
                                                   place_submodules=True))
    hooked = RoutedModel(model, plain.schedule, router, kv_policy="skip", score_window=8).eval()
    assert all(not resident(hooked, i) for i in OFFLOADED)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = plain(ids).logits
        torch.testing.assert_close(hooked(ids).logits, want, rtol=0, atol=1e-6)
        la, ca = plain.prefill(ids)
        lb, cb = hooked.prefill(ids)
        tok, pos = la.argmax(-1, keepdim=True), torch.full((2, 1), ids.shape[1])
        torch.testing.assert_close(hooked.decode_step(tok, pos, cb)[0], plain.decode_step(tok, pos, ca)[0],
                                   rtol=0, atol=1e-6)
        assert all(not resident(hooked, i) for i in OFFLOADED)
        monkeypatch.setattr(placement, "enter", lambda layer, *tensors: tensors)
        monkeypatch.setattr(placement, "leave", lambda layer: None)
        with pytest.raises((RuntimeError, NotImplementedError)):  # meta weights: the hooks did not run
            hooked(ids)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (a model split between cuda:0 and the CPU): run on the GPU machine")
def test_model_split_between_cuda_and_cpu_matches(tiny_deploy, pair):
    """Blocks on two devices (what a 70B over several GPUs does): the hidden state, positions, masks
    and the attention-score table follow each block, the router's inputs go to the router's device."""
    plain, _, router = pair
    _, folder = tiny_deploy
    n = plain.model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": 0 if i < n // 2 else "cpu" for i in range(n)})
    split = load_model(str(folder), device_map=device_map)
    routed = RoutedModel(split.model, plain.schedule, router, kv_policy="skip", score_window=8).eval()
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = plain(ids).logits
        got = routed(ids.cuda()).logits
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-4)
        la, ca = plain.prefill(ids)
        lb, cb = routed.prefill(ids.cuda())
        tok, pos = la.argmax(-1, keepdim=True), torch.full((2, 1), ids.shape[1])
        torch.testing.assert_close(routed.decode_step(tok.cuda(), pos.cuda(), cb)[0].cpu(),
                                   plain.decode_step(tok, pos, ca)[0], rtol=0, atol=1e-4)


def test_fit_on_an_offloaded_model_matches_the_loaded_model(tiny_deploy, tmp_path):
    """`run_fit` (search, train, re-search, train) given the disk-offloaded model: the same schedule
    and router weights as from the normally loaded one (seed 0, tiny budget)."""
    from tokenskip.config import load_routing
    from tokenskip.train.fit import FitSettings, run_fit

    _, folder = tiny_deploy
    plain = load_model(str(folder))
    models = {"plain": plain, "placed": load_model(str(folder), device_map=offload_map(
        plain.model.config.num_hidden_layers), offload_folder=tmp_path / "offload")}
    for name, lm in models.items():
        run_fit(str(folder), 0.3, tmp_path / name, FitSettings(budget="tiny"), lm=lm, progress=False,
                log=lambda msg: None)
    (cfg_a, router_a), (cfg_b, router_b) = (load_routing(tmp_path / name / "routers") for name in models)
    assert cfg_a.schedule == cfg_b.schedule
    for a, b in zip(router_a.state_dict().values(), router_b.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
