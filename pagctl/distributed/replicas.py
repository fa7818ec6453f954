"""Data-parallel training: every process of a torchrun launch is a replica of the model that
takes its slice of each global batch, and the replicas stay one model.

This is DistributedDataParallel's algorithm with its all-reduce made explicit:

- **The batch.** ``data.batch_size`` is the global batch, whatever the process count N and
  the accumulation steps A. Each step's B images (the seeded order of the epoch, the same on
  every rank) are cut into N·A equal slices; rank r takes slices r·A … r·A + A − 1, one
  micro-batch each (`Replicas.micro_slices`). The last batch of an epoch (without
  ``train.drop_last``) is cut as evenly as it goes.
- **The gradients.** Each micro-batch's loss is its mean over its rows, weighted by its share
  of the global batch, so the sum over all slices is the global batch's mean; one all-reduce
  (a sum, in one flat buffer) after the last micro-batch makes every replica's gradient the
  global batch's (`Replicas.finish_step`). The same buffer carries whether any rank was asked
  to stop and the step's summed loss, so all ranks stop, or refuse a non-finite loss, at the
  same step.
- **Why not the DDP wrapper.** The PAG term differentiates input gradients taken with
  ``create_graph`` (a double backward), the ``repeat`` and ``batched`` gradient methods and
  the augmentation call the network outside a wrapper's ``forward``, and torch's
  SyncBatchNorm has no second derivative. DDP's reducer hooks fire inside the backward and
  assume one backward per forward; the explicit all-reduce after the backward (DDP's
  ``no_sync`` plus one all-reduce) has none of these limits and gives the same gradient.
- **BatchNorm.** With ``train.sync_batchnorm`` (the default), `synchronise_batchnorm` gives
  every BatchNorm layer its statistics over the whole micro-batch across ranks
  (`SyncedBatchNorm`): a sum all-reduced inside the graph with
  `sum_over_ranks`, whose backward is an all-reduce again, so
  input gradients, their double backward and the running statistics are those of one
  process holding the whole batch. Without it each rank normalises by its own slice (DDP's
  default). Either way the buffers (running statistics) are broadcast from rank 0 after every
  step (`Replicas.sync_buffers`), so replicas never drift, as DDP's ``broadcast_buffers``.
- **The start.** `Replicas.start` broadcasts rank 0's parameters and buffers, so the replicas
  begin identical even if their initialisation were not.

With one process and one accumulation step, nothing here runs: the single-process loop is the
loop as it always was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagctl.errors import SpecError

__all__ = ["Replicas", "SyncedBatchNorm", "local_statistics", "sum_over_ranks",
           "synchronise_batchnorm"]


@dataclass(frozen=True)
class Replicas:
    """This process's place among the replicas: ``rank`` of ``world_size`` processes, each
    step in ``accumulation`` micro-batches."""

    rank: int = 0
    world_size: int = 1
    accumulation: int = 1

    @property
    def parts(self) -> int:
        """How many slices a global batch is cut into (processes × accumulation steps)."""
        return self.world_size * self.accumulation

    @property
    def leader(self) -> bool:
        """Rank 0: the replica that writes the run folder and runs the monitor."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process: the replicas talk (collectives)."""
        return self.world_size > 1

    def check(self, batch_size: int, n_train: int | None, drop_last: bool) -> None:
        """Refuse a global batch that does not cut into `parts` slices: SpecError naming
        ``data.batch_size`` (and how to fix it). ``n_train`` (None before the data are
        loaded): the training images, whose last batch must have a row for every slice."""
        how = (f"{self.world_size} process(es) × train.accumulation_steps "
               f"{self.accumulation}")
        if batch_size % self.parts:
            raise SpecError(f"data.batch_size: {batch_size} does not divide into {self.parts} "
                            f"equal slices ({how}); choose a multiple of {self.parts}, or "
                            "another process count or accumulation")
        last = 0 if drop_last or n_train is None else n_train % batch_size
        if 0 < last < self.parts:
            raise SpecError(f"data.batch_size: the last batch of each epoch holds {last} of "
                            f"the {n_train} training images, fewer than the {self.parts} "
                            f"slices it is cut into ({how}); set train.drop_last: true or "
                            "choose another batch size")

    def micro_slices(self, rows: int) -> list[slice]:
        """This rank's micro-batches of a global batch of ``rows`` images: slices
        ``rank·A … rank·A + A − 1`` of the batch cut into `parts` slices as evenly as it goes
        (the first ``rows mod parts`` one image longer)."""
        base, extra = divmod(rows, self.parts)
        out = []
        for part in range(self.rank * self.accumulation, (self.rank + 1) * self.accumulation):
            start = part * base + min(part, extra)
            out.append(slice(start, start + base + (part < extra)))
        return out

    def part(self, micro: int) -> int:
        """The global index of this rank's ``micro``-th slice (0 … parts − 1)."""
        return self.rank * self.accumulation + micro

    # -- collectives (none with one process)

    def start(self, model: nn.Module) -> None:
        """Make every replica rank 0's: broadcast its parameters and buffers."""
        if self.distributed:
            _broadcast([*model.parameters(), *model.buffers()])

    def finish_step(self, model: nn.Module, stop: bool, loss_sum: float
                    ) -> tuple[bool, float]:
        """After the step's backward passes: sum every replica's gradients (a parameter
        without a gradient on every rank keeps none), and agree on stopping. Returns
        (whether any rank was asked to stop, the loss summed over the global batch's rows).
        """
        if not self.distributed:
            return stop, loss_sum
        import torch.distributed as dist

        params = [p for p in model.parameters() if p.requires_grad]
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        device = params[0].device if params else torch.device("cpu")
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                  for p in params]
        flags = torch.tensor([float(p.grad is not None) for p in params] +
                             [float(stop), loss_sum], dtype=dtype, device=device)
        flat = torch.cat([*pieces, flags])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        tail = flat[offset:]
        for p, has in zip(params, tail[: len(params)].tolist(), strict=True):
            if has == 0:
                p.grad = None
        return bool(tail[-2] > 0), float(tail[-1])

    def sync_buffers(self, model: nn.Module) -> None:
        """Broadcast rank 0's buffers (BatchNorm's running statistics) to every replica."""
        if self.distributed:
            _broadcast(list(model.buffers()))

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank; every rank waits here for the others (the
        end-of-epoch meeting after rank 0's monitor and saves)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """An epoch's running sums over all replicas: counts and losses add up; seconds
        (``*seconds``) are the slowest rank's."""
        if not self.distributed:
            return dict(sums)
        import torch.distributed as dist

        keys = sorted(sums)
        dev = _collective_device()
        add = torch.tensor([0.0 if k.endswith("seconds") else sums[k] for k in keys],
                           dtype=torch.float64, device=dev)
        most = torch.tensor([sums[k] if k.endswith("seconds") else 0.0 for k in keys],
                            dtype=torch.float64, device=dev)
        dist.all_reduce(add)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return {k: float(most[i] if k.endswith("seconds") else add[i])
                for i, k in enumerate(keys)}

    def leader_outcome(self, message: str | None) -> str | None:
        """Rank 0's ``message`` (an error it met, or None) on every rank."""
        if not self.distributed:
            return message
        import torch.distributed as dist

        box: list[Any] = [message]
        dist.broadcast_object_list(box, src=0,
                                   device=_collective_device() if _uses_cuda() else None)
        out: str | None = box[0]
        return out


def _uses_cuda() -> bool:
    import torch.distributed as dist

    return dist.get_backend() == "nccl"


def _collective_device() -> torch.device:
    """Where small tensors for a collective must live: this process's GPU under nccl."""
    return torch.device("cuda", torch.cuda.current_device()) if _uses_cuda() \
        else torch.device("cpu")


def _broadcast(tensors: list[Tensor]) -> None:
    """Broadcast rank 0's ``tensors`` in place, one flat buffer per dtype and device."""
    import torch.distributed as dist

    groups: dict[tuple[Any, Any], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset: offset + n].view_as(t))
                offset += n


