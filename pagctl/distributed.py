"""Beyond one process: the process group that ``torchrun`` launches pagctl into.

pagctl does not start processes itself; it uses the engine PyTorch users already run.
``torchrun --nproc-per-node N [--nnodes M ...] -m pagctl COMMAND ...`` starts N × M copies
and tells each, through environment variables, who it is: ``RANK`` (0 … world − 1),
``WORLD_SIZE``, ``LOCAL_RANK`` (its index on its machine), and where to meet
(``MASTER_ADDR``, ``MASTER_PORT``). `torchrun_launch` reads them; `process_group` joins
the group for the length of a command and leaves it, so a command that ends (or fails)
never leaves a half-open group behind.

Today ``pagctl attack --shard torchrun`` uses it: each rank runs the shard of its rank, all
wait at a barrier, and rank 0 merges (`pagctl.robustness.evaluate`). The collectives there
are a barrier only, so the group uses the ``gloo`` backend, which runs on every machine, with
or without GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pagctl.errors import SpecError

__all__ = ["Launch", "barrier", "process_group", "torchrun_launch"]

_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


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


def torchrun_launch(option: str) -> Launch:
    """This process's place in a torchrun launch, from the variables torchrun sets;
    SpecError naming ``option`` when they are missing or inconsistent (the process was not
    started by torchrun)."""
    missing = [name for name in _VARIABLES if name not in os.environ]
    if missing:
        raise SpecError(f"{option}: needs the variables torchrun sets ({', '.join(missing)} "
                        "missing); launch with 'torchrun --nproc-per-node N -m pagctl ...', "
                        "or give the shard by hand (I/N)")
    try:
        rank, world, local = (int(os.environ[name]) for name in _VARIABLES)
    except ValueError:
        raise SpecError(f"{option}: torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be "
                        "integers") from None
    if not (0 <= rank < world and 0 <= local <= rank):
        raise SpecError(f"{option}: RANK {rank} of WORLD_SIZE {world} (LOCAL_RANK {local}) "
                        "is not a place in a launch")
    return Launch(rank=rank, world_size=world, local_rank=local)


@contextmanager
def process_group(launch: Launch) -> Iterator[None]:
    """Join torchrun's process group (``gloo``) for the ``with`` block, then leave it."""
    import torch.distributed as dist

    if launch.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size)
        try:
            yield
        finally:
            dist.destroy_process_group()
    else:
        yield


def barrier() -> None:
    """Wait until every process of the group is here (nothing to wait for alone)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
