"""Try TensorRT-RTX 1.7 engines (built on a CPU-only machine, with tokenskip plugins) on this GPU."""
import glob, os, sys, traceback
import numpy as np, torch, onnx
from onnx import numpy_helper
sys.path.insert(0, "/tmp/rtx/site")
import tensorrt_rtx_bindings as trt
print("tensorrt_rtx", trt.__version__, "| torch", torch.__version__, "|", torch.cuda.get_device_name(0),
      "sm_%d%d" % torch.cuda.get_device_capability(0))

class Log(trt.ILogger):
    def __init__(self):
        trt.ILogger.__init__(self)
    def log(self, sev, msg):
        if int(sev) <= int(trt.ILogger.WARNING):
            print(f"  [{str(sev).split('.')[-1]}] {msg}")

log = Log()
E = os.environ["E"]
lib = f"{E}/libtokenskip_plugins.so"
reg = trt.get_plugin_registry()
try:
    h = reg.load_library(lib)
    print("load_library:", h is not None, [(c.name, c.plugin_namespace) for c in reg.all_creators if c.plugin_namespace == "tokenskip"])
except Exception as exc:
    print("load_library failed:", exc)

m = onnx.load(f"{E}/block.onnx")
W = numpy_helper.to_array(m.graph.initializer[0]).astype(np.float32)
def reference(x, s, keep_num=3, keep_den=5):
    B, S, H = x.shape; k = min(S, max(1, (keep_num * S + keep_den - 1) // keep_den))
    y = x.astype(np.float32).copy(); idx = []
    for b in range(B):
        i = np.sort(np.argsort(-s[b].astype(np.float64), kind="stable")[:k]); idx.append(i)
        y[b, i] += (x[b, i].astype(np.float32) @ W)
    return y, np.stack(idx)

rt = trt.Runtime(log)
for path in sorted(glob.glob(f"{E}/block_SM8[0].engine")):
    print("==", os.path.basename(path))
    try:
        eng = rt.deserialize_cuda_engine(open(path, "rb").read())
        print("  deserialize:", "ok" if eng is not None else "returned None")
        if eng is None:
            continue
        ctx = eng.create_execution_context()
        print("  create_execution_context:", "ok" if ctx is not None else "returned None")
        if ctx is None:
            continue
        B, S, H = 2, 300, 64
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, S, H, generator=g).half().cuda(); s = torch.randn(B, S, generator=g).cuda()
        ctx.set_input_shape("x", (B, S, H)); ctx.set_input_shape("scores", (B, S))
        k = tuple(ctx.get_tensor_shape("index"))
        y = torch.empty(B, S, H, dtype=torch.half, device="cuda"); idx = torch.empty(k, dtype=torch.int64, device="cuda")
        for n, t in (("x", x), ("scores", s), ("y", y), ("index", idx)):
            ctx.set_tensor_address(n, t.data_ptr())
        st = torch.cuda.Stream()
        ok = ctx.execute_async_v3(st.cuda_stream); st.synchronize()
        print("  execute_async_v3:", ok)
        ry, ri = reference(x.float().cpu().numpy().astype(np.float16), s.cpu().numpy())
        print("  index equal:", np.array_equal(idx.cpu().numpy(), ri), "max |y - ref|:", float(np.abs(y.float().cpu().numpy() - ry).max()))
    except Exception as exc:
        print("  error:", type(exc).__name__, exc)

print("== build on this GPU (compute capability CURRENT)")
try:
    b = trt.Builder(log); net = b.create_network(0); p = trt.OnnxParser(net, log)
    print("  parse:", p.parse(m.SerializeToString()))
    cfg = b.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
    prof = b.create_optimization_profile()
    prof.set_shape("x", (1, 1, 64), (2, 256, 64), (4, 8192, 64)); prof.set_shape("scores", (1, 1), (2, 256), (4, 8192))
    cfg.add_optimization_profile(prof)
    eng = b.build_serialized_network(net, cfg)
    print("  build_serialized_network:", None if eng is None else f"{eng.nbytes} bytes")
except Exception as exc:
    print("  error:", type(exc).__name__, exc)
if eng is not None:
    e2 = rt.deserialize_cuda_engine(bytes(eng))
    print("  deserialize CURRENT engine:", "ok" if e2 is not None else "returned None")
    if e2 is not None:
        ctx = e2.create_execution_context()
        B, S, H = 2, 300, 64
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, S, H, generator=g).half().cuda(); s = torch.randn(B, S, generator=g).cuda()
        ctx.set_input_shape("x", (B, S, H)); ctx.set_input_shape("scores", (B, S))
        k = tuple(ctx.get_tensor_shape("index"))
        y = torch.empty(B, S, H, dtype=torch.half, device="cuda"); idx = torch.empty(k, dtype=torch.int64, device="cuda")
        for n, t in (("x", x), ("scores", s), ("y", y), ("index", idx)):
            ctx.set_tensor_address(n, t.data_ptr())
        st = torch.cuda.Stream()
        ok = ctx.execute_async_v3(st.cuda_stream); st.synchronize()
        ry, ri = reference(x.float().cpu().numpy().astype(np.float16), s.cpu().numpy())
        print("  execute:", ok, "index shape", k, "index equal:", np.array_equal(idx.cpu().numpy(), ri),
              "max |y - ref|:", float(np.abs(y.float().cpu().numpy() - ry).max()))
        layers = []
        insp = e2.create_engine_inspector()
        print("  engine layers:", insp.get_engine_information(trt.LayerInformationFormat.ONELINE)[:600])
