"""`tokenskip serve` (and `bench-serve`, `triton-repo`): the command lines of deploy/serve.

Only click and the standard library are imported at module level; FastAPI, uvicorn and Ray are
imported inside the commands, after a one-line check that names the missing extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from tokenskip.errors import UserError
from tokenskip.evaluate_cli import model_options

from ..cli_backend import BackendChoice, backend_options, backend_spec, given_flags
from .launch import ServeSpec, require_extra

BACKEND_FLAGS = ("model", "router", "sparsity", "schedule", "routers_dir", "kv_policy", "seed", "onnx_dir",
                 "engine_dir", "tokenizer_dir", "device", "dtype", "threads")


def engine_options(f):
    f = click.option("--request-timeout", type=float, default=None,
                     help="Seconds a request may take from arrival to its last token; past it the request ends "
                     "with an error (HTTP 504, code request_timeout; in a stream, an error event). Default: none.")(f)
    f = click.option("--max-step-tokens", type=int, default=512, show_default=True,
                     help="Token budget per scheduler step (continuous batching): the running rows' decode tokens "
                     "plus the prompt tokens prefilled between two decode steps; a longer prompt is prefilled "
                     "in chunks, so running streams never stall for a whole long prefill. 0: off (a prefill "
                     "always goes first, whole).")(f)
    f = click.option("--max-body-bytes", type=int, default=None,
                     help="Largest request body accepted (bigger: HTTP 413, before parsing). Default: 64 bytes per "
                     "token of context, at least 2 MiB.")(f)
    f = click.option("--max-tokens-default", default=256, show_default=True,
                     help="max_tokens when a chat request gives none (capped by the context).")(f)
    f = click.option("--batch-wait-ms", default=5.0, show_default=True,
                     help="Wait this long after a first request to batch its neighbours into one prefill.")(f)
    f = click.option("--batching", type=click.Choice(["continuous", "dynamic"]), default="continuous",
                     show_default=True, help="continuous: new requests join between decode steps; dynamic: a batch "
                     "runs to its end before the next one starts.")(f)
    f = click.option("--kv-cache-gb", type=float, default=None,
                     help="KV-cache budget: admit a sequence only while the analytic cache bytes of the running "
                     "ones (prompt + max_tokens each) fit. Default: no budget.")(f)
    f = click.option("--max-queue", default=256, show_default=True,
                     help="Requests that may wait for a batch slot; one more gets HTTP 429.")(f)
    f = click.option("--max-batch", default=32, show_default=True,
                     help="Sequences decoded together (--engine: default and cap from its engine.json).")(f)
    return f


def spec_from_flags(ctx: click.Context, params: dict) -> ServeSpec:
    if params["max_batch"] < 1 or params["max_queue"] < 1:
        raise UserError("--max-batch and --max-queue must be >= 1")
    if params["kv_cache_gb"] is not None and not params["kv_cache_gb"] > 0:
        raise UserError(f"--kv-cache-gb {params['kv_cache_gb']}: must be > 0")
    if params["max_body_bytes"] is not None and params["max_body_bytes"] < 1024:
        raise UserError(f"--max-body-bytes {params['max_body_bytes']}: must be >= 1024")
    if params["max_step_tokens"] < 0:
        raise UserError(f"--max-step-tokens {params['max_step_tokens']}: must be >= 0 (0: no token budget)")
    if params["request_timeout"] is not None and not params["request_timeout"] > 0:
        raise UserError(f"--request-timeout {params['request_timeout']}: must be > 0 seconds")
    if params["batch_wait_ms"] < 0 or params["max_tokens_default"] < 1:
        raise UserError("--batch-wait-ms must be >= 0 and --max-tokens-default >= 1")
    settings = {"max_batch": params["max_batch"], "max_waiting": params["max_queue"],
                "kv_cache_gb": params["kv_cache_gb"], "continuous": params["batching"] == "continuous",
                "batch_wait_ms": params["batch_wait_ms"], "max_tokens_default": params["max_tokens_default"],
                "max_body_bytes": params["max_body_bytes"], "max_step_tokens": params["max_step_tokens"] or None,
                "request_timeout_s": params["request_timeout"]}
    if params.get("engine_dir"):  # TensorRT: engine.json's max_batch is the default and the cap
        from ..runtime.trt_backend import serve_max_batch

        settings["max_batch"] = serve_max_batch(params["engine_dir"], params["max_batch"],
                                                bool(given_flags(ctx, ("max_batch",))))
    flags, given = {k: params[k] for k in BACKEND_FLAGS}, given_flags(ctx, BACKEND_FLAGS)
    backend_spec(flags, given)  # PyTorch-only flags given with --onnx/--engine: refused before anything loads
    return ServeSpec(backend=flags, given=given, settings=settings, served_model_name=params["served_model_name"])


@click.command("serve")
@model_options
@backend_options
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True)
@click.option("--served-model-name", default=None, help="The `model` name clients send (default: from the source).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve (the `serve-ray` extra).")
@click.option("--replicas", default=1, show_default=True, help="--ray: replicas, one model copy each.")
@click.option("--max-replicas", type=int, default=None, help="--ray: autoscale between --replicas and this.")
@click.option("--cpus-per-replica", default=1.0, show_default=True, help="--ray: CPUs reserved per replica.")
@click.option("--gpus-per-replica", default=0.0, show_default=True, help="--ray: GPUs reserved per replica.")
@click.option("--ray-address", default=None, help="--ray: join this cluster (default: start a local one).")
@click.option("--write-spec", type=click.Path(), default=None,
              help="Write the resolved flags as JSON (for `serve run ...ray_app:app_builder spec=FILE`) and exit.")
@click.pass_context
def serve(ctx, host, port, log_level, use_ray, replicas, max_replicas, cpus_per_replica, gpus_per_replica,
          ray_address, write_spec, **params):
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (streaming over SSE),
    /v1/models, /health and /metrics (Prometheus), with batching across requests.

    \b
    Examples:
      tokenskip serve --onnx out/export --port 8000
      tokenskip serve --routers out/fit --kv-cache-gb 2
      tokenskip serve --model smollm2-135m --router static --sparsity 0.3 --max-batch 16
      tokenskip serve --routers out/fit --device cuda --dtype bf16
      tokenskip serve --engine out/engine --host 0.0.0.0
      tokenskip serve --onnx out/export --ray --replicas 2
    \b
    Then:  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
             -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
    """
    require_extra("serve", "tokenskip serve")
    spec = spec_from_flags(ctx, params)
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise UserError("--replicas must be >= 1 and --max-replicas >= --replicas")
    if write_spec:
        from tokenskip.fileio import write_json_atomic

        write_json_atomic(write_spec, spec.to_json())
        click.echo(f"wrote {write_spec}")
        return
    if use_ray:
        require_extra("serve-ray", "tokenskip serve --ray")
        from . import ray_app

        click.echo(f"tokenskip: Ray Serve, {replicas} replica(s), http://{host}:{port}/v1", err=True)
        ray_app.run(spec, host=host, port=port, replicas=replicas, max_replicas=max_replicas,
                    cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica, address=ray_address)
        return
    from .api_server import build_app
    from .launch import build_async_engine
    from .runner import DRAIN_TIMEOUT_S, bind, draining_server, uvicorn_config

    try:
        sock = bind(host, port)
    except OSError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    engine, name = build_async_engine(spec)
    click.echo(f"tokenskip: serving '{name}' at http://{host}:{sock.getsockname()[1]}/v1 "
               f"({engine.batching} batching, max batch {engine.scheduler.max_batch})", err=True)
    server = draining_server(uvicorn_config(build_app(engine, name), log_level), engine,
                             engine.settings.request_timeout_s or DRAIN_TIMEOUT_S)
    server.run(sockets=[sock])  # SIGTERM: drain, then exit 0


