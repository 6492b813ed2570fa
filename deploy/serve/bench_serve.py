"""`tokenskip bench-serve`: the serving benchmark, through the real HTTP server.

For each side (dense, routed) a `tokenskip serve` subprocess is started on 127.0.0.1 (PyTorch:
`--model M --router dense` vs `--router static --sparsity S`; ONNX Runtime: a dense and a routed
export, made here with the export API unless given). Both servers stay up and the concurrency
levels alternate between them (dense first, then routed, then routed first...), so the ratio is
taken side by side. At each level, `c` client coroutines send streaming completion requests back
to back until `requests` are done: random token-id prompts of exactly `prompt_len` tokens,
`ignore_eos` so every request generates `max_tokens` tokens, greedy.

Reported per level: output tokens/s over the level's wall time, TTFT p50/p99 (request sent ->
first token received), and the per-token latency p50 and p99 (time between tokens after the first). Plus
the analytic KV-cache bytes of one sequence (prompt + max_tokens; tokenskip.kv_bytes, tested equal
to the real caches) and how many sequences each side admits under one `--kv-cache-gb` budget.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from tokenskip.errors import UserError, parse_list
from tokenskip.timing import percentile, round_order, stopwatch

from . import external
from .runner import ServerProcess

WARMUP_REQUESTS = 4


async def _one(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    clock = stopwatch()  # seconds since the request was sent
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise UserError(f"bench-serve: the server answered {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif obj.get("choices"):
                stamps.append(clock())
    end = clock()
    gaps = np.diff(stamps).tolist() if len(stamps) > 1 else []
    return {"ttft": stamps[0] if stamps else float("nan"), "latency": end, "tokens": tokens, "gaps": gaps}


async def _level(url: str, prompts: list[list[int]], max_tokens: list[int], concurrency: int) -> dict:
    import httpx

    queue = list(range(len(prompts)))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            while queue:
                i = queue.pop()
                results.append(await _one(client, url, prompts[i], max_tokens[i]))

        since = stopwatch()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = since()
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "tpot_p50_ms": 1e3 * percentile(gaps, 50), "tpot_p99_ms": 1e3 * percentile(gaps, 99)}


def _sides(backend, lm, sparsity, onnx_dir, onnx_dense_dir, tmp: Path, max_len: int, say):
    """-> ({side: (serve flags, ModelInfo)} for dense and routed, the routed side's router kind:
    "static" unless a given routed export says otherwise)."""
    from tokenskip.config import build_routed

    from tokenskip.export.sidecar import read_export

    from ..runtime.torch_backend import TorchBackend
    from ..bench.run import export_dir_for
    from .model_info import from_sidecar, model_info

    built = {name: build_routed(lm.model, router=kind, sparsity=sp, model_name=lm.name)
             for name, kind, sp in (("dense", "dense", None), ("routed", "static", sparsity))}
    if backend == "torch":
        return {name: (["--model", lm.name, "--router", "dense" if name == "dense" else "static"]
                       + ([] if name == "dense" else ["--sparsity", str(sparsity)]),
                       model_info(TorchBackend(routed), name)) for name, (routed, _) in built.items()}, "static"
    out, router = {}, "static"
    for name, given in (("dense", onnx_dense_dir), ("routed", onnx_dir)):
        folder = Path(given) if given else None
        if folder is None:
            say(f"exporting the {name} model to ONNX (once; minutes for a real model) ...")
            routed, cfg = built[name]
            folder = export_dir_for(lm, routed, cfg, tmp / name, max_len)
        side = read_export(folder)
        if name == "routed" and given:
            router = str(side.get("router") or "static")
        out[name] = (["--onnx", str(folder)], from_sidecar(name, side, None))
    return out, router


@dataclass(frozen=True)
class ServeBenchSettings:
    """What one `tokenskip bench-serve` run measures: one field per flag (the command builds it)."""

    backend: str  # torch | ort
    model: str | None  # None: the built-in default model
    sparsity: float  # routed side: static router, uniform schedule
    onnx_dir: str | None  # ort: routed export (None: exported here)
    onnx_dense_dir: str | None  # ort: dense export (None: exported here)
    concurrency: str  # comma-separated levels, e.g. "1,8,32"
    num_requests: int | None  # per level (None: 2 x level, at least 8)
    prompt_len: int
    max_tokens: int  # generated per request, EOS ignored (the mean with mixed_lengths)
    mixed_lengths: bool  # per-request max_tokens uniform in [m/4, 7m/4]
    max_batch: int
    batching: str  # continuous | dynamic | both
    device: str  # cpu | cuda, for both servers
    kv_cache_gb: float  # budget of the admitted-sequences comparison
    threads: int | None
    seed: int
    external: str | None = None  # "guidellm": also drive every level with it (external.py), for cross-checking

    def levels(self) -> list[int]:
        """The concurrency levels; a UserError naming the flag at fault for any bad value."""
        from tokenskip.schedule import check_sparsity

        levels = parse_list(self.concurrency, int, "--concurrency")
        if any(c < 1 for c in levels) or self.prompt_len < 1 or self.max_tokens < 1 or self.max_batch < 1:
            raise UserError("--concurrency, --prompt-len, --max-tokens and --max-batch must be >= 1")
        if self.num_requests is not None and self.num_requests < 1:
            raise UserError("--requests must be >= 1")
        check_sparsity(self.sparsity)
        return levels


def run_bench_serve(settings: ServeBenchSettings, progress: bool = True) -> dict:
    """Dense and routed servers side by side at every concurrency level; the JSON `bench-serve` prints."""
    from tokenskip.models import DEFAULT_MODEL, load_model

    from ..bench.run import _machine

    levels = settings.levels()
    backend, model, sparsity, seed = settings.backend, settings.model, settings.sparsity, settings.seed
    onnx_dir, onnx_dense_dir = settings.onnx_dir, settings.onnx_dense_dir
    num_requests, prompt_len, max_tokens = settings.num_requests, settings.prompt_len, settings.max_tokens
    mixed_lengths, max_batch, batching = settings.mixed_lengths, settings.max_batch, settings.batching
    device, kv_cache_gb, threads = settings.device, settings.kv_cache_gb, settings.threads
    say = (lambda msg: click.echo(msg, err=True)) if progress else (lambda msg: None)
    if settings.external:
        external.require(settings.external)
    lm = load_model(model or DEFAULT_MODEL)
    tokenizer_dir = lm.source  # the external client sizes its prompts with it
    vocab = lm.model.config.vocab_size
    rng = np.random.default_rng(seed)
    modes = ["continuous", "dynamic"] if batching == "both" else [batching]
    rows, cross = [], []
    with tempfile.TemporaryDirectory(prefix="tokenskip-bench-serve-") as tmp:
        sides, router = _sides(backend, lm, sparsity, onnx_dir, onnx_dense_dir, Path(tmp),
                               max(512, prompt_len + max_tokens), say)
        del lm  # the servers load their own copies
        common = ["--device", device, "--max-batch", str(max_batch), "--max-queue", str(4 * max(levels) + 16),
                  "--log-level", "warning", *(["--threads", str(threads)] if threads else [])]
        for mode in modes:
            say(f"starting the dense and routed servers ({backend}, {mode} batching) ...")
            servers = {}
            try:
                for name, (flags, _) in sides.items():
                    servers[name] = ServerProcess([*flags, *common, "--batching", mode])
                for name, server in servers.items():  # warm-up: first shapes, lazy allocations
                    warm = [rng.integers(10, vocab - 10, prompt_len).tolist() for _ in range(WARMUP_REQUESTS)]
                    asyncio.run(_level(server.url, warm, [max_tokens] * WARMUP_REQUESTS, WARMUP_REQUESTS))
                for i, level in enumerate(levels):
                    n = num_requests or max(8, 2 * level)
                    prompts = [rng.integers(10, vocab - 10, prompt_len).tolist() for _ in range(n)]
                    # mixed: uniform in [m/4, 7m/4] (mean m), so rows finish at different steps
                    lengths = (rng.integers(max(1, max_tokens // 4), max_tokens * 7 // 4 + 1, n).tolist()
                               if mixed_lengths else [max_tokens] * n)
                    for name in round_order(("dense", "routed"), i):  # tokenskip.timing's alternation
                        say(f"  {name}: concurrency {level}, {n} requests ...")
                        row = asyncio.run(_level(servers[name].url, prompts, lengths, level))
                        rows.append({"backend": backend, "batching": mode, "side": name, "concurrency": level, **row})
                        if settings.external:  # the same level on the same server, the external client's turn
                            say(f"  {name}: concurrency {level}, {n} requests, {settings.external} ...")
                            ext = external.run_guidellm(
                                servers[name].url, tokenizer_dir, Path(tmp) / f"{mode}-{name}-{level}", requests=n,
                                prompt_tokens=prompt_len, output_tokens=max_tokens, concurrency=level,
                                mixed_lengths=mixed_lengths, seed=seed)
                            cross.append({"batching": mode, "side": name, "concurrency": level, **ext})
            finally:
                for server in servers.values():
                    server.stop()
    budget = int(kv_cache_gb * 2**30)
    kv = {"prompt_len": prompt_len, "max_tokens": max_tokens, "budget_bytes": budget}
    for name, (_, info) in sides.items():
        per_seq = info.kv_bytes(prompt_len, max_tokens)
        kv[name] = {"bytes_per_sequence": per_seq, "admitted": budget // per_seq if per_seq else None,
                    "routed_blocks": len(info.routed_layers), "kv_policy": info.kv_policy, "dtype": info.dtype}
    kv["routed_over_dense_bytes"] = kv["routed"]["bytes_per_sequence"] / kv["dense"]["bytes_per_sequence"]
    return {"model": model or DEFAULT_MODEL, "backend": backend, "router": router, "sparsity": sparsity,
            "machine": _machine(threads),
            "prompt_len": prompt_len, "max_tokens": max_tokens, "mixed_lengths": mixed_lengths, "max_batch": max_batch,
            "rows": rows, "kv": kv, **({"external": cross} if settings.external else {})}


def format_table(result: dict) -> str:
    lines = [f"model {result['model']}, {result['backend']}, routed = {result.get('router', 'static')} router at sparsity {result['sparsity']}, "
             f"prompt {result['prompt_len']} tokens, {result['max_tokens']} generated"
             f"{' on average (mixed lengths)' if result.get('mixed_lengths') else ''}, max batch {result['max_batch']}",
             "", "| batching | concurrency | side | requests | tokens/s | TTFT p50 ms | TTFT p99 ms | ms/token p50 | "
             "ms/token p99 | routed/dense tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["batching"], r["concurrency"], r["side"]): r for r in result["rows"]}
    for (mode, level, side), r in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ratio = ""
        if side == "routed" and (mode, level, "dense") in by_key:
            ratio = f"{r['tokens_per_s'] / by_key[(mode, level, 'dense')]['tokens_per_s']:.2f}x"
        lines.append(f"| {mode} | {level} | {side} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} | "
                     f"{ratio} |")
    kv = result["kv"]
    lines += ["", f"KV cache per sequence ({kv['prompt_len']} + {kv['max_tokens']} tokens), budget "
              f"{kv['budget_bytes'] / 2**30:g} GiB:", "", "| side | routed blocks | KV bytes / sequence | admitted |",
              "|---|---|---|---|"]
    for side in ("dense", "routed"):
        s = kv[side]
        lines.append(f"| {side} | {s['routed_blocks']} | {s['bytes_per_sequence'] / 2**20:.2f} MiB | {s['admitted']} |")
    lines.append(f"\nrouted / dense KV bytes: {kv['routed_over_dense_bytes']:.3f}")
    return "\n".join(lines)
