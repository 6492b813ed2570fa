"""GPU prefill benchmark: PyTorch routed vs dense on a LLaMA-2-7B-shaped model with random weights.

    python -m tokenskip.deploy.bench_gpu --json bench_gpu.json          # H100: about 2 minutes
    python -m tokenskip.deploy.bench_gpu --tiny --json /tmp/tiny.json   # CPU smoke test

Model speed does not depend on weight values, so the model is built from a LlamaConfig with random
bf16 weights directly on the GPU (never materialised on the CPU). Routing: the static router with
the uniform schedule (outer two blocks dense at each end), at S = 1k/2k/4k, batch 1, overall
sparsity 0.22/0.30/0.40, both kv_policies.

Fairness: the RoutedModel runs attention as SDPA with an explicit boolean mask (not flash), so
dense is timed through the very same code with router=None; HF's own dense forward (its SDPA
path, causal flag, no explicit mask) is timed too, for reference. Each (S, config) pair is timed
dense/routed alternately after warm-up, with CUDA events; medians of N are reported with the ideal
speed-up from the FLOP count (tokenskip.flops, full q x T attention as SDPA computes it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=512)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    """Random-weight LlamaForCausalLM created directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype).eval().requires_grad_(False)
    return model


class Timer:
    """CUDA events on a GPU, perf_counter on the CPU; seconds."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def cuda_graphed(fn):
    """Capture fn (static input tensors, static shapes: k_l depends only on S) into a CUDA graph and
    return a replay callable. Routed prefill at S <= 2k on an H100 is bound by Python/launch
    overhead in eager mode; a graph shows what the GPU itself does."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay, graph


@torch.no_grad()
def run(args) -> dict:
    from tokenskip.config import build_routed
    from tokenskip.flops import flops_ratio

    from .bench import alternate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shape = TINY if args.tiny else LLAMA2_7B
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    build_s = time.perf_counter() - t0
    timer = Timer(device)
    info = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "model": "tiny" if args.tiny
            else "llama-2-7b-shaped (random weights)", "build_s": build_s, "repeats": args.repeats,
            "warmup": args.warmup}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    rows = []
    dense_model, _ = build_routed(model, router="dense")
    modes = [m for m in args.modes if m == "eager" or device.startswith("cuda")]
    for mode, seq in [(m, s) for m in modes for s in args.seq_lens]:
        ids = torch.randint(0, shape["vocab_size"], (1, seq), device=device,
                            generator=torch.Generator(device=device).manual_seed(seq))  # [1,S]
        mask = torch.ones_like(ids)
        dense_fn = lambda: dense_model.prefill(ids, mask)  # noqa: E731
        hf_fn = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        keep = []  # graphs stay alive while timed
        if mode == "graph":
            dense_fn, g = cuda_graphed(dense_fn)
            hf_fn, g2 = cuda_graphed(hf_fn)
            keep += [g, g2]
        ref = alternate({"dense": dense_fn, "hf": hf_fn}, args.repeats, args.warmup, timer=timer)
        d_ms, hf_ms = 1e3 * statistics.median(ref["dense"]), 1e3 * statistics.median(ref["hf"])
        rows.append({"mode": mode, "seq": seq, "batch": 1, "sparsity": 0.0, "kv_policy": "-", "dense_ms": d_ms,
                     "routed_ms": d_ms, "hf_dense_ms": hf_ms, "speedup": 1.0, "ideal": 1.0, "efficiency": 1.0})
        print(f"[{mode}] S={seq}: dense (our block code) {d_ms:.2f} ms, HF forward {hf_ms:.2f} ms", file=sys.stderr)
        for kv_policy in args.kv_policies:
            for s in args.sparsities:
                routed, _ = build_routed(model, router="static", sparsity=s, kv_policy=kv_policy)
                routed_fn = lambda: routed.prefill(ids, mask)  # noqa: E731
                if mode == "graph":
                    routed_fn, g3 = cuda_graphed(routed_fn)
                t = alternate({"dense": dense_fn, "routed": routed_fn}, args.repeats, args.warmup, timer=timer)
                if mode == "graph":
                    del g3
                d, r = statistics.median(t["dense"]), statistics.median(t["routed"])
                ideal = 1.0 / flops_ratio(model.config, routed.schedule, seq, 0, kv_policy)
                row = {"mode": mode, "seq": seq, "batch": 1, "sparsity": s, "achieved": routed.schedule.overall(seq),
                       "kv_policy": kv_policy, "dense_ms": 1e3 * d, "routed_ms": 1e3 * r,
                       "dense_p90_ms": 1e3 * sorted(t["dense"])[int(0.9 * (len(t["dense"]) - 1))],
                       "routed_p90_ms": 1e3 * sorted(t["routed"])[int(0.9 * (len(t["routed"]) - 1))],
                       "hf_dense_ms": hf_ms, "speedup": d / r, "ideal": ideal, "efficiency": (d / r) / ideal,
                       "tok_s_dense": seq / d, "tok_s_routed": seq / r}
                rows.append(row)
                print(f"[{mode}] S={seq} s={s:.2f} kv={kv_policy}: dense {1e3 * d:.2f} ms, routed {1e3 * r:.2f} ms, "
                      f"speed-up {d / r:.2f}x (ideal {ideal:.2f}x, efficiency {(d / r) / ideal:.2f})", file=sys.stderr)
                del routed
        del keep
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    info["total_s"] = time.perf_counter() - t0
    return {"info": info, "rows": rows}


def table(result: dict) -> str:
    out = ["| mode | S | sparsity | kv | dense ms | routed ms | HF dense ms | speed-up | ideal | efficiency |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['mode']} | {r['seq']} | {r['sparsity']:.2f} | {r['kv_policy']} | {r['dense_ms']:.2f} | "
                   f"{r['routed_ms']:.2f} | {r['hf_dense_ms']:.2f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | "
                   f"{r['efficiency']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tokenskip.deploy.bench_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--tiny", action="store_true", help="tiny model and lengths (CPU smoke test)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--seq-lens", default=None, help="comma-separated (default 1024,2048,4096; tiny: 64,128)")
    p.add_argument("--sparsities", default="0.22,0.3,0.4")
    p.add_argument("--kv-policies", default="skip,dense")
    p.add_argument("--modes", default="eager,graph",
                   help="eager PyTorch, and/or the same calls replayed as CUDA graphs (GPU only)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 10; tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per side (default 3; tiny: 1)")
    args = p.parse_args(argv)
    args.seq_lens = [int(x) for x in (args.seq_lens or ("64,128" if args.tiny else "1024,2048,4096")).split(",")]
    args.sparsities = [float(x) for x in args.sparsities.split(",")]
    args.kv_policies = [x.strip() for x in args.kv_policies.split(",")]
    args.modes = [x.strip() for x in args.modes.split(",")]
    args.repeats = args.repeats or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    result = run(args)
    print(table(result))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