@click.command("bench-serve")
@click.option("--backend", type=BackendChoice("bench-serve"), default="ort", show_default=True)
@click.option("--model", default=None, help="Model (default: the built-in smollm2-135m).")
@click.option("--sparsity", default=0.3, show_default=True, help="Routed side: static router, uniform schedule.")
@click.option("--onnx", "onnx_dir", type=click.Path(), default=None, help="ort: routed export (default: export now).")
@click.option("--onnx-dense", "onnx_dense_dir", type=click.Path(), default=None,
              help="ort: dense export (default: export now).")
@click.option("--concurrency", default="1,8,32", show_default=True)
@click.option("--requests", "num_requests", default=None, type=int, help="Requests per level (default: 2 x level, >= 8).")
@click.option("--prompt-len", default=128, show_default=True)
@click.option("--max-tokens", default=32, show_default=True, help="Tokens generated per request (EOS ignored).")
@click.option("--mixed-lengths", is_flag=True,
              help="Per-request max_tokens uniform in [m/4, 7m/4] (mean --max-tokens): rows finish apart.")
@click.option("--max-batch", default=32, show_default=True)
@click.option("--batching", type=click.Choice(["continuous", "dynamic", "both"]), default="continuous",
              show_default=True)
@click.option("--kv-cache-gb", type=float, default=1.0, show_default=True,
              help="Budget for the admitted-sequences comparison (analytic, both sides).")
