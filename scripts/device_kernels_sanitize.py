"""Small calls of every tokenskip kernel, for compute-sanitizer (memcheck, racecheck) on the GPU machine.

    compute-sanitizer --tool memcheck python3 scripts/device_kernels_sanitize.py LIB

Both selection paths with padding, NaN and ties, odd lengths, the gather, ScatterTokens out of
place and in place; each result checked against the numpy reference (exit 1 on a mismatch)."""

import sys

import numpy as np
import torch

from tokenskip import ops_reference as R
from tokenskip.plugins import kernels


def main(lib: str) -> int:
    rng = np.random.default_rng(0)
    bad = 0
    for S in (5, 1000, 2049, 9000):
        B = 3
        scores = rng.integers(0, 4, (B, S)).astype(np.float32)
        scores[rng.random((B, S)) < 0.2] = np.nan
        valid = np.arange(S)[None, :] >= np.array([0, S // 3, S - 1])[:, None]
        ref = R.topk_gather(np.zeros((B, S, 1), np.float32), scores, 3, 5, 2, valid)[1]
        for algo in ("single", "multi"):
            idx = kernels.topk_select(lib, torch.from_numpy(scores).cuda(), (3, 5, 2), torch.from_numpy(valid).cuda(),
                                      algo)
            bad += not np.array_equal(idx.cpu().numpy(), ref)
        hidden = torch.randn(B, S, 24, device="cuda", dtype=torch.bfloat16)
        kept, index = kernels.topk_gather(lib, hidden, torch.from_numpy(scores).cuda(), (3, 5, 2),
                                          torch.from_numpy(valid).cuda())
        delta = torch.randn_like(kept)
        out = kernels.scatter_tokens(lib, hidden, delta, index)
        kernels.scatter_tokens_inplace(lib, hidden, delta, index)
        bad += not torch.equal(out, hidden)
    torch.cuda.synchronize()
    print("sanitizer workload:", "ok" if bad == 0 else f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
