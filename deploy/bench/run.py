"""`tokenskip bench` driver: builds dense and routed sides for a backend and times every shape."""

from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from tokenskip.errors import UserError

from .latency import BenchRow, DenseTorch, RoutedTorch, measure, router_overhead


def _machine(threads: int | None) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _routed_for(lm, router, routers_dir, kv_policy, sparsity, seed):
    from tokenskip.config import build_routed

    kind = router or ("learned" if routers_dir else "static")
    if routers_dir:
        return build_routed(lm.model, routers_dir=routers_dir, kv_policy=kv_policy, seed=seed, model_name=lm.name)
    return build_routed(lm.model, router=kind, sparsity=sparsity, kv_policy=kv_policy, seed=seed, model_name=lm.name)


def _learned_like(routed):
    """The routed model itself when its router is a trained kind (learned, select: their overhead is
    what is measured), else the same schedule and kv_policy with a learned router (untrained weights
    cost the same)."""
    from tokenskip.routed import RoutedModel
    from tokenskip.routers import LearnedRouter, SelectRouter

    if isinstance(routed.router, (LearnedRouter, SelectRouter)):
        return routed
    return RoutedModel(routed.model, routed.schedule, LearnedRouter(), kv_policy=routed.kv_policy,
                       score_window=routed.score_window)


def export_dir_for(lm, routed, cfg, out_dir: Path, max_seq_len: int) -> Path:
    """Export a (dense or routed) model with the export API (tokenskip export) into out_dir."""
    from tokenskip.export.exporter import export_model

    if not cfg.model:
        cfg.model = lm.name
    export_model(lm, routed, cfg, out_dir, max_seq_len=max_seq_len, check=False)
    return out_dir


@dataclass(frozen=True)
class BenchSettings:
    """What one `tokenskip bench` run measures: one field per flag (the command builds it)."""

    backend: str  # torch | ort | trt
    model: str  # built-in name, local folder or Hub id (an export / engine folder's own wins)
    router: str | None  # the routed side's router; None: learned with routers_dir, else static
    routers_dir: str | None  # trained routers folder: its schedule replaces `sparsities`
    kv_policy: str | None
    onnx_dir: str | None  # ort: routed export (None: exported per sparsity to a temp folder)
    onnx_dense_dir: str | None  # ort: dense export (None: exported to a temp folder)
    engine_dir: str | None  # trt: routed engine folder
    engine_dense_dir: str | None  # trt: dense engine folder
    seq_lens: list[int]
    batches: list[int]
    sparsities: list[float]  # overall sparsities, uniform schedule
    repeats: int  # timed runs of each side per shape
    warmup: int  # untimed runs of each side first
    decode_steps: int  # decode steps timed per shape (0: skip)
    threads: int | None  # CPU threads (None: torch's default)
    device: str  # auto | cpu | cuda
    dtype: str
    overhead_seq: int  # S of the learned-router overhead measurement (0: skip)
    seed: int

    def check(self) -> None:
        """A UserError naming the flag at fault, before anything is loaded."""
        from tokenskip.schedule import check_sparsity

        if self.repeats < 1 or self.warmup < 0 or self.decode_steps < 0:
            raise UserError("--repeats must be >= 1, --warmup and --decode-steps >= 0")
        for s in self.sparsities:
            check_sparsity(s)
        if any(n < 2 for n in self.seq_lens) or any(b < 1 for b in self.batches):
            raise UserError("--seq-lens must be >= 2 and --batch >= 1")
        if self.backend == "trt" and not (self.engine_dir and self.engine_dense_dir):
            raise UserError("--backend trt needs --engine DIR and --engine-dense DIR (from `tokenskip build`)")