@click.option("--threads", type=int, default=None, help="Server threads (PyTorch / ONNX Runtime).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Servers' PyTorch device / ONNX Runtime execution provider.")
@click.option("--seed", default=0, show_default=True)
@click.option("--external", type=click.Choice(["guidellm"]), default=None,
              help="Also drive every level with this external load generator (the `clients` extra) and print its "
              "TTFT, inter-token latency and throughput beside bench-serve's own.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--out", "out_file", type=click.Path(), default=None, help="Also write the JSON here.")
def bench_serve(**params):
    """Serving benchmark: throughput and TTFT (p50/p99) at each concurrency, routed vs dense,
    through the real HTTP server (a `tokenskip serve` subprocess per side), plus KV-cache bytes per
    sequence and how many sequences each side admits under one budget.

    \b
    Examples:
      tokenskip bench-serve --backend ort --concurrency 1,8,32
      tokenskip bench-serve --backend torch --batching both --json --out serve.json
    """
    require_extra("serve", "tokenskip bench-serve")
    from .bench_serve import ServeBenchSettings, format_table, run_bench_serve

    as_json, out_file = params.pop("as_json"), params.pop("out_file")
    result = run_bench_serve(ServeBenchSettings(**params), progress=not as_json)
    if out_file:
        from tokenskip.fileio import write_json_atomic

        write_json_atomic(out_file, result)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if result.get("external") and not as_json:
        from .external import format_cross_check

        click.echo(format_cross_check(result))


@click.command("triton-repo")
@click.argument("export_dir", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(), required=True, help="Model repository folder to write.")
@click.option("--engine", "engine_dir", type=click.Path(), default=None,
              help="TensorRT engines built from this export (full TensorRT): the TensorRT backend instead of ORT.")
@click.option("--name", default=None, help="Model name prefix (default: the export folder's name).")
@click.option("--instance", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Triton instance_group kind.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--json", "as_json", is_flag=True)
def triton_repo(export_dir, out_dir, engine_dir, name, instance, force, as_json):
    """Write a Triton Inference Server model repository for an export: one model <name> for the
    export's one graph (prefill and decode, the KV cache as past.* inputs and new.* outputs) on the
    onnxruntime backend, or on the tensorrt backend with --engine (model.plan and the plugin
    library). See docs/serving.md for what was and was not run.

    \b
    Examples:
      tokenskip triton-repo out/export --out out/triton
      tokenskip triton-repo out/export --engine out/engine --out out/triton-trt
      tritonserver --model-repository out/triton
    """
    from .triton import write_triton_repo

    res = write_triton_repo(export_dir, out_dir, engine_dir=engine_dir, name=name,
                            kind="KIND_GPU" if instance == "gpu" else "KIND_CPU", force=force)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"wrote {res['repository']}: model {res['model']} ({res['backend']} backend)")
    if res["plugin_library"]:
        click.echo(f"start it with: tritonserver --model-repository {res['repository']} "
                   f"--backend-config=tensorrt,plugins={Path(res['repository']).resolve() / res['plugin_library']}")
