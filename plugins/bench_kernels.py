"""GPU benchmark of the plugin kernels vs PyTorch and vs the device's copy bandwidth.

    python -m tokenskip.plugins.bench_kernels --json OUT.json [--dtype float16] [--iters 200]

For H in {576, 4096, 8192} and S in {1k, 8k, 32k} (batch 1, keep ratio 0.6): checks TopKGather and
ScatterTokens against the numpy reference, then times them with CUDA events (median of many
iterations) and reports achieved GB/s for the bytes each op must move, next to a device-to-device
copy bandwidth measured in the same run (torch clone of a 1 GiB tensor) and to the equivalent
PyTorch ops (topk + sort + gather; index_add).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

HIDDEN = (576, 4096, 8192)
SEQ = (1024, 8192, 32768)
KEEP = (3, 5)  # keep ratio 0.6 as an exact fraction


def _time_us(fn, iters: int, warmup: int = 10) -> float:
    """Median wall time of fn() on the GPU in microseconds (one event pair per iteration)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for a, b in zip(starts, ends):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) * 1e3


def copy_bandwidth_gbs(iters: int) -> float:
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    us = _time_us(lambda: x.clone(), max(20, iters // 5))
    return 2 * x.numel() / (us * 1e-6) / 1e9  # read + write


def bench_case(lib, H: int, S: int, dtype, iters: int) -> dict:
    import torch

    from tokenskip import ops_reference as R

    from . import kernels

    B = 1
    k = R.keep_count(S, *KEEP, 1)
    elem = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device="cuda").manual_seed(H + S)
    hidden = torch.randn(B, S, H, device="cuda", generator=g).to(dtype)   # [B,S,H]
    scores = torch.randn(B, S, device="cuda", generator=g)                 # [B,S] fp32
    scores[:, 0] = float("inf")                                            # a forced token
    delta = torch.randn(B, k, H, device="cuda", generator=g).to(dtype)     # [B,k,H]

    # correctness before timing
    kept, index = kernels.topk_gather(lib, hidden, scores, k)
    _, ref_index = R.topk_gather(np.zeros((B, S, 1), np.float32), scores.cpu().numpy(), *KEEP, 1)
    ok_index = bool(np.array_equal(index.cpu().numpy(), ref_index))
    ok_kept = bool(torch.equal(kept, hidden[0, index[0]][None]))
    ws = kernels.workspace(lib, "scatter_tokens", B, S, H, k)
    out = kernels.scatter_tokens(lib, hidden, delta, index, ws=ws)
    ref_out = hidden[0].index_add(0, index[0], delta[0])[None]  # PyTorch adds in the hidden dtype too
    ok_scatter = bool(torch.equal(out, ref_out))

    t_topk = _time_us(lambda: kernels.topk_gather(lib, hidden, scores, k), iters)
    t_select = _time_us(lambda: kernels.topk_select(lib, scores, k), iters)
    t_scatter = _time_us(lambda: kernels.scatter_tokens(lib, hidden, delta, index, out=out, ws=ws), iters)

    def torch_topk_gather():
        idx = torch.topk(scores, k, dim=1).indices.sort(dim=1).values     # [B,k]
        return hidden.gather(1, idx[:, :, None].expand(B, k, H)), idx      # [B,k,H]

    t_torch_topk = _time_us(torch_topk_gather, iters)
    t_torch_scatter = _time_us(lambda: hidden[0].index_add(0, index[0], delta[0]), iters)

    topk_bytes = S * 4 + 2 * k * H * elem + k * 8             # scores, rows read + written, index
    scatter_bytes = 2 * S * H * elem + k * H * elem + k * 8 + 2 * S * 4  # hidden, out, delta, index, inverse map
    return {
        "H": H, "S": S, "B": B, "k": k, "dtype": str(dtype).removeprefix("torch."),
        "correct": {"index": ok_index, "kept": ok_kept, "scatter": ok_scatter},
        "topk_gather_us": round(t_topk, 2), "topk_select_us": round(t_select, 2),
        "topk_gather_gbs": round(topk_bytes / (t_topk * 1e-6) / 1e9, 1),
        "scatter_tokens_us": round(t_scatter, 2),
        "scatter_tokens_gbs": round(scatter_bytes / (t_scatter * 1e-6) / 1e9, 1),
        "torch_topk_sort_gather_us": round(t_torch_topk, 2), "torch_index_add_us": round(t_torch_scatter, 2),
        "speedup_topk_gather": round(t_torch_topk / t_topk, 2),
        "speedup_scatter": round(t_torch_scatter / t_scatter, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_out", type=Path, help="write results here")
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lib", default=None, help="plugin library (default: build for this GPU)")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 2
    from . import build_library

    major, minor = torch.cuda.get_device_capability()
    lib = args.lib or build_library(arch=f"{major}{minor}")
    dtype = getattr(torch, args.dtype)
    result = {"device": torch.cuda.get_device_name(), "capability": f"{major}.{minor}", "torch": torch.__version__,
              "iters": args.iters, "keep_ratio": KEEP[0] / KEEP[1],
              "copy_gbs": round(copy_bandwidth_gbs(args.iters), 1), "cases": []}
    print(f"{result['device']}: device-to-device copy {result['copy_gbs']} GB/s", flush=True)
    for H in HIDDEN:
        for S in SEQ:
            row = bench_case(lib, H, S, dtype, args.iters)
            result["cases"].append(row)
            print(f"H={H:5d} S={S:6d} k={row['k']:6d} ok={all(row['correct'].values())}  "
                  f"TopKGather {row['topk_gather_us']:8.1f} us ({row['topk_gather_gbs']:6.1f} GB/s, select "
                  f"{row['topk_select_us']:6.1f} us; torch {row['torch_topk_sort_gather_us']:8.1f} us)  "
                  f"ScatterTokens {row['scatter_tokens_us']:8.1f} us ({row['scatter_tokens_gbs']:6.1f} GB/s; "
                  f"torch index_add {row['torch_index_add_us']:8.1f} us)", flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if all(all(r["correct"].values()) for r in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
