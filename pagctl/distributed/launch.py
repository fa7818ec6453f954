"""The process group that ``torchrun`` launches pagctl into.

pagctl does not start processes itself; it uses the engine PyTorch users already run.
``torchrun --nproc-per-node N [--nnodes M ...] -m pagctl COMMAND ...`` starts N × M copies
and tells each, through environment variables, who it is: ``RANK`` (0 … world − 1),
``WORLD_SIZE``, ``LOCAL_RANK`` (its index on its machine), and where to meet
(``MASTER_ADDR``, ``MASTER_PORT``). `torchrun_launch` reads them (`training_launch`: if
they are there at all); `process_group` joins the group for the length of a command and
leaves it, so a command that ends (or fails) never leaves a half-open group behind.

Two commands use it:

- ``pagctl attack --shard torchrun``: each rank runs the shard of its rank, all wait at a
  barrier, and rank 0 merges (`pagctl.robustness.evaluate`). A barrier is the only
  collective, so the group uses ``gloo``, which runs on every machine.
- ``pagctl train`` under torchrun: data-parallel training (`pagctl.distributed.replicas`).
  Its collectives carry gradients every step, so the backend follows the device: ``nccl``
  between GPUs, ``gloo`` between CPUs.

The group waits up to `GROUP_TIMEOUT` for a collective: long enough for rank 0 to run the
per-epoch monitor or merge shards while the others wait at a barrier. A rank that dies does
not leave the others waiting that long: torchrun sees the failure and stops the launch.

Exit codes are torchrun's: each process exits as pagctl does in one (2 for a user error,
with its one ``error:`` line), but torchrun, once a process has failed, stops the others,
prints its own report (a ``ChildFailedError`` traceback, the ranks with their codes) and
exits 1 for any failure. pagctl cannot change that without hiding failures (a process
that refused and exited 0 would make the launch look done), so docs/distributed.md says
what a refusal under torchrun looks like; what can be checked before the group is joined
(the batch's slices, ``--download``) is, so every rank refuses it alike at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from pagctl.errors import SpecError

__all__ = ["GROUP_TIMEOUT", "Launch", "barrier", "process_group", "rank_device",
           "torchrun_launch", "training_launch"]

_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

GROUP_TIMEOUT = timedelta(hours=6)
"""How long a collective waits for the other ranks before the group gives up."""


@dataclass(frozen=True)
class Launch:
    """Who this process is in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        """Rank 0: the process that writes results."""
        return self.rank == 0


def training_launch() -> Launch | None:
    """The launch ``pagctl train`` (or ``pagctl.api.train``) runs in: torchrun's, when this
    process was started by torchrun (its ``WORLD_SIZE`` is set), else None (one process).
    SpecError when torchrun's variables are incomplete or inconsistent."""
    if "WORLD_SIZE" not in os.environ:
        return None
    return torchrun_launch("train", "unset WORLD_SIZE to train in one process")


def torchrun_launch(option: str, otherwise: str = "give the shard by hand (I/N)") -> Launch:
    """This process's place in a torchrun launch, from the variables torchrun sets;
    SpecError naming ``option`` (and ``otherwise``, the way without torchrun) when they are
    missing or inconsistent (the process was not started by torchrun)."""
    missing = [name for name in _VARIABLES if name not in os.environ]
    if missing:
        raise SpecError(f"{option}: needs the variables torchrun sets ({', '.join(missing)} "
                        "missing); launch with 'torchrun --nproc-per-node N -m pagctl ...', "
                        f"or {otherwise}")
    try:
        rank, world, local = (int(os.environ[name]) for name in _VARIABLES)
    except ValueError:
        raise SpecError(f"{option}: torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be "
                        "integers") from None
    if not (0 <= rank < world and 0 <= local <= rank):
        raise SpecError(f"{option}: RANK {rank} of WORLD_SIZE {world} (LOCAL_RANK {local}) "
                        "is not a place in a launch")
    return Launch(rank=rank, world_size=world, local_rank=local)


def rank_device(device: str, launch: Launch) -> str:
    """The device a rank runs on: ``auto`` is this rank's GPU on its machine
    (``cuda:LOCAL_RANK``) where there are GPUs, else the CPU; ``cuda`` without an index
    is the rank's GPU too; anything else as given."""
    import torch

    if device == "auto":
        return f"cuda:{launch.local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{launch.local_rank}"
    return device


@contextmanager
def process_group(launch: Launch, backend: Literal["gloo", "nccl"] = "gloo"
                  ) -> Iterator[None]:
    """Join torchrun's process group for the ``with`` block, then leave it. ``nccl``
    binds this process to its GPU (``cuda:LOCAL_RANK``) first."""
    import torch
    import torch.distributed as dist

    if launch.world_size > 1 and not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=GROUP_TIMEOUT)
        try:
            yield
        except BaseException:
            dist.destroy_process_group()
            raise
        # leave together: a rank that tears its group down while a peer's transport threads
        # still talk to it can abort the peer at exit
        dist.barrier()
        dist.destroy_process_group()
    else:
        yield


def barrier() -> None:
    """Wait until every process of the group is here (nothing to wait for alone)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
