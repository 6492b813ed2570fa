"""The plugins inside a TensorRT-RTX engine build (CPU-only, ahead of time): TopKGather with its bool
`valid` input, and ScatterTokens in place through IPluginV3OneBuildV2::getAliasedInput.

Evidence that the alias is accepted: with the preview feature TensorRT-RTX asks ScatterTokens for its
alias (the library counts the grants) and builds the engine; offering the alias without the preview
feature makes the build fail, so TensorRT does act on it; the default build (switch off) stays the
copy path. Running the engine needs a GPU TensorRT-RTX supports (not our SM90 machines)."""

from __future__ import annotations

import ctypes

import pytest

pytest.importorskip("onnx")
pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX extra not installed")

from tokenskip.deploy.engine.flavour import get_flavour  # noqa: E402
from tokenskip.plugins import aliasing, testing  # noqa: E402


@pytest.fixture(scope="module")
def lib(lib):
    """conftest's compiled library, its plugins loaded into TensorRT-RTX."""
    get_flavour("tensorrt-rtx").load_plugins(lib)
    return lib


def _build(lib, dtype="float16", in_place=None, raw_switch=False):
    """Parse the mini routed block (with a real mask input) and build it; returns (engine or None,
    plugin layer types, whether the alias was offered)."""
    backend = get_flavour("tensorrt-rtx")
    trt = backend.trt
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(testing.routed_block_model(64, dtype, with_mask=True).SerializeToString())
    plugins = sorted(ident[0] for i in range(network.num_layers)
                     if (ident := backend.plugin_of(network.get_layer(i))) is not None)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, width in (("x", [64]), ("scores", []), ("mask", [])):
        profile.set_shape(name, [1, 1, *width], [2, 512, *width], [4, 32768, *width])
    config.add_optimization_profile(profile)
    if raw_switch:  # offer the alias without the preview feature
        handle = ctypes.CDLL(str(lib))
        handle.tokenskip_plugins_set_aliased_io(1)
        try:
            return builder.build_serialized_network(network, config), plugins, True
        finally:
            handle.tokenskip_plugins_set_aliased_io(0)
    with aliasing.in_place_scatter(trt, config, lib, enable=bool(in_place)) as on:
        return builder.build_serialized_network(network, config), plugins, on


def _plan_names_both_plugins(engine) -> bool:
    """The serialized plan (None when the build failed) still holds both plugin layers by name."""
    return engine is not None and all(name in bytes(engine) for name in (b"ScatterTokens", b"TopKGather"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_in_place_scatter_is_accepted(lib, dtype):
    assert aliasing.library_supports(lib) and aliasing.tensorrt_supports(get_flavour("tensorrt-rtx").trt)
    before = aliasing.aliases_granted(lib)
    engine, plugins, on = _build(lib, dtype, in_place=True)
    assert on and _plan_names_both_plugins(engine)
    assert plugins == ["ScatterTokens", "TopKGather"]  # both plugins, TopKGather with its bool valid input
    assert aliasing.aliases_granted(lib) > before  # TensorRT asked for and got the alias


def test_default_build_is_the_copy_path(lib):
    before = aliasing.aliases_granted(lib)
    engine, plugins, on = _build(lib, in_place=False)
    assert not on and _plan_names_both_plugins(engine)
    assert plugins == ["ScatterTokens", "TopKGather"]
    assert aliasing.aliases_granted(lib) == before  # no alias offered


def test_alias_without_the_preview_feature_fails_the_build(lib):
    """TensorRT-RTX 1.7 acts on the alias: without PreviewFeature.ALIASED_PLUGIN_IO_10_03 it refuses the
    build (which is why the library's switch is off unless in_place_scatter turns both on)."""
    engine, _, _ = _build(lib, raw_switch=True)
    assert engine is None
    engine, _, _ = _build(lib, in_place=False)  # the switch was reset: plain builds work again
    assert _plan_names_both_plugins(engine)
