import json, sys, numpy as np, onnx
# run from the repository root with the venv active
from tokenskip.plugins.testing import routed_block_model
from tokenskip.deploy.engine.flavour import get_backend
be = get_backend("tensorrt-rtx"); trt = be.trt
lib = sys.argv[1]
be.load_plugins(lib)
out = "/tmp/rtxpack/eng"
m = routed_block_model(hidden=64, dtype="float16", keep_num=3, keep_den=5, min_keep=1)
onnx.save(m, f"{out}/block.onnx")
for cc in ("SM80", "SM86", "SM89"):
    lg = trt.Logger(trt.Logger.WARNING)
    b = trt.Builder(lg); net = b.create_network(0); p = trt.OnnxParser(net, lg)
    assert p.parse(m.SerializeToString()), [p.get_error(i).desc() for i in range(p.num_errors)]
    cfg = b.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(getattr(trt.ComputeCapability, cc), 0)
    prof = b.create_optimization_profile()
    prof.set_shape("x", (1, 1, 64), (2, 256, 64), (4, 8192, 64)); prof.set_shape("scores", (1, 1), (2, 256), (4, 8192))
    cfg.add_optimization_profile(prof)
    cfg.plugins_to_serialize = [lib]
    eng = b.build_serialized_network(net, cfg)
    print(cc, None if eng is None else eng.nbytes)
    open(f"{out}/block_{cc}.engine", "wb").write(bytes(eng))
