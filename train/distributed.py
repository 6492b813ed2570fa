"""Data-parallel router training and sparsity search over processes (torchrun / accelerate launch).

The LLM is frozen, so every process holds its own replica of it (loaded once, in --dtype, on its
own GPU) and only the router learns. What is split, and how the processes stay identical:

- training: the global batch of a step (a function of seed and step only, tokenskip.train.trainer)
  is cut into contiguous shares, one per process. Every loss term is a mean over windows or tokens
  and is computed with `global_mean`: its value is the mean over the whole global batch (one
  all-reduce of the (sum, count) pair) and its gradient is this process's share of it. Summing the
  router's gradients over processes (`sum_gradients`, one all-reduce of a flat buffer: DDP's
  semantics) then gives exactly the one-process gradient, including through the sparsity loss's
  relu of the batch-mean achieved sparsity, which a per-process loss would get wrong.
- search: each GA fitness evaluation scores this process's share of the calibration windows; the
  per-window KLs are gathered in window order and averaged in that order on every process
  (`window_mean`), so every process sees the same fitness, takes the same GA steps (same seed) and
  ends with the same schedule.
- files: only rank 0 writes (atomically, as always); a checkpoint is read by rank 0 and broadcast,
  so resuming needs no shared file system.

Why not `DistributedDataParallel` (or accelerate's `prepare`) on the router: the routed model calls
the router once per routed block of every forward (through `scores`, not `forward`), and DDP's
reducer expects one forward per backward. An all-reduce of the router's 4 gradient tensors after
backward is what DDP would do, without the hooks. Processes are started by torchrun or
`accelerate launch`; accelerate's PartialState sets up the process group (NCCL on GPUs, gloo on
CPUs) and picks each process's GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from tokenskip.errors import UserError


@dataclass
class Dist:
    """This process's place in the job. The default is the one-process job (every method is then
    the plain local computation, bit for bit)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- splitting ------------------------------------------------------------------------------------
    def share(self, n: int) -> slice:
        """This process's contiguous share of n items (sizes differ by at most one, earlier ranks
        larger, as torch.tensor_split)."""
        q, r = divmod(n, self.world)
        start = self.rank * q + min(self.rank, r)
        return slice(start, start + q + (1 if self.rank < r else 0))

    # -- collectives ------------------------------------------------------------------------------------
    def global_mean(self, total: Tensor, count) -> Tensor:
        """Mean over all processes of a quantity whose local sum is `total` over `count` items.

        Value: global sum / global count (the same on every process). Gradient: d total / global
        count, this process's share, so summing gradients over processes gives the gradient of
        the global mean."""
        if not self.active:
            return total / count
        import torch.distributed as dist

        pair = torch.stack([total.detach().float().reshape(()),
                            torch.as_tensor(count, dtype=torch.float32, device=total.device).reshape(())])  # [2]
        dist.all_reduce(pair)
        return (total - total.detach() + pair[0].to(total.dtype)) / pair[1].to(total.dtype)

    def sum_gradients(self, params) -> None:
        """All-reduce (sum) the gradients of `params` in one flat buffer."""
        if not self.active:
            return
        import torch.distributed as dist

        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # [n]
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every process (tensors inside must be on the CPU)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, fn: Callable[[], object]):
        """fn() on rank 0, its result on every process. A UserError raised there (a refused
        checkpoint, a bad file) is raised on every process, so none waits forever."""
        if not self.active:
            return fn()
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except UserError as exc:
                outcome = ("error", str(exc))
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise UserError(value)
        return value

    def resume_on_main(self, load: Callable[[], object], router: torch.nn.Module, opt: torch.optim.Optimizer,
                       scaler=None):
        """Resume training: `load()` reads a checkpoint into router/opt/scaler on rank 0 (no shared
        file system needed) and returns its state, or None when there is none; every other process
        then takes rank 0's router, optimizer and scaler state. Returns load()'s result everywhere;
        a refused checkpoint is refused on every process."""
        if not self.active:
            return load()

        def on_main():
            state = load()
            if state is None:
                return None
            opt_state = opt.state_dict()  # tensors to the CPU: pickled tensors would land on rank 0's GPU
            opt_state["state"] = {i: {k: v.cpu() for k, v in st.items()} for i, st in opt_state["state"].items()}
            return (state, {k: v.cpu() for k, v in router.state_dict().items()}, opt_state,
                    None if scaler is None else scaler.state_dict())

        got = self.run_on_main(on_main)
        if got is None:
            return None
        state, router_state, opt_state, scaler_state = got
        if not self.is_main:
            router.load_state_dict(router_state)
            opt.load_state_dict(opt_state)
            if scaler is not None:
                scaler.load_state_dict(scaler_state)
        return state

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Overwrite every parameter and buffer with rank 0's (in place)."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def window_mean(self, n: int, local_values: Callable[[slice], list[float]]) -> float:
        """Mean of per-window values over n windows, each process scoring its share.

        `local_values(share)` returns the values of windows[share] (in order). The values are
        gathered in window order and summed in that order, so every process gets the same float,
        equal to the one-process sum(values) / n."""
        sl = self.share(n)
        mine = list(local_values(sl)) if sl.stop > sl.start else []
        values = [v for part in self.gather(mine) for v in part]
        if len(values) != n:
            raise RuntimeError(f"window_mean: gathered {len(values)} values for {n} windows")
        return sum(values) / n

    def weighted_mean(self, values: list[float], weight: float) -> list[float]:
        """Elementwise mean of each process's `values`, weighted by its `weight` (e.g. the tokens
        it measured them on); one process returns `values` unchanged."""
        if not self.active:
            return list(values)
        parts = [(v, w) for v, w in self.gather((list(values), float(weight))) if w > 0]
        total = sum(w for _, w in parts)
        return [sum(v[i] * w for v, w in parts) / total for i in range(len(values))]

    def check_same(self, module: torch.nn.Module, what: str) -> None:
        """Raise if `module`'s tensors differ between processes (they must stay identical)."""
        if not self.active:
            return
        sums = [float(t.double().sum()) for t in module.state_dict().values()]
        every = self.gather(sums)
        if any(s != every[0] for s in every[1:]):
            raise RuntimeError(f"{what} differs between processes: {every}")


SINGLE = Dist()


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when launched plainly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number") from None


def init_distributed(device: str = "cpu") -> Dist:
    """This process's Dist from the launcher's environment; a one-process Dist when not launched
    by torchrun / accelerate. `device` is --device: cpu (gloo) or cuda/auto (one GPU per process,
    NCCL)."""
    from tokenskip.precision import resolve_device

    want = resolve_device(device)
    if world_size_from_env() <= 1:
        return Dist(device=want)
    try:
        from accelerate import PartialState
    except ImportError:
        raise UserError("several processes (WORLD_SIZE > 1) need Hugging Face accelerate: "
                        "pip install 'tokenskip[dist]'") from None
    state = PartialState(cpu=want.type == "cpu")
    dev = torch.device("cpu") if want.type == "cpu" else torch.device(state.device)
    return Dist(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index,
                device=dev)
