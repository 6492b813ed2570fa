"""An external load generator, guidellm, against a live `tokenskip serve` on 127.0.0.1 (the tiny
model, a subprocess on a free port): a bounded run (a few dozen requests, one worker process, it
stops by itself) must finish with zero errors, and what guidellm counted (requests, prompt and
output tokens of each request) must equal what the server counted (/metrics). Then `bench-serve
--external guidellm` end to end: guidellm's row beside bench-serve's own for every level and side.

guidellm comes from the `clients` extra (tokenskip.deploy.serve.external.client_python); without it
these tests skip with the reason.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")

from tokenskip.deploy.serve.external import client_python, missing_client, run_guidellm  # noqa: E402
from tokenskip.deploy.serve.runner import ServerProcess  # noqa: E402

from conftest import bench_serve_args, metric_samples  # noqa: E402

COMPLETIONS_OK = ("tokenskip_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))


@pytest.fixture(scope="module")
def guidellm():
    if client_python("guidellm") is None:
        print(f"SKIP REASON: {missing_client('guidellm')}")
        pytest.skip(missing_client("guidellm"))


def counters(url: str) -> tuple[float, float, float]:
    m = metric_samples(url)
    return (m.get(COMPLETIONS_OK, 0.0), m[("tokenskip_prompt_tokens_total", ())],
            m[("tokenskip_generation_tokens_total", ())])


def test_guidellm_at_a_constant_rate_counts_what_the_server_counts(guidellm, tiny_served, tmp_path):
    n, rate, prompt, out = 24, 8.0, 32, 8
    with ServerProcess(["--model", str(tiny_served), "--router", "static", "--sparsity", "0.5", "--threads", "1",
                        "--max-batch", "8", "--log-level", "warning"]) as server:
        before = counters(server.url)
        res = run_guidellm(server.url, str(tiny_served), tmp_path / "guidellm", requests=n, prompt_tokens=prompt,
                           output_tokens=out, rate=rate, timeout=300)
        after = counters(server.url)
    assert (res["requests"], res["errored"], res["incomplete"]) == (n, 0, 0)
    # guidellm sends ignore_eos and reads the server's usage: every output is exactly as long as asked; its
    # synthetic prompt text may come out one token short (a trailing space it drops), never longer
    assert res["output_tokens"] == [out] * n and res["tokens"] == n * out
    assert all(prompt - 1 <= p <= prompt for p in res["prompt_tokens"]), res["prompt_tokens"]
    assert [a - b for a, b in zip(after, before)] == [n, sum(res["prompt_tokens"]), n * out]
    assert res["wall_s"] >= 0.9 * (n - 1) / rate  # a constant rate, not a burst
    assert 0 < res["ttft_p50_ms"] <= res["ttft_p99_ms"] and res["itl_p50_ms"] > 0 and res["tokens_per_s"] > 0


def test_bench_serve_external_guidellm_runs_beside_its_own_client(guidellm, tiny_served, tmp_path):
    from tokenskip.deploy.serve.cli import bench_serve

    out = tmp_path / "serve.json"
    res = CliRunner().invoke(bench_serve, bench_serve_args(tiny_served, "--concurrency", 2, "--requests", 4,
                                                           "--external", "guidellm", "--out", out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    own = {(r["side"], r["concurrency"]): r for r in data["rows"]}
    ext = {(r["side"], r["concurrency"]): r for r in data["external"]}
    assert set(ext) == set(own) == {("dense", 2), ("routed", 2)}
    for key, r in ext.items():
        assert r["client"] == "guidellm" and (r["requests"], r["errored"], r["incomplete"]) == (4, 0, 0)
        assert r["tokens"] == own[key]["tokens"] == 16 and all(39 <= p <= 40 for p in r["prompt_tokens"])
        assert r["tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0
    assert "Cross-check: bench-serve's client vs guidellm" in res.output
    assert res.output.count("| guidellm |") == 2 and res.output.count("| bench-serve |") == 2
