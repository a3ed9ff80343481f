"""Processes started by ``torchrun`` (one per device): the process group and its collectives.

``extract`` splits a store's shards over the ranks. ``train`` is data parallel: every rank holds
a full copy of each SAE and trains on its own equal slice of the global batch. Gradients are
averaged over ranks, so with losses that are means over equal-size slices one step equals the
single-process step on the global batch. Collectives are explicit calls (no
``DistributedDataParallel`` wrapper) because the training objective is ``SAE.loss``, not
``forward``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from patchsae.config import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank among world_size processes, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> slice:
        """The rows of a global batch of ``n`` rows that this rank trains on."""
        if n % self.world_size:
            raise ConfigError(
                f"a global batch of {n} rows cannot be split evenly over {self.world_size} "
                "processes: choose a batch size divisible by the number of processes"
            )
        per_rank = n // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def setup(device: str) -> Dist:
    """Join the process group described by the torchrun env (WORLD_SIZE, RANK, LOCAL_RANK).

    Without WORLD_SIZE (or with 1) this is a single process on ``device``. With several, the
    backend is nccl on cuda (each rank on ``cuda:LOCAL_RANK``) and gloo on cpu.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    target = torch.device(device)
    if world_size <= 1:
        return Dist(0, 1, target)
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        # ``torch.distributed.nn.functional`` binds ``group.WORLD`` as a default argument when it is
        # first imported, and the first optimizer built imports it (through ``torch._dynamo``).
        # Imported after the group exists, it would hold the group until interpreter shutdown, so
        # ``teardown`` could not free it; imported first, it binds None.
        importlib.import_module("torch.distributed.nn.functional")
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return Dist(rank, world_size, target)


def teardown(d: Dist, clean: bool) -> None:
    """Leave the process group (no-op for a single process); call it on every rank, last.

    After a clean run every rank first waits at a barrier, so no rank tears down its transport
    (or, on rank 0, the rendezvous store) while a peer still has a collective in flight; then the
    group is destroyed explicitly, which joins the backend's worker threads while the interpreter
    is fully alive (provided nothing else still references the group: see ``setup``). Exiting
    with a live gloo group lets those threads be destroyed during interpreter shutdown, which
    aborts the process (``terminate called without an active exception``). After a failure
    (``clean=False``) the barrier is skipped, since a peer may be blocked in another collective;
    destroying the group then makes the peers' pending collectives fail instead of hanging.
    """
    if not (d.enabled and dist.is_initialized()):
        return
    try:
        if clean:
            barrier(d)
    finally:
        dist.destroy_process_group()


def _check_device(t: torch.Tensor, d: Dist) -> None:
    """Collectives take tensors on this rank's device (nccl has no CPU path)."""
    if t.device != d.device:
        raise ValueError(
            f"a collective got a tensor on {t.device} but this rank runs on {d.device}: "
            "create it on Dist.device"
        )


def all_reduce_sum_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum ``t`` (on ``d.device``) over ranks in place and return it."""
    if d.enabled:
        _check_device(t, d)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients_(module: nn.Module, d: Dist) -> None:
    """Replace each parameter's gradient by its mean over ranks."""
    if not d.enabled:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(d.world_size)


def broadcast_(t: torch.Tensor, d: Dist, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` (on ``d.device``) on every rank with rank ``src``'s value and return it."""
    if d.enabled:
        _check_device(t, d)
        dist.broadcast(t, src=src)
    return t


def barrier(d: Dist) -> None:
    """Wait until every rank reaches this point.

    A one-element all-reduce rather than ``dist.barrier()``: gloo's barrier job keeps references
    to earlier jobs and is freed later by a backend thread, which can outlive the interpreter.
    """
    if d.enabled:
        dist.all_reduce(torch.zeros(1, device=d.device))
