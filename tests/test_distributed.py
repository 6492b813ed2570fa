"""Data-parallel router training and search over processes (train/distributed.py, docs/gpu.md).

The real check runs 2 processes with torchrun on the CPU (gloo) on the tiny random Llama: a whole
`tokenskip fit --budget tiny` through the CLI, plus a router training interrupted and resumed, and
compares them with the same job in one process (same global batch): the same schedules, routers
equal within 1e-5, losses within 1e-5 relative, and resuming still byte-exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import TEXT, _make_model

ROOT = Path(__file__).resolve().parents[1]
ROUTER_TOL = 1e-5  # max |difference| of any router weight, 1 vs 2 processes (measured: 3e-8)
LOSS_TOL = 1e-5  # relative difference of every logged loss (measured: 1e-6, the rounding of the log)

RUNNER = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.test_distributed import job
from tokenskip.train.distributed import init_distributed
job(sys.argv[1], sys.argv[2], Path(sys.argv[3]), init_distributed("cpu"))
"""


def job(model_dir: str, text: str, out: Path, dist) -> None:
    """What both runs do: `tokenskip fit --budget tiny` through the CLI, then router training run
    through (full/) and interrupted after 5 steps and resumed (cut/)."""
    from tokenskip.cli import main
    from tokenskip.models import load_model
    from tokenskip.schedule import Schedule
    from tokenskip.train.common import windows
    from tokenskip.train.trainer import TrainSettings, train_router

    main(["fit", "--model", model_dir, "--sparsity", "0.3", "--budget", "tiny", "--out", str(out / "fit"),
          "--calib-text", text, "--train-text", text], standalone_mode=False)
    lm = load_model(model_dir)
    ids = windows(lm.tokenizer, "train", text, 32, 6)
    sched = Schedule((0.0, 0.5, 0.5, 0.2))
    st = TrainSettings(steps=7, seq_len=32, cont_len=8, batch_size=4, windows=6, checkpoint_every=2, validate_every=3,
                       lr=0.05)
    train_router(lm.model, sched, ids, ids[:3], st, out / "full", progress=False, dist=dist)
    with pytest.raises(KeyboardInterrupt):
        train_router(lm.model, sched, ids, ids[:3], st, out / "cut", progress=False, stop_after=5, dist=dist)
    train_router(lm.model, sched, ids, ids[:3], st, out / "cut", progress=False, dist=dist)


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    model_dir = _make_model(base / "tiny")
    text = base / "corpus.txt"
    text.write_text(TEXT, encoding="utf-8")
    return base, str(model_dir), str(text)


def _routers(path: Path) -> dict:
    from tokenskip.fileio import load_safetensors

    return load_safetensors(path / "router.safetensors")


def _losses(path: Path) -> list[float]:
    return [h["loss"] for h in json.loads((path / "train_history.json").read_text())["history"] if "loss" in h]


def test_two_processes_match_one(tiny_job):
    from tokenskip.train.distributed import Dist

    base, model_dir, text = tiny_job
    one, two = base / "one", base / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets each process (2 threads on 2 busy cores only slow it down)
    try:
        job(model_dir, text, one, Dist())
    finally:
        torch.set_num_threads(threads)
    runner = base / "runner.py"
    runner.write_text(RUNNER.format(root=str(ROOT)))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(runner), model_dir, text, str(two)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # only rank 0 wrote: no temporary files left, one result per folder
    assert not [p for p in two.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    fit = json.loads((two / "fit" / "fit.json").read_text())
    assert fit["processes"] == 2 and json.loads((one / "fit" / "fit.json").read_text())["processes"] == 1
    # every process reached the same schedules as one process
    for stage in ("search-static", "search-learned"):
        a = json.loads((one / "fit" / stage / "schedule.json").read_text())
        b = json.loads((two / "fit" / stage / "schedule.json").read_text())
        assert a["sparsity"] == b["sparsity"], stage
        assert b["fitness"] == pytest.approx(a["fitness"], rel=1e-5)
    # the same routers, within tolerance, and the same losses
    for sub in ("fit/router-1", "fit/routers", "full"):
        ra, rb = _routers(one / sub), _routers(two / sub)
        assert ra.keys() == rb.keys()
        worst = max(float((ra[k] - rb[k]).abs().max()) for k in ra)
        assert worst <= ROUTER_TOL, (sub, worst)
        la, lb = _losses(one / sub), _losses(two / sub)
        assert len(la) == len(lb) and all(abs(x - y) <= LOSS_TOL * max(1.0, abs(x)) for x, y in zip(la, lb)), sub
    # resuming under 2 processes (rank 0 reads the checkpoint, every process takes it) stays exact
    for name in ("router.safetensors", "tokenskip.json", "train_history.json"):
        assert (two / "full" / name).read_bytes() == (two / "cut" / name).read_bytes(), name


def test_shares_cover_every_item_once():
    from tokenskip.train.distributed import Dist

    for world in (1, 2, 3, 8):
        for n in (0, 1, 5, 8, 13):
            parts = [Dist(rank=r, world=world).share(n) for r in range(world)]
            got = [i for sl in parts for i in range(n)[sl]]
            assert got == list(range(n))
            sizes = [sl.stop - sl.start for sl in parts]
            assert max(sizes) - min(sizes) <= 1


def test_one_process_collectives_are_the_plain_computation():
    from tokenskip.train.distributed import Dist

    d = Dist()
    total = torch.tensor(6.0, requires_grad=True)
    assert float(d.global_mean(total, 4).detach()) == 1.5
    assert d.window_mean(3, lambda sl: [1.0, 2.0, 4.0][sl]) == 7.0 / 3
    assert d.weighted_mean([0.5, 0.25], 10) == [0.5, 0.25]
    assert d.run_on_main(lambda: 7) == 7


def test_batch_smaller_than_processes_is_refused(tiny_llama):
    from tokenskip.errors import UserError
    from tokenskip.schedule import Schedule
    from tokenskip.train.distributed import Dist
    from tokenskip.train.trainer import TrainSettings, train_router

    model, _ = tiny_llama
    ids = torch.randint(0, 256, (4, 32))
    st = TrainSettings(steps=1, seq_len=32, cont_len=8, batch_size=1)
    with pytest.raises(UserError, match="--batch-size 1: the global batch must hold at least one window per process"):
        train_router(model, Schedule((0.0, 0.5, 0.5, 0.0)), ids, ids[:2], st, "/nonexistent", dist=Dist(world=2))
