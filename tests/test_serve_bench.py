"""`tokenskip bench-serve` end to end on the tiny model (PyTorch backend): two real servers,
alternating levels, the JSON and the table. Its figures are noise at this size; the recorded
ones come from the real model (docs/benchmarks-results.md)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")

from conftest import bench_serve_args, make_char_tokenizer, make_tiny_llama  # noqa: E402


def test_bench_serve_runs_routed_vs_dense(tmp_path):
    from tokenskip.deploy.serve.cli import bench_serve

    make_tiny_llama(tmp_path, seed=1)
    make_char_tokenizer(tmp_path, vocab_size=256)
    out = tmp_path / "serve.json"
    res = CliRunner().invoke(bench_serve, bench_serve_args(tmp_path, "--concurrency", "1,3", "--requests", 3,
                                                           "--kv-cache-gb", 0.001, "--out", out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    rows = {(r["side"], r["concurrency"]): r for r in data["rows"]}
    assert set(rows) == {(s, c) for s in ("dense", "routed") for c in (1, 3)}
    for r in rows.values():  # every request generated all its tokens (ignore_eos)
        assert r["requests"] == 3 and r["tokens"] == 12 and r["tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0
    kv = data["kv"]
    assert kv["routed"]["bytes_per_sequence"] < kv["dense"]["bytes_per_sequence"]
    assert kv["routed"]["admitted"] > kv["dense"]["admitted"] > 0
    assert "routed/dense tokens/s" in res.output and "admitted" in res.output
