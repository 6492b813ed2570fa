"""Prefill of one ONNX export with and without the runtime's causal query chunks
(deploy/runtime/ort_chunks.py), alternating in one process: median ms of each and their ratio.
usage: .venv/bin/python scripts/experiments/chunks_alternate.py S REPEATS EXPORT"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from tokenskip.deploy.runtime.ort_backend import CHUNKS_ENV, OrtBackend

S, reps, export = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
ids = torch.randint(100, 5000, (1, S), generator=torch.Generator().manual_seed(0))  # [1,S]
backends = {}
for chunks in (1, 4):
    os.environ[CHUNKS_ENV] = str(chunks)  # read when the session is made
    be = OrtBackend(export, threads=2)
    be.new_tokens = 4
    be.prefill(ids, torch.ones_like(ids))  # warm-up
    backends[chunks] = be
times = {c: [] for c in backends}
for _ in range(reps):
    for c, be in backends.items():
        t0 = time.perf_counter()
        be.prefill(ids, torch.ones_like(ids))
        times[c].append(time.perf_counter() - t0)
med = {c: statistics.median(t) * 1e3 for c, t in times.items()}
print(f"{export} S={S}: 1 chunk {med[1]:.0f} ms, 4 chunks {med[4]:.0f} ms, ratio {med[4] / med[1]:.3f}")
