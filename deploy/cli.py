"""`tokenskip generate`, `tokenskip bench` and `tokenskip decode-eval`.

Three ways to get a model, one generation loop (generation.py):
- PyTorch: --model/--router/--sparsity/--schedule, or --routers DIR (a trained router folder);
- ONNX Runtime: --onnx DIR (written by `tokenskip export`);
- TensorRT: --engine DIR (written by `tokenskip build`; needs a CUDA GPU).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from tokenskip.errors import UserError, parse_list
from tokenskip.evaluate_cli import model_options
from tokenskip.models import DEFAULT_MODEL
from tokenskip.precision import device_options
from tokenskip.routers import ROUTER_KINDS

from .cli_backend import BackendChoice, backend_options, backend_spec, given, given_flags
from .runtime.base import create_backend


def build_torch_routed(ctx, model, router, sparsity, schedule, routers_dir, kv_policy, seed, device="cpu",
                       dtype="fp32"):
    """CLI choices -> (LoadedModel, RoutedModel, RoutingConfig) (runtime/torch_backend.load_routed):
    with --routers DIR and no --model, the base model named in the folder is used."""
    from .runtime.base import BackendSpec
    from .runtime.torch_backend import load_routed

    flags = dict(model=model, router=router, sparsity=sparsity, schedule=schedule, routers_dir=routers_dir,
                 kv_policy=kv_policy, seed=seed, device=device, dtype=dtype)
    return load_routed(BackendSpec.from_flags(flags, given_flags(ctx, ["model"])))


def read_prompts(prompt: tuple[str, ...], prompts_file: str | None) -> list[str]:
    prompts = list(prompt)
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {prompts_file}: no such file")
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise UserError(f"--prompts-file {prompts_file}: no non-empty lines (one prompt per line)")
        prompts += lines
    if not prompts:
        raise UserError("give --prompt TEXT or --prompts-file FILE")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise UserError(f"--prompt {i + 1} is empty: give some text to continue")
    return prompts


@click.command("generate")
@model_options
@backend_options
@click.option("--prompt", multiple=True, help="Prompt text (repeatable).")
@click.option("--prompts-file", type=click.Path(), default=None, help="One prompt per line; run as left-padded batches.")
@click.option("--batch-size", default=8, show_default=True, help="Prompts per batch with --prompts-file.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass (with --temperature > 0).")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated (one prompt at a time).")
@click.option("--threshold-skip", is_flag=True,
              help="Batch 1, learned router: a generated token skips a routed block when the router's "
                   "probability is < 0.5.")
@click.option("--ignore-eos", is_flag=True, help="Always generate --max-new-tokens tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (tokens, text, timings).")
@click.pass_context
def generate(ctx, model, router, sparsity, schedule, routers_dir, kv_policy, seed, onnx_dir, engine_dir, tokenizer_dir,
             device, dtype, threads, prompt, prompts_file, batch_size, max_new_tokens, temperature, top_p, stream,
             threshold_skip, ignore_eos, as_json):
    """Generate text: routed prefill, then cached decode (every block, or --threshold-skip).

    \b
    Examples:
      tokenskip generate --router static --sparsity 0.3 --prompt "The capital of France is"
      tokenskip generate --routers out/fit --prompt "Once upon a time" --stream
      tokenskip generate --onnx out/export --prompts-file prompts.txt --json
      tokenskip generate --engine out/engine --prompt "Hello" --temperature 0.8 --top-p 0.9 --seed 1
    """
    from .runtime.generation import Sampling, generate_tokens
    from .runtime.stop_ids import model_eos_ids

    sampling = Sampling(max_new_tokens, temperature, top_p, seed).check()
    if batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    prompts = read_prompts(prompt, prompts_file)
    if threshold_skip or stream:
        batch_size = 1
    flags = dict(onnx_dir=onnx_dir, engine_dir=engine_dir, tokenizer_dir=tokenizer_dir, device=device,
                 threads=threads, model=model, router=router, sparsity=sparsity, schedule=schedule,
                 routers_dir=routers_dir, kv_policy=kv_policy, seed=seed, dtype=dtype)
    spec = backend_spec(flags, given_flags(ctx, flags), threshold_skip=threshold_skip)
    backend, tok, desc = create_backend(spec)
    rows = backend.model_facts().max_batch  # an engine's profile bounds the rows of one call
    if rows is not None and batch_size > rows:
        if given(ctx, "batch_size"):
            raise UserError(f"--batch-size {batch_size}: the engine takes at most {rows} rows per call "
                            f"(engine.json max_batch); use --batch-size {rows} or rebuild with --max-batch {batch_size}")
        batch_size = rows
    encoded = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise UserError(f"prompt {i + 1} encodes to 0 tokens: give some text to continue")
    # every end-of-sequence id the model declares (generation_config), as the server stops
    eos = [] if ignore_eos else sorted(model_eos_ids(tok, backend))
    # batch prompts of similar length together (less padding: a routed row's k follows the padded
    # length); each prompt keeps its own sampling seed (seed + its index) and its place in the output
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i])) if not stream else list(range(len(prompts)))
    results, totals = [None] * len(prompts), {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
    for start in range(0, len(prompts), batch_size):
        picked = order[start:start + batch_size]
        chunk = [encoded[i] for i in picked]
        on_token = None
        if stream:
            shown = {"text": "", "ids": []}
            click.echo(prompts[picked[0]], nl=False)

            def show(row, token, shown=shown):
                shown["ids"].append(token)
                text = tok.decode(shown["ids"], skip_special_tokens=True)
                click.echo(text[len(shown["text"]):], nl=False)
                sys.stdout.flush()
                shown["text"] = text
            on_token = show
        gen = generate_tokens(backend, chunk, sampling, pad_id=tok.pad_token_id, eos_ids=eos, on_token=on_token,
                              seed_offsets=picked)
        if stream:
            click.echo("")
        totals["prefill_s"] += gen.prefill_s
        totals["decode_s"] += gen.decode_s
        totals["decode_steps"] += gen.decode_steps
        for j, toks in enumerate(gen.tokens):
            results[picked[j]] = {"prompt": prompts[picked[j]], "prompt_tokens": len(chunk[j]), "tokens": toks,
                                  "text": tok.decode(toks, skip_special_tokens=True)}
    stats = dict(backend.stats)
    if stats.get("routed_block_visits"):
        stats["skip_rate"] = stats["skipped_blocks"] / stats["routed_block_visits"]
    timing = {**totals, "ms_per_token": 1e3 * totals["decode_s"] / totals["decode_steps"]
              if totals["decode_steps"] else None}
    if as_json:
        click.echo(json.dumps({**desc, "sampling": asdict(sampling),
                               "results": results, "timing": timing, "stats": stats}, indent=2, default=str))
    elif not stream:
        for r in results:
            click.echo(r["prompt"] + r["text"])
            if len(results) > 1:
                click.echo("---")
    if not as_json and stats.get("routed_block_visits"):
        click.echo(f"threshold-skip: {stats['skipped_blocks']}/{stats['routed_block_visits']} routed block visits "
                   f"skipped ({100 * stats['skip_rate']:.1f}%)", err=True)


# ----------------------------------------------------------------------------------------- bench
@click.command("bench")
@click.option("--backend", type=BackendChoice("bench"), default="torch", show_default=True)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Built-in name, local HF folder, or Hub id.")
@click.option("--router", type=click.Choice([k for k in ROUTER_KINDS if k != "dense"]), default=None,
              help="Router for the routed side (default: learned with --routers, else static).")
@click.option("--routers", "routers_dir", type=click.Path(), default=None,
              help="Trained routers folder (its schedule replaces --sparsity).")
@click.option("--kv-policy", type=click.Choice(["skip", "dense"]), default=None)
@click.option("--onnx", "onnx_dir", type=click.Path(), default=None,
              help="ort: routed export folder (default: export to a temp folder per sparsity).")
@click.option("--onnx-dense", "onnx_dense_dir", type=click.Path(), default=None,
              help="ort: dense export folder (default: exported to a temp folder).")
@click.option("--engine", "engine_dir", type=click.Path(), default=None, help="trt: routed engine folder.")
@click.option("--engine-dense", "engine_dense_dir", type=click.Path(), default=None, help="trt: dense engine folder.")
@click.option("--seq-lens", default="512,1024,2048", show_default=True)
@click.option("--batch", "batches", default="1,8", show_default=True)
@click.option("--sparsity", "sparsities", default="0.22,0.3,0.4", show_default=True, help="Overall sparsities.")
@click.option("--repeats", default=5, show_default=True, help="Timed runs of each side per shape.")
@click.option("--warmup", default=1, show_default=True, help="Untimed runs of each side first.")
@click.option("--decode-steps", default=8, show_default=True, help="Decode steps timed per shape (0: skip).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@device_options
@click.option("--overhead-seq", default=1024, show_default=True,
              help="S at which the learned router + feature overhead is measured (0: skip).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--out", "out_file", type=click.Path(), default=None, help="Also write the JSON here.")
def bench(backend, model, router, routers_dir, kv_policy, onnx_dir, onnx_dense_dir, engine_dir, engine_dense_dir,
          seq_lens, batches, sparsities, repeats, warmup, decode_steps, threads, device, dtype, overhead_seq, seed,
          as_json, out_file):
    """Routed vs dense prefill (and decode) in one process, alternating, after warm-up.

    Prints median / p90 latency, tokens/s, measured speed-up, the ideal speed-up from FLOPs and
    their ratio (efficiency), decode time per token, and the learned router + feature overhead.

    \b
    Examples:
      tokenskip bench --seq-lens 1024 --batch 1 --sparsity 0.4
      tokenskip bench --backend ort --seq-lens 512,1024,2048 --batch 1,8 --json
      tokenskip bench --backend ort --onnx out/export --onnx-dense out/export-dense --seq-lens 1024
    """
    from .bench.run import BenchSettings, run_bench

    settings = BenchSettings(backend=backend, model=model, router=router, routers_dir=routers_dir, kv_policy=kv_policy,
                             onnx_dir=onnx_dir, onnx_dense_dir=onnx_dense_dir, engine_dir=engine_dir,
                             engine_dense_dir=engine_dense_dir, seq_lens=parse_list(seq_lens, int, "--seq-lens"),
                             batches=parse_list(batches, int, "--batch"),
                             sparsities=parse_list(sparsities, float, "--sparsity"), repeats=repeats, warmup=warmup,
                             decode_steps=decode_steps, threads=threads, device=device, dtype=dtype,
                             overhead_seq=overhead_seq, seed=seed)
    result = run_bench(settings, progress=not as_json)
    if out_file:
        from tokenskip.fileio import write_json_atomic

        write_json_atomic(out_file, result)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from .bench.latency import BenchRow, format_table

        click.echo(format_table([BenchRow(**r) for r in result["rows"]]))
        ov = result.get("overhead")
        if ov:
            click.echo(f"{ov['router']} + features at S={ov['seq']}: {ov['router_ms']:.2f} ms router + "
                       f"{ov['window_ms']:.2f} ms attention-score window = {100 * ov['overhead']:.2f}% of dense "
                       f"prefill ({ov['dense_ms']:.1f} ms)")


# ----------------------------------------------------------------------------------- decode-eval
@click.command("decode-eval")
@model_options
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="Plain UTF-8 text file to score instead of the built-in held-out split.")
@click.option("--prompt-len", default=448, show_default=True, help="Routed prompt tokens per window.")
@click.option("--new-tokens", default=64, show_default=True, help="Decoded (scored) tokens per window.")
@click.option("--windows", default=8, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@device_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def decode_eval(ctx, model, router, sparsity, schedule, routers_dir, kv_policy, seed, text_file, prompt_len,
                new_tokens, windows, batch_size, device, dtype, as_json):
    """Decode-time quality: routed prefill + cached decode vs dense prefill + dense decode.

    Scores the true continuation by teacher forcing through decode_step (perplexity, KL, top-1)
    and compares free-running greedy tokens with dense greedy.

    \b
    Examples:
      tokenskip decode-eval --router static --sparsity 0.3
      tokenskip decode-eval --routers out/fit --prompt-len 448 --new-tokens 64 --json
      tokenskip decode-eval --routers out/fit --device cuda --dtype bf16
    """
    from .quality.decode_eval import decode_quality

    if prompt_len < 2 or new_tokens < 1:
        raise UserError("--prompt-len must be >= 2 and --new-tokens >= 1")
    if windows < 1 or batch_size < 1:
        raise UserError("--windows and --batch-size must be >= 1")
    lm, routed, cfg = build_torch_routed(ctx, model, router, sparsity, schedule, routers_dir, kv_policy, seed, device,
                                         dtype)
    if routed.router is None:
        raise UserError("decode-eval compares a routed model with dense: give --sparsity/--schedule or --routers")
    from tokenskip.windows import load_windows

    ids = load_windows(lm.tokenizer, "eval", prompt_len + new_tokens, windows, seed, text_file)
    res = decode_quality(routed, ids, prompt_len, new_tokens, batch_size, progress=not as_json)
    res.update(model=model, router=cfg.router, dtype=dtype, device=str(lm.model.device))
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(f"model {model}, {res['windows']} windows: {prompt_len} routed prompt tokens, {new_tokens} decoded")
        click.echo("| method | sparsity | prefill FLOPs | cont. ppl | ppl ratio | KL | top-1 | greedy agree | "
                   "greedy prefix |")
        click.echo("|---|---|---|---|---|---|---|---|---|")
        click.echo(f"| dense prefill + decode | 0 | 1.000 | {res['dense_ppl']:.2f} | 1.000 | 0 | 1 | 1 | "
                   f"{new_tokens} |")
        click.echo(f"| {cfg.router} ({cfg.kv_policy}) prefill + decode | {res['sparsity']:.3f} | "
                   f"{res['prefill_flops']:.3f} | {res['routed_ppl']:.2f} | {res['ppl_ratio']:.3f} | {res['kl']:.4f} | "
                   f"{res['top1']:.3f} | {res['greedy_agree']:.3f} | {res['greedy_prefix']:.1f} |")