# ---------------------------------------------------------------------------------------
# BatchNorm over the whole batch


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _SumOverRanks(torch.autograd.Function):
    """Σ over ranks of a tensor, differentiable any number of times: y = Σ_r x_r on every
    rank, so ∂(Σ_r L_r)/∂x_r = Σ_r ∂L_r/∂y, the same sum again (the backward applies this
    function, so the double backward of the PAG term goes through it too)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out: Tensor = _SumOverRanks.apply(grad)
        return out


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """``tensor`` summed over every rank of the process group, inside the autograd graph."""
    out: Tensor = _SumOverRanks.apply(tensor)
    return out


class SyncedBatchNorm(nn.Module):
    """A BatchNorm layer whose training statistics are over the micro-batches of every rank.

    It holds the replaced layer's own parameters and buffers under the same names, so the
    model's state dict (and the saved weights) are unchanged. In eval mode, or with
    ``synchronised`` off (`local_statistics`), it is the plain layer. Statistics are taken
    in float32 and all-reduced inside the autograd graph (whose backward all-reduces again),
    so input gradients and their double backward include every rank's rows.
    """

    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(self, bn: Any) -> None:
        super().__init__()
        self.num_features = int(bn.num_features)
        self.eps = float(bn.eps)
        self.momentum: float | None = bn.momentum
        self.affine = bool(bn.affine)
        self.track_running_stats = bool(bn.track_running_stats)
        self.weight: nn.Parameter | None = bn.weight
        self.bias: nn.Parameter | None = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.synchronised = True
        self.kind = type(bn).__name__

    def extra_repr(self) -> str:
        return f"{self.kind}({self.num_features}), synchronised={self.synchronised}"

    def _factor(self) -> float:
        """The running statistics' update weight for this forward (torch's rule)."""
        if self.momentum is None and self.num_batches_tracked is not None:
            return 1.0 / float(self.num_batches_tracked)
        if self.momentum is None:
            return 0.0
        return float(self.momentum)

    def forward(self, x: Tensor) -> Tensor:
        """Shape: (N, C, ...) -> (N, C, ...)."""
        tracking = self.training and self.track_running_stats
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if not self.training or not self.synchronised:
            factor = self._factor() if tracking else 0.0
            use_running = not self.training or self.track_running_stats
            out: Tensor = F.batch_norm(
                x, self.running_mean if use_running else None,
                self.running_var if use_running else None, self.weight, self.bias,
                self.training or self.running_mean is None, factor, self.eps)
            return out
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        view = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        # One all-reduce (in the forward; one in each backward through it): every rank's
        # count, sum, and sum of squares as its own centred sum plus n·mean² (Chan et al.'s
        # merge). The centred sums are float32 (nothing large cancels in them); the merge,
        # where mean² is subtracted again, is float64 on C-sized vectors, so a channel whose
        # mean is far larger than its spread keeps its variance.
        rows = x.numel() // c
        local_mean = xf.mean(dims)
        local_m2 = ((xf - local_mean.view(view)) ** 2).sum(dims)
        mean_r = local_mean.double()
        totals = sum_over_ranks(torch.cat([
            rows * mean_r, local_m2.double() + rows * mean_r * mean_r,
            mean_r.new_tensor([rows])]))
        count = totals[-1].detach()
        mean64 = totals[:c] / count
        var = (totals[c: 2 * c] / count - mean64 * mean64).clamp_min(0).float()
        mean = mean64.float()
        centred = xf - mean.view(view)
        out = centred * torch.rsqrt(var + self.eps).view(view)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight.view(view) + self.bias.view(view)
        if tracking and self.running_mean is not None and self.running_var is not None:
            factor = self._factor()
            with torch.no_grad():  # tensor arithmetic throughout: no wait on the device
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (count / (count - 1).clamp_min(1)).float()
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out.to(x.dtype)


def synchronise_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm layer of ``model`` (in place) by a `SyncedBatchNorm` holding
    its parameters and buffers; returns how many. A subclass of BatchNorm (one that does more
    than normalise, e.g. timm's BatchNormAct2d) cannot be replaced: SpecError naming
    ``train.sync_batchnorm``."""
    kinds = _BATCHNORMS
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    for name, m in found:
        if type(m) not in kinds:
            raise SpecError(f"train.sync_batchnorm: layer '{name}' is a {type(m).__name__}, a "
                            "BatchNorm subclass pagctl cannot synchronise across processes; "
                            "set train.sync_batchnorm: false (each process then normalises "
                            "by its own slice)")
    for name, m in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SyncedBatchNorm(m))
    return len(found)


@contextmanager
def local_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, the synchronised BatchNorm layers of ``model`` normalise by this
    rank's rows alone and call no collective (for passes that ranks do not make in step,
    such as an inner attack that may stop early)."""
    layers = [m for m in model.modules() if isinstance(m, SyncedBatchNorm)]
    before = [m.synchronised for m in layers]
    for m in layers:
        m.synchronised = False
    try:
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m.synchronised = was
