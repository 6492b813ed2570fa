"""Decode steps of several ONNX exports alternated in one process (one step of each in turn, after
a prefill of the same random prompt), median ms per token and its ratio to the first export: how
docs/export.md compares two builds of the same side (e.g. dense with the cache joined vs apart),
where `tokenskip bench` compares a routed export with a dense one.
usage: .venv/bin/python scripts/experiments/decode_alternate.py CONTEXT STEPS EXPORT [EXPORT ...]"""
import statistics
import sys
import time
from pathlib import Path

import torch

from tokenskip.deploy.runtime.ort_backend import OrtBackend

ctx, steps, dirs = int(sys.argv[1]), int(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
torch.manual_seed(0)
ids = torch.randint(100, 5000, (1, ctx))  # [1,S]
backends, caches = [], []
for d in dirs:
    be = OrtBackend(d, threads=2)
    be.new_tokens = steps + 2  # the cache's room
    _, cache = be.prefill(ids, torch.ones_like(ids))
    backends.append(be)
    caches.append(cache)
times = [[] for _ in dirs]
tok = ids[:, -1:]  # [1,1]
for i in range(steps):
    for j, be in enumerate(backends):
        t0 = time.perf_counter()
        _, caches[j] = be.decode(tok, torch.tensor([[ctx + i]]), caches[j])
        times[j].append(time.perf_counter() - t0)
med = [statistics.median(t) * 1e3 for t in times]
for d, m in zip(dirs, med):
    print(f"{str(d):50s} {m:7.2f} ms/token  ratio {m / med[0]:.3f}")
