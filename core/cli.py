"""The `tokenskip` command line.

Subcommands live next to the code they drive (train/, export/, plugins/, deploy/) and are imported
lazily, so `tokenskip --help` stays fast and a missing optional extra (TensorRT, nvcc, ONNX) only
matters for the command that needs it.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command or group
_COMMANDS: dict[str, str] = {
    "eval": "tokenskip.evaluate_cli:eval_cmd",
    "pipeline": "tokenskip.pipeline:pipeline",
    "search": "tokenskip.train.cli:search",
    "train": "tokenskip.train.cli:train",
    "fit": "tokenskip.train.cli:fit",
    "train-select": "tokenskip.train.cli:train_select_cmd",
    "report": "tokenskip.train.cli:report",
    "longctx": "tokenskip.train.longctx_cli:longctx",
    "export": "tokenskip.export.cli:export",
    "validate": "tokenskip.export.cli:validate",
    "bench-export": "tokenskip.export.cli:bench_export",
    "plugins": "tokenskip.plugins.cli:plugins",
    "build": "tokenskip.deploy.engine.cli:build",
    "generate": "tokenskip.deploy.cli:generate",
    "bench": "tokenskip.deploy.cli:bench",
    "decode-eval": "tokenskip.deploy.cli:decode_eval",
    "explain": "tokenskip.deploy.quality.explain:explain",
    "serve": "tokenskip.deploy.serve.cli:serve",
    "bench-serve": "tokenskip.deploy.serve.cli:bench_serve",
    "triton-repo": "tokenskip.deploy.serve.cli:triton_repo",
}

_HELP = {
    "eval": "Score a routed model against dense (continuation perplexity, KL, top-1, FLOPs).",
    "pipeline": "Run the whole job end to end on a model (default: smollm2-135m).",
    "search": "Genetic search of the per-block sparsity schedule.",
    "train": "Train the shared router with the LLM frozen.",
    "fit": "search -> train -> re-search -> train, as one command.",
    "train-select": "Train the learned one-selection router on long-prompt evidence (kind select).",
    "report": "Markdown table comparing methods at equal FLOPs (--plots: figures).",
    "longctx": "Long-prompt accuracy (needle, kv lookup, article QA) by evidence depth, vs dense.",
    "export": "Export the routed model to ONNX with tokenskip custom ops.",
    "validate": "Check an ONNX export against the PyTorch routed model.",
    "bench-export": "Time an export stage by stage and measure its peak memory.",
    "plugins": "Build the TensorRT plugin library (CUDA).",
    "build": "Build TensorRT engines from an export.",
    "generate": "Generate text with a routed model (PyTorch, ONNX Runtime or TensorRT).",
    "bench": "Benchmark routed vs dense prefill and decode.",
    "decode-eval": "Decode-time quality: routed prefill + cached decode vs dense.",
    "explain": "Which tokens each block runs for one prompt (terminal shading, --json keep masks).",
    "serve": "OpenAI-compatible HTTP server with batching (uvicorn, or Ray Serve with --ray).",
    "bench-serve": "Serving benchmark: throughput and TTFT, routed vs dense, plus KV-cache capacity.",
    "triton-repo": "Write a Triton Inference Server model repository for an export.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str):
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            @click.command(cmd_name, help=_HELP.get(cmd_name, ""))
            def unavailable() -> None:
                raise click.ClickException(f"`tokenskip {cmd_name}` is not available in this install: {exc}")
            return unavailable

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tokenskip")
def main() -> None:
    """tokenskip: FTP token-wise pruning for Hugging Face causal LMs.

    \b
    Examples:
      tokenskip pipeline                      # everything, on the built-in smollm2-135m
      tokenskip eval --router static --sparsity 0.3
      tokenskip export --router static --sparsity 0.3 --out out/export
    """
