"""External clients against `tokenskip serve`: guidellm as a load generator (`bench-serve --external
guidellm`, tests/test_serve_loadgen.py) and the lookup both it and lm-evaluation-harness
(tests/test_serve_lm_eval.py) use to find an interpreter that has them.

Why an external generator at all: bench-serve's client is ours, so a bug shared by our client and
our server (a miscounted token, a TTFT taken at the wrong event) would never show in its numbers.
guidellm (vLLM's load generator) measures the same server with its own client, data and clock.

Both clients are the `clients` extra, installed with the package; an interpreter elsewhere (another
venv) can stand in through TOKENSKIP_CLIENTS_PYTHON. guidellm runs as a subprocess (`python -m
guidellm run`), offline (synthetic prompts sized with a local tokenizer), one worker process, a
request-count bound, and writes one JSON file that `guidellm_summary` reduces to the figures
bench-serve prints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tokenskip.errors import UserError

CLIENTS_ENV = "TOKENSKIP_CLIENTS_PYTHON"
EXTERNAL_CLIENTS = ("guidellm",)  # bench-serve --external choices
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def client_python(module: str) -> str | None:
    """The interpreter that can run `python -m <module>`: this one when it imports the module, else
    $TOKENSKIP_CLIENTS_PYTHON when that one does; None when neither (the caller says how to install)."""
    if importlib.util.find_spec(module) is not None:
        return sys.executable
    other = os.environ.get(CLIENTS_ENV)
    if other and subprocess.run([other, "-c", f"import {module}"], capture_output=True).returncode == 0:
        return other
    return None


def require(name: str) -> None:
    """A UserError before any server starts when the external client `name` cannot be run."""
    if name not in EXTERNAL_CLIENTS:
        raise UserError(f"--external {name}: not one of {', '.join(EXTERNAL_CLIENTS)}")
    if client_python(name) is None:
        raise UserError(f"--external {name}: {missing_client(name)}")


def missing_client(module: str) -> str:
    return (f"{module} is not installed: pip install 'tokenskip[clients]' (or point {CLIENTS_ENV} at a Python "
            f"that has it)")


def guidellm_command(python: str, url: str, tokenizer: str, *, requests: int, prompt_tokens: int,
                     output_tokens: int, concurrency: int | None = None, rate: float | None = None,
                     mixed_lengths: bool = False, seed: int = 0, out_file: str = "guidellm.json") -> list[str]:
    """`guidellm run` against url's /v1/completions: `concurrency` streams back to back (as bench-serve's
    clients) or a constant `rate` in requests/s; stops after `requests` requests. mixed_lengths: output
    lengths spread over [m/4, 7m/4] like bench-serve's (guidellm draws them from a normal clipped there,
    with the uniform's standard deviation)."""
    if (concurrency is None) == (rate is None):
        raise UserError("guidellm: give exactly one of a concurrency or a rate")
    profile = f"kind=concurrent,streams={concurrency}" if concurrency is not None else f"kind=constant,rate={rate}"
    data = f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}"
    if mixed_lengths:
        lo, hi = max(1, output_tokens // 4), output_tokens * 7 // 4
        data += f",output_tokens_min={lo},output_tokens_max={hi},output_tokens_stdev={max(1, round((hi - lo) / 12 ** 0.5))}"
    return [python, "-m", "guidellm", "run",
            "--backend", f"kind=openai_http,target={url},request_format=/v1/completions",
            "--profile", profile, "--constraint", f"kind=max_requests,count={requests}",
            "--data", data, "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--seed", f"kind=static,value={seed}", "--output", f"kind=json,path={out_file}",
            "--disable-console-interactive"]


def run_guidellm(url: str, tokenizer: str, out_dir: str | Path, *, timeout: float = 600.0, **load) -> dict:
    """Run guidellm once (guidellm_command's `load` arguments) and return guidellm_summary of its JSON.
    A UserError with guidellm's last lines when it fails or runs past `timeout` seconds."""
    python = client_python("guidellm")
    if python is None:
        raise UserError(f"--external guidellm: {missing_client('guidellm')}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / "guidellm.json"
    cmd = guidellm_command(python, url, tokenizer, out_file=str(result.resolve()), **load)
    # one worker process: on a small machine more would compete with the server they measure
    env = {**os.environ, **OFFLINE, "GUIDELLM__MAX_WORKER_PROCESSES": "1",
           "GUIDELLM__DEFAULT_RESULTS_DIR": str(out_dir), "HF_DATASETS_CACHE": str(out_dir / "hf-datasets")}
    # its own session: on a timeout the whole group goes (guidellm's worker processes too)
    proc = subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise UserError(f"guidellm did not finish within {timeout:.0f} s against {url}") from None
    (out_dir / "guidellm.log").write_text(log)
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise UserError(f"guidellm failed (exit {proc.returncode}) against {url}:\n{tail}")
    return guidellm_summary(json.loads(result.read_text()))


def _stat(metrics: dict, name: str, key: str) -> float:
    s = metrics[name]["successful"]
    return float(s["median"] if key == "p50" else s["percentiles"][key] if key.startswith("p") else s[key])


def guidellm_summary(report: dict) -> dict:
    """guidellm's benchmarks.json (one benchmark) -> bench-serve's figures, plus the request counts.
    tokens_per_s is output tokens of successful requests over the benchmark's duration (bench-serve's
    definition); itl is guidellm's inter-token latency, per request (time after the first token over
    the tokens after it), whose median is over requests, where bench-serve's ms/token is over gaps."""
    if len(report.get("benchmarks", [])) != 1:
        raise UserError(f"guidellm: expected one benchmark in its report, found {len(report.get('benchmarks', []))}")
    bench = report["benchmarks"][0]
    m, counts = bench["metrics"], bench["metrics"]["request_totals"]
    ok = bench["requests"]["successful"]  # every request: the report samples none unless asked to
    out = int(m["output_token_count"]["successful"]["total_sum"])
    return {"client": "guidellm", "requests": int(counts["successful"]), "errored": int(counts["errored"]),
            "incomplete": int(counts["incomplete"]), "tokens": out, "wall_s": bench["duration"],
            "tokens_per_s": out / bench["duration"] if bench["duration"] else float("nan"),
            "ttft_p50_ms": _stat(m, "time_to_first_token_ms", "p50"),
            "ttft_p99_ms": _stat(m, "time_to_first_token_ms", "p99"),
            "itl_p50_ms": _stat(m, "inter_token_latency_ms", "p50"),
            "prompt_tokens": [r["prompt_tokens"] for r in ok], "output_tokens": [r["output_tokens"] for r in ok]}


def format_cross_check(result: dict) -> str:
    """bench-serve's rows and the external client's, side by side (bench-serve --external)."""
    lines = ["", f"Cross-check: bench-serve's client vs {result['external'][0]['client']} on the same servers",
             "", "| batching | concurrency | side | client | requests | errors | tokens/s | TTFT p50 ms | TTFT p99 ms "
             "| ms/token p50 |", "|---|---|---|---|---|---|---|---|---|---|"]
    own = {(r["batching"], r["concurrency"], r["side"]): r for r in result["rows"]}
    for ext in sorted(result["external"], key=lambda r: (r["batching"], r["concurrency"], r["side"])):
        mine = own[(ext["batching"], ext["concurrency"], ext["side"])]
        for client, r, tok in (("bench-serve", mine, mine["tpot_p50_ms"]), (ext["client"], ext, ext["itl_p50_ms"])):
            errors = r.get("errored", 0) + r.get("incomplete", 0)
            lines.append(f"| {ext['batching']} | {ext['concurrency']} | {ext['side']} | {client} | {r['requests']} | "
                         f"{errors} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                         f"{tok:.1f} |")
    return "\n".join(lines)
