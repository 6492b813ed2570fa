"""GPU check of router training and evaluation at LLaMA-2-7B scale (issue 12), for a lent device.

One call, under 10 minutes on one H100/H200, writing raw JSON to --out (docs/gpu.md says how to run
it and where the figures go):

1. CLI on the GPU: `tokenskip fit --budget tiny`, `eval`, `decode-eval` and `report`, each with
   `--device cuda --dtype bf16`, on a tiny random Llama folder: every command's device and dtype
   path end to end (a model loaded straight to the GPU in bf16, windows and routers moved there).
2. A LLaMA-2-7B-shaped model (hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000)
   with random bf16 weights, built from a config directly on the GPU (no download; speed does
   not depend on weight values): weight memory; router training steps/s, tokens/s and peak
   memory (the real `train_router`: bf16 autocast, fp32 router and AdamW); one GA fitness
   evaluation; a bf16 quality evaluation with the deployment function (routed prefill +
   teacher-forced decode through the KV cache) for dense, static and the trained router; and the
   bf16 routed model against an fp32 copy (KL, kept-set overlap).

`--shape small` runs the same steps on a small model (also on the CPU) to check the script.

    python3 -m pip install -q --no-deps --no-build-isolation -e .
    PYTHONUNBUFFERED=1 python3 scripts/device_train_7b.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS under use_deterministic_algorithms

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # LlamaConfig fields
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def peak(device: torch.device) -> float | None:
    return gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cli_smoke(device: str, dtype: str, work: Path) -> list[dict]:
    """Run the commands that load a model with --device/--dtype on a tiny random Llama folder."""
    sys.path.insert(0, str(ROOT))
    from tests.test_train import TEXT, _make_model

    model = _make_model(work / "tiny")
    text = work / "corpus.txt"
    text.write_text(TEXT, encoding="utf-8")
    flags = ["--device", device, "--dtype", dtype]
    common = ["--model", str(model)]
    steps = [
        ("fit", ["fit", *common, "--sparsity", "0.3", "--budget", "tiny", "--out", str(work / "fit"),
                 "--calib-text", str(text), "--train-text", str(text), *flags]),
        ("eval", ["eval", *common, "--routers", str(work / "fit" / "routers"), "--text", str(text), "--seq-len", "64",
                  "--cont-len", "16", "--windows", "4", "--json", *flags]),
        ("decode-eval", ["decode-eval", *common, "--routers", str(work / "fit" / "routers"), "--text", str(text),
                         "--prompt-len", "48", "--new-tokens", "16", "--windows", "2", "--json", *flags]),
        ("report", ["report", str(work / "fit"), "--text", str(text), "--calib-text", str(text), "--seq-len", "64",
                    "--cont-len", "16", "--windows", "4", "--json", *flags]),
    ]
    out = []
    for name, args in steps:
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "tokenskip", *args], capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"}, cwd=str(ROOT))
        row = {"command": name, "returncode": proc.returncode, "seconds": round(time.time() - t0, 1)}
        if proc.returncode != 0:
            row["stderr_tail"] = proc.stderr[-2000:]
        elif name in ("eval", "decode-eval"):
            obj = json.loads(proc.stdout)
            row["reported_device"], row["reported_dtype"] = obj.get("device"), obj.get("dtype")
        print(f"cli {name}: rc {proc.returncode} ({row['seconds']} s)", flush=True)
        out.append(row)
    return out


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama of `shape`, initialised directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], rope_theta=10000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return model


def train_speed(model, device, seq_len, cont_len, batch, steps, work: Path) -> tuple[dict, object]:
    """Steady-state router training speed: (time of 2 + steps steps - time of 2 steps) / steps,
    on `batch` windows (the dense teacher is cached after the first step of a call), after a
    1-step warm-up call (kernel selection, allocator) that is not counted."""
    from tokenskip.schedule import Schedule
    from tokenskip.train.trainer import TrainSettings, train_router

    n_layers = model.config.num_hidden_layers
    sched = Schedule.uniform(n_layers, 0.3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g)  # [B,L]
    calib = torch.randint(0, model.config.vocab_size, (4, seq_len), generator=g)  # [4,L]
    times, router = {}, None
    for total in (1, 2, 2 + steps):
        st = TrainSettings(steps=total, seq_len=seq_len, cont_len=cont_len, batch_size=batch, windows=batch,
                           checkpoint_every=10_000, warmup=1)
        reset_peak(device)
        sync(device)
        t0 = time.time()
        router = train_router(model, sched, ids, calib, st, work / f"train-{total}", progress=False, resume=False)
        sync(device)
        times[total] = time.time() - t0
    hist = json.loads((work / f"train-{2 + steps}" / "train_history.json").read_text())["history"]
    step_s = (times[2 + steps] - times[2]) / steps
    if step_s <= 0:  # timing noise larger than the steps (tiny shapes on a busy CPU)
        step_s = float("nan")
    return {"seq_len": seq_len, "cont_len": cont_len, "batch": batch, "timed_steps": steps,
            "seconds_2_steps": round(times[2], 2), "seconds_total": round(times[2 + steps], 2),
            "seconds_warmup_1_step": round(times[1], 2),
            "step_seconds": round(step_s, 4), "steps_per_s": round(1 / step_s, 3),
            "tokens_per_s": round(batch * seq_len / step_s, 1), "peak_gib": peak(device),
            "router_dtype": str(next(router.parameters()).dtype), "losses": [h["loss"] for h in hist]}, (router, sched)


def fitness_speed(model, device, seq_len, cont_len, windows) -> dict:
    from tokenskip.routers import StaticRouter
    from tokenskip.schedule import Schedule
    from tokenskip.train.search import kl_fitness

    g = torch.Generator().manual_seed(2)
    calib = torch.randint(0, model.config.vocab_size, (windows, seq_len), generator=g).to(device)
    t0 = time.time()
    fit = kl_fitness(model, StaticRouter(), calib, cont_len, "skip")
    sync(device)
    t1 = time.time()
    value = fit(Schedule.uniform(model.config.num_hidden_layers, 0.3))
    sync(device)
    return {"windows": windows, "seq_len": seq_len, "dense_reference_s": round(t1 - t0, 3),
            "evaluation_s": round(time.time() - t1, 3), "fitness": value}


def quality(model, device, router, sched, seq_len, cont_len, windows, batch) -> dict:
    from tokenskip.evaluate import evaluate_methods
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import StaticRouter

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (windows, seq_len), generator=g)
    methods = [("static (uniform)", RoutedModel(model, sched, StaticRouter())),
               ("learned", RoutedModel(model, sched, router))]
    reset_peak(device)
    sync(device)
    t0 = time.time()
    res = evaluate_methods(methods, ids, cont_len, batch, progress=False)
    sync(device)
    return {"windows": windows, "seq_len": seq_len, "cont_len": cont_len, "batch": batch,
            "seconds": round(time.time() - t0, 2), "peak_gib": peak(device),
            "rows": [{k: r.to_json()[k] for k in ("method", "kl", "top1", "ppl_ratio", "flops", "sparsity")}
                     for r in res]}


def versus_fp32(model, router, sched, seq_len, cont_len) -> dict:
    """The bf16 routed model against an fp32 copy of the same weights."""
    from tokenskip.routed import RoutedModel

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=g).to(next(model.parameters()).device)
    fp32 = copy.deepcopy(model).float()
    with torch.no_grad():
        a = RoutedModel(fp32, sched, router)(ids, n_tail=cont_len, trace=True, num_logits=cont_len)
        b = RoutedModel(model, sched, router)(ids, n_tail=cont_len, trace=True, num_logits=cont_len)
    la, lb = torch.log_softmax(a.logits.float(), -1), torch.log_softmax(b.logits.float(), -1)
    kl = (la.exp() * (la - lb)).sum(-1)
    overlaps = []
    for ta, tb in zip(a.traces, b.traces):
        if ta.index is not None:
            ma = torch.zeros(ids.shape, device=ids.device).scatter(1, ta.index, 1.0)
            mb = torch.zeros(ids.shape, device=ids.device).scatter(1, tb.index, 1.0)
            overlaps.append(float((ma * mb).sum() / ta.index.numel()))
    del fp32
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((la.argmax(-1) == lb.argmax(-1)).float().mean()),
            "kept_overlap_min": min(overlaps), "kept_overlap_mean": sum(overlaps) / len(overlaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Folder for train_7b.json")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--cont-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="Router training windows per step")
    ap.add_argument("--steps", type=int, default=10, help="Timed training steps")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--skip-cli", action="store_true", help="Skip the CLI part (1.)")
    args = ap.parse_args()

    from tokenskip.fileio import write_json_atomic
    from tokenskip.precision import resolve_device

    device = resolve_device(args.device)
    out = Path(args.out)
    result: dict = {"torch": torch.__version__, "device": str(device), "shape": args.shape, **SHAPES[args.shape],
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "errors": {}}
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass

    def stage(name, fn):
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            result[name] = fn()
        except Exception:  # record and go on: one failing stage must not hide the others' figures
            result["errors"][name] = traceback.format_exc()[-4000:]
            print(result["errors"][name], flush=True)
        result.setdefault("stage_seconds", {})[name] = round(time.time() - t0, 1)
        write_json_atomic(out / "train_7b.json", result)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_cli:
            stage("cli_bf16", lambda: cli_smoke(device.type, "bf16", work / "cli"))
        state: dict = {}

        def build():
            reset_peak(device)
            t0 = time.time()
            state["model"] = build_model(args.shape, device, torch.bfloat16)
            sync(device)
            n = sum(p.numel() for p in state["model"].parameters())
            return {"seconds": round(time.time() - t0, 1), "params": n, "dtype": "bf16",
                    "allocated_gib": gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None,
                    "weights_gib": gib(2 * n)}

        stage("build", build)
        if "model" in state:
            model = state["model"]

            def train():
                res, state["router"] = train_speed(model, device, args.seq_len, args.cont_len, args.batch, args.steps,
                                                   work)
                return res

            stage("train", train)
            stage("fitness", lambda: fitness_speed(model, device, args.seq_len, args.cont_len, 4))
            if "router" in state:
                router, sched = state["router"]
                stage("eval_bf16", lambda: quality(model, device, router, sched, args.seq_len, args.cont_len,
                                                   args.eval_windows, 4))
                stage("bf16_vs_fp32", lambda: versus_fp32(model, router, sched, args.seq_len, args.cont_len))
    print(json.dumps(result, indent=2))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