def run_bench(settings: BenchSettings, progress: bool = True) -> dict:
    """Dense vs routed at every (sparsity, S, batch) of `settings`; the JSON `tokenskip bench` prints."""
    from tokenskip.models import load_model

    settings.check()
    backend, router, kv_policy, seed = settings.backend, settings.router, settings.kv_policy, settings.seed
    onnx_dir, onnx_dense_dir = settings.onnx_dir, settings.onnx_dense_dir
    engine_dir, engine_dense_dir = settings.engine_dir, settings.engine_dense_dir
    seq_lens, batches, sparsities = settings.seq_lens, settings.batches, settings.sparsities
    repeats, warmup, decode_steps = settings.repeats, settings.warmup, settings.decode_steps
    threads, overhead_seq = settings.threads, settings.overhead_seq
    model, routers_dir = settings.model, settings.routers_dir  # an export or engine folder may name its own
    if threads:
        torch.set_num_threads(threads)
    if backend == "ort" and onnx_dir and not routers_dir:
        # the export carries its model name and routing (tokenskip.json under routers/)
        from tokenskip.export.sidecar import read_export

        side = read_export(onnx_dir, "--onnx")
        model = side.get("model") or model
        routers_dir = str(Path(onnx_dir) / str(side.get("routers") or "routing"))
    if backend == "trt" and not routers_dir:
        # so does an engine folder (`tokenskip build` copies the export's routing folder in)
        from ..runtime.trt_backend import read_engine_dir

        meta, _ = read_engine_dir(engine_dir)
        if not meta.get("routers"):
            raise UserError(f"--engine {engine_dir}: carries no routing folder (built by an older tokenskip): "
                            "rebuild it with `tokenskip build` or pass --routers DIR")
        model = meta.get("model") or model
        routers_dir = str(Path(engine_dir) / meta["routers"])
    say = click.echo if progress else (lambda *a, **k: None)
    torch.manual_seed(seed)
    from tokenskip.precision import resolve_device

    device = resolve_device(settings.device).type
    lm = load_model(model, dtype=settings.dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    if routers_dir or engine_dir or (onnx_dir and backend == "ort"):
        sparsities = [None]  # the artefact carries its own schedule
    rows: list[BenchRow] = []
    max_len = max(4096, max(seq_lens) + decode_steps + 1)
    with tempfile.TemporaryDirectory(prefix="tokenskip-bench-") as tmp:
        tmp = Path(tmp)
        dense_side = None
        for s in sparsities:
            routed, cfg = _routed_for(lm, router, routers_dir, kv_policy, s, seed)
            if backend == "torch":
                dense_side, routed_side = DenseTorch(routed), RoutedTorch(routed)
            elif backend == "ort":
                from ..runtime.base import open_backend

                if dense_side is None:
                    ddir = Path(onnx_dense_dir) if onnx_dense_dir else None
                    if ddir is None:
                        from tokenskip.config import build_routed

                        say("exporting the dense model to ONNX ...", err=True)
                        drouted, dcfg = build_routed(lm.model, router="dense", model_name=lm.name)
                        ddir = export_dir_for(lm, drouted, dcfg, tmp / "dense", max_len)
                    dense_side = open_backend("ort", onnx_dir=ddir, device=device, threads=threads)
                rdir = Path(onnx_dir) if onnx_dir else None
                if rdir is None:
                    say(f"exporting the routed model (sparsity {s}) to ONNX ...", err=True)
                    rdir = export_dir_for(lm, routed, cfg, tmp / f"routed-{s}", max_len)
                routed_side = open_backend("ort", onnx_dir=rdir, device=device, threads=threads)
            else:
                from ..runtime.base import open_backend

                dense_side = open_backend("trt", engine_dir=engine_dense_dir)
                routed_side = open_backend("trt", engine_dir=engine_dir)
            label = s if s is not None else routed.schedule.overall()
            for seq in seq_lens:
                for batch in batches:
                    say(f"{backend}: S={seq} B={batch} sparsity={label:g} ...", err=True)
                    row = measure(backend, dense_side, routed_side, routed, seq, batch, label, repeats, warmup,
                                  decode_steps, sync)
                    rows.append(row)
    result = {"model": model, "backend": backend, "machine": _machine(threads), "repeats": repeats,
              "warmup": warmup, "rows": [r.to_json() for r in rows]}
    if overhead_seq:
        routed, _ = _routed_for(lm, router, routers_dir, kv_policy, max(s or 0.0 for s in sparsities) or 0.4, seed)
        say(f"router + feature overhead at S={overhead_seq} ...", err=True)
        result["overhead"] = router_overhead(_learned_like(routed), overhead_seq, 1, max(repeats, 3), warmup, sync)
    return result
