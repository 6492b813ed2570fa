"""GPU benchmark of the plugin kernels vs PyTorch and vs the device's copy bandwidth.

    python -m tokenskip.plugins.bench_kernels --json OUT.json [--dtype bfloat16] [--batch 1,8]
        [--hidden 576,4096,8192] [--seq 1024,4096,8192,32768] [--reps 20]
    tokenskip plugins bench --json OUT.json ...                     (the same)

Timing: every variant is captured `--reps` times back to back in one CUDA graph (outputs and
workspace allocated beforehand), and the graph replay is timed with CUDA events (tokenskip.timing's
Timer): kernels only, no allocation, no Python/ctypes time. Median of `--replays` replays after
one untimed replay, divided by reps. PyTorch
baselines are captured and timed the same way. Each case is checked against the numpy reference
first (keep ratio 0.6, left padding on half the rows when B > 1, forced first/last tokens).

Bytes (the minimum each op must move; achieved GB/s = bytes / time, `of_copy` = that / the
device-to-device copy bandwidth measured in the same run, read + write):
- TopKGather: scores + valid read once, index written, k rows read and written.
- ScatterTokens out of place: hidden read, out written, delta read, index read (+ the int32 inverse
  map: memset, k writes, one read). In place: k hidden rows read and written, delta read, index read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tokenskip.timing import Timer, alternate

KEEP = (3, 5, 2)  # keep ratio 0.6 as an exact fraction, min_keep 2 (the routed model's)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _graph_time_us(fn, reps: int, replays: int) -> float:
    """Per-call GPU time of fn() in microseconds: `reps` calls captured in one CUDA graph, replayed
    `replays` times after one untimed replay, each timed with CUDA events (tokenskip.timing); the
    median replay divided by reps."""
    import torch

    fn()  # warm up outside capture (lazy init, autotuning)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture needs a side stream warmed up on its own
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = alternate({"replay": graph.replay}, replays, 1, Timer(cuda_events=True))
    del graph
    return times.median("replay") * 1e6 / reps


def copy_bandwidth_gbs(replays: int) -> float:
    """Device-to-device copy of 2 GiB (read + write bytes per second)."""
    import torch

    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _graph_time_us(lambda: dst.copy_(src), 2, replays)
    del src, dst
    return 2 * (1 << 31) / (us * 1e-6) / 1e9


def _inputs(B: int, S: int, H: int, dtype, seed: int):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(B, S, H, device="cuda", generator=g, dtype=torch.float32).to(dtype)  # [B,S,H]
    scores = torch.randn(B, S, device="cuda", generator=g)                                     # [B,S] fp32
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda")                                  # [B,S]
    for b in range(1, B, 2):  # left padding on every other row, like a batch of prompts
        valid[b, : S // (b + 1)] = False
    first = (~valid).sum(1)                                                                    # [B]
    scores[torch.arange(B), first] = float("inf")  # forced: first and last real token
    scores[:, -1] = float("inf")
    scores[~valid] = float("-inf")
    return hidden, scores, valid


def bench_case(lib, B: int, H: int, S: int, dtype, reps: int, replays: int, copy_gbs: float) -> dict:
    import torch

    from tokenskip import ops
    from tokenskip import ops_reference as R

    from . import kernels

    hidden, scores, valid = _inputs(B, S, H, dtype, seed=B * 131 + H + S)
    k = R.keep_count(S, *KEEP)
    elem = hidden.element_size()
    kept = torch.empty(B, k, H, dtype=dtype, device="cuda")
    index = torch.empty(B, k, dtype=torch.int64, device="cuda")
    tws = kernels.topk_workspace(lib, B, S)
    sws = kernels.scatter_workspace(lib, B, S, H, k)
    delta = torch.randn(B, k, H, device="cuda", dtype=torch.float32).to(dtype)  # [B,k,H]
    out = torch.empty_like(hidden)
    work = hidden.clone()  # the in-place target

    # ---- correctness first (the same calls that are timed)
    kernels.topk_gather_into(lib, hidden, scores, valid, KEEP, kept, index, tws)
    ref_index = R.topk_gather(np.zeros((B, S, 1), np.float32), scores.cpu().numpy(), *KEEP, valid.cpu().numpy())[1]
    correct = {"index": bool(np.array_equal(index.cpu().numpy(), ref_index)),
               "kept": bool(torch.equal(kept, ops.gather_rows(hidden, index)))}
    for algo in ("single", "multi"):
        idx = torch.empty_like(index)
        kernels.topk_select_into(lib, scores, valid, KEEP, idx, tws, algo)
        correct[f"select_{algo}"] = bool(torch.equal(idx, index))
    kernels.scatter_tokens_into(lib, hidden, delta, index, out, sws)
    ref_out = ops.add_rows(hidden, delta, index)  # PyTorch adds in the hidden dtype too
    correct["scatter"] = bool(torch.equal(out, ref_out))
    kernels.scatter_tokens_into(lib, work, delta, index, work, sws)  # out == hidden: the in-place kernel
    correct["scatter_in_place"] = bool(torch.equal(work, ref_out))

    # ---- timings (graph replays, kernels only)
    flat = (index + torch.arange(B, device="cuda")[:, None] * S).view(-1)  # [B*k] rows of work viewed [B*S,H]
    t = {
        "topk_gather": lambda: kernels.topk_gather_into(lib, hidden, scores, valid, KEEP, kept, index, tws),
        "select_single": lambda: kernels.topk_select_into(lib, scores, valid, KEEP, index, tws, "single"),
        "select_multi": lambda: kernels.topk_select_into(lib, scores, valid, KEEP, index, tws, "multi"),
        "scatter_copy": lambda: kernels.scatter_tokens_into(lib, hidden, delta, index, out, sws),
        "scatter_in_place": lambda: kernels.scatter_tokens_into(lib, work, delta, index, work, sws),
        # PyTorch: the plain top-k (no per-row rule) and tokenskip's own PyTorch op (the full rule)
        "torch_topk_sort_gather": lambda: ops.gather_rows(hidden, torch.topk(scores, k, dim=1).indices.sort(1).values),
        "torch_tokenskip_op": lambda: ops.topk_gather(hidden, scores, valid, *KEEP),
        "torch_scatter_add": lambda: ops.add_rows(hidden, delta, index),
        "torch_index_add_in_place": lambda: work.view(B * S, H).index_add_(0, flat, delta.view(B * k, H)),
    }
    us, errors = {}, {}
    for name, fn in t.items():
        try:
            us[name] = round(_graph_time_us(fn, reps, replays), 2)
        except RuntimeError as exc:  # a PyTorch op that cannot be captured: recorded, not fatal
            us[name], errors[name] = float("nan"), str(exc).splitlines()[0][:200]

    row_bytes = H * elem
    topk_bytes = B * (S * 4 + S + k * 8 + 2 * k * row_bytes)
    copy_bytes = B * (2 * S * row_bytes + k * row_bytes + k * 8 + 2 * S * 4 + k * 4)
    inplace_bytes = B * (3 * k * row_bytes + k * 8)

    def gbs(nbytes: int, name: str) -> float:
        return round(nbytes / (us[name] * 1e-6) / 1e9, 1)

    return {
        "B": B, "H": H, "S": S, "k": k, "dtype": str(dtype).removeprefix("torch."),
        "multi_block_auto": kernels.uses_multi_block(lib, B, S), "correct": correct, "us": us, "errors": errors,
        "bytes": {"topk_gather": topk_bytes, "scatter_copy": copy_bytes, "scatter_in_place": inplace_bytes,
                  "saved_by_in_place": copy_bytes - inplace_bytes},
        "gbs": {"topk_gather": gbs(topk_bytes, "topk_gather"), "scatter_copy": gbs(copy_bytes, "scatter_copy"),
                "scatter_in_place": gbs(inplace_bytes, "scatter_in_place")},
        "of_copy": {"topk_gather": round(gbs(topk_bytes, "topk_gather") / copy_gbs, 3),
                    "scatter_copy": round(gbs(copy_bytes, "scatter_copy") / copy_gbs, 3),
                    "scatter_in_place": round(gbs(inplace_bytes, "scatter_in_place") / copy_gbs, 3)},
        "speedup": {"topk_gather_vs_torch_topk": round(us["torch_topk_sort_gather"] / us["topk_gather"], 2),
                    "topk_gather_vs_torch_op": round(us["torch_tokenskip_op"] / us["topk_gather"], 2),
                    "scatter_copy_vs_torch": round(us["torch_scatter_add"] / us["scatter_copy"], 2),
                    "scatter_in_place_vs_copy": round(us["scatter_copy"] / us["scatter_in_place"], 2),
                    "multi_vs_single_select": round(us["select_single"] / us["select_multi"], 2)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_out", type=Path, help="write the raw results here")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    ap.add_argument("--hidden", default="576,4096,8192", help="hidden sizes (default 576,4096,8192)")
    ap.add_argument("--seq", default="1024,4096,8192,32768", help="sequence lengths")
    ap.add_argument("--reps", type=int, default=20, help="calls captured per CUDA graph")
    ap.add_argument("--replays", type=int, default=7, help="timed graph replays (median)")
    ap.add_argument("--lib", default=None, help="kernel library (default: build for this GPU, kernels only)")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 2
    from tokenskip.fileio import write_json_atomic

    from . import build_library

    major, minor = torch.cuda.get_device_capability()
    lib = args.lib or build_library(arch=f"{major}{minor}", kernels_only=True)
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth_gbs(args.replays)
    result = {"device": torch.cuda.get_device_name(), "capability": f"{major}.{minor}", "torch": torch.__version__,
              "dtype": args.dtype, "keep": list(KEEP), "reps": args.reps, "replays": args.replays,
              "timing": "CUDA graph of `reps` calls, replay timed with CUDA events; median per call",
              "copy_gbs": round(copy_gbs, 1), "cases": []}
    print(f"{result['device']}: device-to-device copy {result['copy_gbs']} GB/s ({args.dtype})", flush=True)
    print(f"{'B':>2} {'H':>5} {'S':>6} {'k':>6} | {'TopKGather':>10} {'GB/s':>6} {'copy%':>5} {'1-blk':>7} "
          f"{'multi':>7} {'torch':>7} | {'Scatter':>8} {'GB/s':>6} {'copy%':>5} {'inplace':>8} {'torch':>8} | ok",
          flush=True)
    for B in _ints(args.batch):
        for H in _ints(args.hidden):
            for S in _ints(args.seq):
                row = bench_case(lib, B, H, S, dtype, args.reps, args.replays, copy_gbs)
                result["cases"].append(row)
                u, g, c = row["us"], row["gbs"], row["of_copy"]
                print(f"{B:>2} {H:>5} {S:>6} {row['k']:>6} | {u['topk_gather']:>10.1f} {g['topk_gather']:>6.0f} "
                      f"{100 * c['topk_gather']:>5.0f} {u['select_single']:>7.1f} {u['select_multi']:>7.1f} "
                      f"{u['torch_tokenskip_op']:>7.1f} | {u['scatter_copy']:>8.1f} {g['scatter_copy']:>6.0f} "
                      f"{100 * c['scatter_copy']:>5.0f} {u['scatter_in_place']:>8.1f} {u['torch_scatter_add']:>8.1f} "
                      f"| {all(row['correct'].values())}", flush=True)
                torch.cuda.empty_cache()
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json_out, result)
    return 0 if all(all(r["correct"].values()) for r in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
