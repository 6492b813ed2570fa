"""`tokenskip bench-export`: how long an export takes, where the time goes, and its peak memory.

The export runs in a fresh child process (`python -m tokenskip.export.bench_export --child ...`),
so its peak resident set (the kernel's VmHWM, exact, model load included) is the export's own and
not the caller's. Reported: wall and CPU seconds, seconds per stage (torch.export, the ONNX
translation, graph simplification, streaming the weights, post-pass, checker), peak RSS against the
budget of 1.5 x the weight bytes + 2 GiB (issue 12), and the file sizes.

Models: a built-in / local / Hub model (`--model`), or a random-weight LLaMA-shaped model built from
a config on the CPU in the export dtype, with no download (`--random-llama 1b`: hidden 2048, 22
layers, GQA 32/4, vocabulary 32000, intermediate 5632, about 1.1B parameters). The router is the
static one at `--sparsity`, or a routers folder (`--routers`, e.g. the pipeline's learned router,
whose graph has the score-window and router-MLP nodes too).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenskip.errors import UserError
from tokenskip.synthetic import LLAMA_1B
from tokenskip.timing import Timer, stopwatch

RANDOM_LLAMAS = {
    "1b": LLAMA_1B,
    "tiny": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=512),
}
GIB = 2 ** 30


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM from /proc (ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load(args: dict):
    """(loaded, routed, cfg) for the child: the LLM built or loaded directly in the export dtype."""
    import types

    import torch

    from tokenskip.config import build_routed
    from tokenskip.precision import resolve_dtype

    dtype = resolve_dtype(args["dtype"])
    if args.get("random_llama"):
        from tokenskip.synthetic import build_model

        torch.manual_seed(args["seed"])
        model = build_model(RANDOM_LLAMAS[args["random_llama"]], "cpu", dtype)
        name = f"random-llama-{args['random_llama']}"
        loaded = types.SimpleNamespace(model=model, name=name,
                                       tokenizer=types.SimpleNamespace(save_pretrained=lambda path: None))
    else:
        from tokenskip.models import load_model

        loaded = load_model(args["model"], dtype=dtype)
        name = args["model"]
    routed, cfg = build_routed(loaded.model, router="static", sparsity=args["sparsity"],
                               routers_dir=args.get("routers"), model_name=name)  # routers_dir wins
    return loaded, routed, cfg


def child(args: dict) -> dict:
    """Runs in the measured process: load, export, report."""
    import torch

    from .exporter import export_model

    torch.set_num_threads(args.get("threads") or torch.get_num_threads())
    timer, c0 = Timer(), time.process_time()
    (loaded, routed, cfg), load_s = timer.measure(lambda: _load(args))
    weights = sum({p.data_ptr(): p.nbytes for p in loaded.model.parameters()}.values())
    params = sum({p.data_ptr(): p.numel() for p in loaded.model.parameters()}.values())
    rss_loaded = peak_rss_bytes()
    side, export_s = timer.measure(lambda: export_model(loaded, routed, cfg, args["out"], force=True,
                                                       max_seq_len=args["max_seq_len"], check=args["check"],
                                                       optimize=args["optimize"]))
    peak = peak_rss_bytes()
    out = Path(args["out"])
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    budget = 1.5 * weights + 2 * GIB
    return {"model": side["model"], "router": side["router"], "dtype": side["dtype"], "layers": len(side["layers"]),
            "parameters": params, "weight_bytes": weights, "load_s": round(load_s, 1), "export_s": round(export_s, 1),
            "cpu_s": round(time.process_time() - c0, 1), "stages": side.get("timings", {}),
            "peak_rss_bytes": peak, "rss_after_load_bytes": rss_loaded, "rss_budget_bytes": int(budget),
            "within_budget": peak <= budget, "files": files, "optimized": side.get("optimized"),
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def run(*, model: str | None, random_llama: str | None, dtype: str, sparsity: float, max_seq_len: int,
        out: str | None, check: bool, optimize: bool, threads: int | None, seed: int,
        routers: str | None = None) -> dict:
    """Run `child` in a fresh interpreter and return its report."""
    if random_llama is not None and random_llama not in RANDOM_LLAMAS:
        raise UserError(f"--random-llama {random_llama}: choose from {', '.join(RANDOM_LLAMAS)}")
    with tempfile.TemporaryDirectory(prefix="tokenskip-bench-export-") as tmp:
        args = {"model": model, "random_llama": random_llama, "dtype": dtype, "sparsity": sparsity, "routers": routers,
                "max_seq_len": max_seq_len, "out": out or str(Path(tmp) / "export"), "check": check,
                "optimize": optimize, "threads": threads, "seed": seed}
        since = stopwatch()
        proc = subprocess.run([sys.executable, "-m", "tokenskip.export.bench_export", "--child", json.dumps(args)],
                              capture_output=True, text=True)
        wall = since()
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()] or ["no output"]
            raise UserError(f"the export failed: {lines[-1]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_s"] = round(wall, 1)
    report["kept"] = out
    return report


def format_report(r: dict) -> str:
    gb = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    st = r["stages"]
    lines = [f"tokenskip bench-export: {r['model']} ({r['parameters'] / 1e6:.0f}M parameters, {r['layers']} layers, "
             f"{r['dtype']}, {r['router']} router), {r['cpus']} CPUs, {r['torch_threads']} torch threads",
             "| stage | seconds |", "|---|---|",
             f"| load / build the model | {r['load_s']} |",
             f"| torch.export (the one trace) | {st.get('export_s', 0):.1f} |",
             f"| ONNX translation ({'with' if st.get('retraced') else 'without'} torch.onnx's retrace) | "
             f"{st.get('translate_s', 0):.1f} |",
             f"| simplify (fold, CSE, dead code{', onnxscript optimizer' if r['optimized'] else ''}) | "
             f"{st.get('simplify_s', 0):.1f} |",
             f"| stream weights to disk | {st.get('save_s', 0):.1f} |",
             f"| post-pass (dims, custom ops) | {st.get('post_s', 0):.1f} |",
             f"| onnx.checker | {st.get('check_s', 0):.1f} |",
             f"| export total (wall) | {r['export_s']} |",
             f"| process CPU time | {r['cpu_s']} |", "",
             f"peak RSS {gb(r['peak_rss_bytes'])} (after load {gb(r['rss_after_load_bytes'])}); budget 1.5 x weights "
             f"({gb(r['weight_bytes'])}) + 2 GiB = {gb(r['rss_budget_bytes'])}: "
             + ("within" if r["within_budget"] else "OVER"),
             "files: " + ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in r["files"].items())]
    return "\n".join(lines)


if __name__ == "__main__":  # the measured child process
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("internal entry point of `tokenskip bench-export`")
