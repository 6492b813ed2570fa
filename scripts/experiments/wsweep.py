"""Score-window sweep: the recency + alpha * attention-rank router (heuristics.py's Mix) with the
attention-score feature computed over the last w prompt rows, for several w, on held-out windows,
paired against static.

usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/experiments/wsweep.py OUT.jsonl SPARSITY KV_POLICY WINDOWS alpha w [w ...]
"""
import sys

import torch

from heuristics import Mix, run  # same folder: the recency + alpha * attention-rank router
from tokenskip.routed import RoutedModel

torch.set_num_threads(1)

out, sp, kv, nwin = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
alpha, ws = float(sys.argv[5]), [int(w) for w in sys.argv[6:]]
run(out, sp, kv, nwin, lambda model, sched: [
    (f"mix{alpha}-w{w}", RoutedModel(model, sched, Mix(alpha), kv_policy=kv, score_window=w)) for w in ws])
