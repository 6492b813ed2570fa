"""GPU prefill benchmark: routed vs the fastest dense, on a LLaMA-2-7B-shaped model with random weights.

    python -m tokenskip.deploy.bench.gpu --json bench_gpu.json            # H200: about 4 minutes
    python -m tokenskip.deploy.bench.gpu --tiny --device cpu --json t.json  # dry run of the same logic

Model speed does not depend on weight values, so the model is built from a LlamaConfig with random
bf16 weights directly on the GPU. Routing: the static router with the uniform schedule (two dense
blocks at each end), kv_policy skip and dense, batch 1 and 8, S = 1024 and 2048, sparsity 0.3 and 0.4.

**Baseline**: Hugging Face's own forward (`attn_implementation="sdpa"`, no attention mask, so SDPA
runs is_causal on the flash / memory-efficient kernels), bf16, `logits_to_keep=1`; in graph mode it
is captured in a CUDA graph exactly like the routed side. Every speed-up is HF dense / routed.
Our own dense path (the routed model with no router) is timed beside it, to show it matches.

Protocol: per (mode, S, batch) every side (HF dense, our dense, each routed config, the learned
router) runs once per round, in a rotating order, after warm-up (tokenskip.timing.alternate);
CUDA events; medians and p90 (tokenskip.timing.percentile). `eager` = plain PyTorch calls;
`graph` = each side captured once (tokenskip.cuda_graphs.GraphedPrefill) and replayed. The ideal speed-up is given twice: `ideal` counts what the kernels compute (causal
attention: the pairs a query may see; tokenskip.flops' block cost with the attended pairs) and
`ideal_rect` the full q x T rectangle (tokenskip.flops, the historical figure). Router + feature
overhead = (learned-router routed - static-router routed) / HF dense, same schedule and capture
mode: the two differ only by the router MLP, its features and the attention-score window.
Decode: ms per token over a preallocated cache (eager, CUDA graph) and the old concatenating cache.
On the CPU, graph mode runs emulated (the same plumbing, no CUDA): a dry run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from tokenskip.synthetic import LLAMA2_7B, build_model
from tokenskip.timing import Timer, alternate, stopwatch

TINY = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=512)
TARGETS = {"graph_efficiency": 0.9, "eager_speedup_1024": 1.0, "router_overhead": 0.03}


# ----------------------------------------------------------------------------------------- ideals
def causal_flops(config, pairs: list[tuple[int, int, float] | None]) -> float:
    """Block FLOPs from per-layer (query rows, K/V tokens, attended (query, key) pairs)."""
    from tokenskip.flops import block_flops

    return sum(block_flops(config, nq, nkv, attended / nq) for nq, nkv, attended in pairs)


@torch.no_grad()
def attended_pairs(routed, ids, mask) -> list[tuple[int, int, float]]:
    """Per layer, for row 0: (rows that ran, K/V tokens, (query, key) pairs causal attention sees)."""
    out = routed(ids[:1], mask[:1], trace=True)
    seq = ids.shape[1]
    rows = []
    for tr in out.traces:
        if tr.index is None:  # dense block
            rows.append((seq, seq, seq * (seq + 1) / 2))
        elif routed.kv_policy == "skip":
            k = tr.index.shape[1]
            rows.append((k, k, k * (k + 1) / 2))
        else:  # kept queries over every earlier key
            rows.append((tr.index.shape[1], seq, float((tr.index[0] + 1).sum())))
    return rows


def ideals(model, routed, ids, mask) -> tuple[float, float]:
    """(causal ideal, rectangle ideal) speed-ups of routed over dense prefill."""
    from tokenskip.flops import flops_ratio

    seq, cfg = ids.shape[1], model.config
    dense = causal_flops(cfg, [(seq, seq, seq * (seq + 1) / 2)] * cfg.num_hidden_layers)
    causal = dense / causal_flops(cfg, attended_pairs(routed, ids, mask))
    return causal, 1.0 / flops_ratio(cfg, routed.schedule, seq, 0, routed.kv_policy)


# ---------------------------------------------------------------------------------------- prefill
def make_call(model, routed, ids, mask, mode: str, emulate: bool):
    """One side's callable: HF's forward (routed None: is_causal SDPA, no mask) or the routed
    prefill, called eagerly or as the replay of one capture."""
    from tokenskip.cuda_graphs import Graph, GraphedPrefill

    if isinstance(routed, tuple):  # ("fused", routed): the same model with tokenskip.fused on
        from tokenskip.fused import use_fused

        inner_routed = routed[1]
        with use_fused(True):
            inner = make_call(model, inner_routed, ids, mask, mode, emulate)  # graph mode: captured fused

        def with_fusion():
            with use_fused(True):
                return inner()

        return with_fusion
    if routed is None:
        def hf():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        return Graph(lambda: (hf(),), emulate=emulate).replay if mode == "graph" else hf
    if mode == "graph":
        graphed = GraphedPrefill(routed, ids.shape[0], ids.shape[1], padded=False, emulate=emulate)
        return lambda: graphed(ids, mask)
    return lambda: routed.prefill(ids, mask, padded=False)


def side_fns(model, sides: dict, ids, mask, mode: str, emulate: bool) -> tuple[dict, dict, dict]:
    """Callables per side for one (S, batch). Returns (fns, first-call seconds incl. capture and
    compile, errors): a side that cannot run (capture refused, compile failed) is reported, not fatal."""
    fns, first, errors = {}, {}, {}
    timer = Timer(torch.cuda.synchronize if ids.is_cuda else None)

    def first_call(routed):
        with torch.no_grad():
            call = make_call(model, routed, ids, mask, mode, emulate)
            call()
        return call

    for name, routed in sides.items():
        try:
            call, first[name] = timer.measure(lambda: first_call(routed))
        except Exception as exc:  # noqa: BLE001 - any failure of one side is data, not a crash
            lines = str(exc).strip().splitlines()
            errors[name] = f"{type(exc).__name__}: {lines[0] if lines else ''}"
            continue
        fns[name] = torch.no_grad()(call)
    return fns, first, errors


def make_sides(model, args, device) -> dict:
    from tokenskip.config import build_routed
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import LearnedRouter
    from tokenskip.schedule import Schedule

    sides = {"hf_dense": None, "ours_dense": build_routed(model, router="dense")[0]}
    for kv in args.kv_policies:
        for s in args.sparsities:
            sides[f"routed:{kv}:{s:g}"] = build_routed(model, router="static", sparsity=s, kv_policy=kv)[0]
    if args.fused:
        s = max(args.sparsities)
        sides[f"fused:skip:{s:g}"] = ("fused", sides[f"routed:skip:{s:g}"])
    if args.overhead:
        s = max(args.sparsities)
        n = model.config.num_hidden_layers
        sides[f"learned:skip:{s:g}"] = RoutedModel(model, Schedule.uniform(n, s), LearnedRouter().to(device),
                                                   kv_policy="skip")
    return sides


def prefill_group(model, sides, mode, seq, batch, args, timer, device, emulate) -> tuple[list, dict | None, dict]:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(seq + batch))  # [B,S]
    mask = torch.ones_like(ids)
    fns, first, errors = side_fns(model, sides, ids, mask, mode, emulate)
    times = alternate(fns, args.repeats, args.warmup, timer) if fns else None
    med = {n: times.median(n) for n in fns}
    group = {"mode": mode, "seq": seq, "batch": batch, "first_call_s": first, "errors": errors,
             "hf_dense_ms": 1e3 * med.get("hf_dense", float("nan")),
             "ours_dense_ms": 1e3 * med.get("ours_dense", float("nan"))}
    base = med.get("hf_dense")
    rows = []
    for name, routed in sides.items():
        if not name.startswith("routed:") or name not in med or base is None:
            continue
        _, kv, s = name.split(":")
        ideal, ideal_rect = ideals(model, routed, ids, mask)
        r = med[name]
        rows.append({"mode": mode, "seq": seq, "batch": batch, "kv_policy": kv, "sparsity": float(s),
                     "achieved": routed.schedule.overall(seq), "hf_dense_ms": 1e3 * base,
                     "hf_dense_p90_ms": 1e3 * times.p90("hf_dense"), "ours_dense_ms": group["ours_dense_ms"],
                     "routed_ms": 1e3 * r, "routed_p90_ms": 1e3 * times.p90(name), "speedup": base / r,
                     "ideal": ideal, "efficiency": base / r / ideal, "ideal_rect": ideal_rect,
                     "efficiency_rect": base / r / ideal_rect, "tok_s_dense": batch * seq / base,
                     "tok_s_routed": batch * seq / r})
    for name in (n for n in med if n.startswith("fused:")):
        plain = med.get("routed:" + name.split(":", 1)[1])
        if plain is not None:
            group["fused"] = {"side": name, "routed_ms": 1e3 * plain, "fused_ms": 1e3 * med[name],
                              "gain": plain / med[name]}
    overhead = None
    learned = [n for n in med if n.startswith("learned:")]
    if learned and base is not None:
        _, kv, s = learned[0].split(":")
        static = med.get(f"routed:{kv}:{s}")
        if static is not None:
            overhead = {"mode": mode, "seq": seq, "batch": batch, "sparsity": float(s), "hf_dense_ms": 1e3 * base,
                        "static_ms": 1e3 * static, "learned_ms": 1e3 * med[learned[0]],
                        "overhead": (med[learned[0]] - static) / base}
    return rows, overhead, group


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tokenskip.deploy.bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--tiny", action="store_true", help="tiny model and lengths (CPU dry run)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--seq-lens", default=None, help="comma-separated (default 1024,2048; tiny: 32,64)")
    p.add_argument("--batches", default=None, help="comma-separated (default 1,8; tiny: 1,2)")
    p.add_argument("--sparsities", default="0.3,0.4")
    p.add_argument("--kv-policies", default="skip,dense")
    p.add_argument("--modes", default="eager,graph", help="eager PyTorch and/or CUDA-graph replay (emulated on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 8; tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2; tiny: 1)")
    p.add_argument("--no-overhead", dest="overhead", action="store_false", help="skip the learned-router side")
    p.add_argument("--fused", action="store_true", help="also time kv_policy=skip with tokenskip.fused on (A/B)")
    p.add_argument("--decode-steps", type=int, default=None, help="decode benchmark steps (default 32; 0: skip)")
    p.add_argument("--budget-s", type=float, default=0, help="stop starting new groups after this many seconds")
    args = p.parse_args(argv)
    args.seq_lens = [int(x) for x in (args.seq_lens or ("32,64" if args.tiny else "1024,2048")).split(",")]
    args.batches = [int(x) for x in (args.batches or ("1,2" if args.tiny else "1,8")).split(",")]
    args.sparsities = [float(x) for x in args.sparsities.split(",")]
    args.kv_policies = [x.strip() for x in args.kv_policies.split(",")]
    args.modes = [x.strip() for x in args.modes.split(",")]
    args.repeats = args.repeats or (2 if args.tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.decode_steps = args.decode_steps if args.decode_steps is not None else (3 if args.tiny else 32)
    from tokenskip.fileio import write_json_atomic

    save = (lambda partial: write_json_atomic(args.json_out, partial)) if args.json_out else (lambda partial: None)
    result = run(args, save)
    print(table(result))
    save(result)
    return result


@torch.no_grad()
def run(args, save=lambda partial: None) -> dict:
    """The whole benchmark; `save` gets the partial result after every step (a killed run keeps
    what it measured)."""
    from .gpu_checks import decode_bench, numeric_checks, op_counts, verdicts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    emulate = not cuda
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if args.tiny else LLAMA2_7B
    since = stopwatch()
    torch.manual_seed(0)
    model = build_model(shape, device, dtype)
    info = {"device": torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu"),
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
            "model": "tiny" if args.tiny else "llama-2-7b-shaped (random weights)", "build_s": since(),
            "repeats": args.repeats, "warmup": args.warmup, "graphs": "cuda" if cuda else "emulated (dry run)",
            "baseline": "HF LlamaForCausalLM forward, sdpa, no mask (is_causal), same capture mode"}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    timer = Timer.for_device(device)
    say = lambda msg: print(f"[{since():6.1f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if cuda:  # each new (B, S, k) shape may recompile FlexAttention once before dynamic shapes take over
        from torch import _dynamo

        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    checks = numeric_checks(model, args, device)
    say(f"numeric checks: {json.dumps(checks)}")
    sides = make_sides(model, args, device)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_lens[0]), device=device)
    ops_per_prefill = op_counts(model, sides, ids, torch.ones_like(ids))
    say(f"aten ops per eager prefill (B=1, S={args.seq_lens[0]}): {json.dumps(ops_per_prefill)}")
    decode = decode_bench(model, sides, args, device, timer, emulate) if args.decode_steps else []
    say(f"decode: {json.dumps(decode)}")
    rows, overheads, groups, skipped = [], [], [], []
    result = {"info": info, "checks": checks, "ops_per_prefill": ops_per_prefill, "rows": rows, "overhead": overheads,
              "groups": groups, "decode": decode, "skipped": skipped, "partial": True}
    save(result)
    order = [(m, s, b) for b in args.batches for s in args.seq_lens for m in args.modes]
    for mode, seq, batch in order:
        if args.budget_s and since() > args.budget_s:
            skipped.append({"mode": mode, "seq": seq, "batch": batch, "why": "time budget"})
            continue
        got, over, group = prefill_group(model, sides, mode, seq, batch, args, timer, device, emulate)
        rows += got
        groups.append(group)
        if over:
            overheads.append(over)
        say(f"[{mode}] S={seq} B={batch}: HF dense {group['hf_dense_ms']:.2f} ms, ours {group['ours_dense_ms']:.2f} ms"
            + "".join(f"; {r['kv_policy']} {r['sparsity']:g}: {r['speedup']:.2f}x (ideal {r['ideal']:.2f}x)"
                      for r in got) + (f"; overhead {100 * over['overhead']:.2f}%" if over else "")
            + (f"; fused {group['fused']['gain']:.3f}x" if "fused" in group else "")
            + (f"; errors {group['errors']}" if group["errors"] else ""))
        save(result)
        if cuda:
            torch.cuda.empty_cache()
    info["total_s"] = since()
    result["partial"] = False
    result["targets"] = verdicts(result, TARGETS)
    return result


def table(result: dict) -> str:
    out = ["| mode | S | B | sparsity | kv | HF dense ms | ours dense ms | routed ms | speed-up | ideal | efficiency "
           "| ideal (rect) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['mode']} | {r['seq']} | {r['batch']} | {r['sparsity']:.2f} | {r['kv_policy']} | "
                   f"{r['hf_dense_ms']:.2f} | {r['ours_dense_ms']:.2f} | {r['routed_ms']:.2f} | {r['speedup']:.2f}x | "
                   f"{r['ideal']:.2f}x | {r['efficiency']:.2f} | {r['ideal_rect']:.2f}x |")
    if result["overhead"]:
        out += ["", "| mode | S | B | static routed ms | learned routed ms | overhead / HF dense |",
                "|---|---|---|---|---|---|"]
        out += [f"| {o['mode']} | {o['seq']} | {o['batch']} | {o['static_ms']:.2f} | {o['learned_ms']:.2f} | "
                f"{100 * o['overhead']:.2f}% |" for o in result["overhead"]]
    fused = [g for g in result["groups"] if "fused" in g]
    if fused:
        out += ["", "| mode | S | B | side | routed ms | fused ms | gain |", "|---|---|---|---|---|---|---|"]
        out += [f"| {g['mode']} | {g['seq']} | {g['batch']} | {g['fused']['side']} | {g['fused']['routed_ms']:.2f} | "
                f"{g['fused']['fused_ms']:.2f} | {g['fused']['gain']:.3f}x |" for g in fused]
    if result["decode"]:
        out += ["", "| side | B | prompt | concat ms/tok | prealloc eager ms/tok | prealloc graph ms/tok |",
                "|---|---|---|---|---|---|"]
        out += [f"| {d['side']} | {d['batch']} | {d['prompt']} | {d.get('concat_ms', float('nan')):.2f} | "
                f"{d.get('prealloc_ms', float('nan')):.2f} | {d.get('graph_ms', float('nan')):.2f} |"
                for d in result["decode"]]
    out += ["", "targets: " + json.dumps(result["targets"])]
    return "\n".join(out)


if __name__ == "__main__":
    main()
