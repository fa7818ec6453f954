"""Training with the PAG objective, in one readable loop (``pagctl train``).

    loss = objective(f(x), f(x_adv), y)
           + lambda * mean_{i, k} (1 - cos(grad_x log p(t_ik | x_i'), g(x_i', t_ik)))

with K target classes t_ik per image sampled without replacement (all classes when K equals
the number of classes, the paper's setting) and g from a target-gradient source. lambda is the
real weight; the official code's ``pag_coeff`` c corresponds to lambda = 10 c. The objective
is ``train.objective`` (`pagctl.losses.objective_loss`): cross-entropy (``ce``, the paper's
PAG training) or an adversarial-training loss whose ``x_adv`` comes from the inner attack
(`pagctl.objectives.InnerAttack`); x' is x, or x_adv with ``train.pag_on: adversarial``.

One forward pass serves both terms wherever they share an input: the logits give the
objective's term on that input and their log-softmax is differentiated (with
``create_graph``) for the K input gradients. Augmentation
(random crop / flip) is applied inside the model call and differentiated through, so gradients
are taken with respect to the un-augmented image and compared to targets computed on it.

After every ``eval.every`` epochs (and the last) the per-epoch monitor (`monitor`) measures
the first ``eval.limit`` test points: clean accuracy, robust accuracy under ``eval.attack``
and the mean alignment with ``eval.align_source``; with a validation split
(``data.validation_size``) it also measures the validation images and keeps the model of the
best validation robust accuracy (clean accuracy without ``eval.attack``) as
model-best.safetensors, beside the last model (Rice et al. 2020's early stopping). Each epoch
appends one `pagctl.records.TrainEpochRecord` to metrics.jsonl: the means of its running sums
(`EpochSums`), with the cost of its steps (`StepCost`). The run folder's life (refuse or
resume, create, save state) is `pagctl.checkpoint.RunFolder`, shared with score training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.build import Setup, build_context, default_cache_dir, resolve_device, setup
from pagctl.checkpoint import (
    BEST_MODEL_FILE,
    RunFolder,
    SavedState,
    append_record,
    save_model,
)
from pagctl.errors import LeaderFailed, ModelError, PagctlError, RankError, SpecError
from pagctl.objectives import InnerAttack, step_seed
from pagctl.records import TrainEpochRecord
from pagctl.trust import UNTRUSTED, CodeTrust

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from pagctl.distributed.launch import Launch
    from pagctl.distributed.replicas import Replicas
    from pagctl.gradients import Method
    from pagctl.models import NormalizedModel
    from pagctl.progress import StopFlag
    from pagctl.spec import RunSpec, TrainSpec


@dataclass
class TrainResult:
    """How `train` ended: the run folder, the epochs done, whether it was stopped early,
    the last epoch's record (``last``; its ``train_seconds`` is that epoch's alone) and
    ``train_seconds``, the whole run's training time: every epoch's ``train_seconds``
    summed, across resumes, with the steps of an epoch stopped part-way (the monitor's
    ``eval_seconds`` not included). Other ranks than 0 of a launch hold 0.0."""

    run_dir: Path
    epochs_done: int
    interrupted: bool
    last: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """What the CLI reports: the run folder, the last epoch's record with its
        ``train_seconds`` as ``epoch_train_seconds``, and the run's ``train_seconds``."""
        out = {"run_dir": str(self.run_dir), **self.last}
        if "train_seconds" in out:
            out["epoch_train_seconds"] = out.pop("train_seconds")
        out["train_seconds"] = self.train_seconds
        return out


def run_train_seconds(run_dir: Path) -> float:
    """The training seconds of every epoch recorded in ``run_dir``'s metrics.jsonl, summed
    (a resumed run's records of the epochs before the stop included)."""
    from pagctl.checkpoint import read_metrics

    return sum(r.train_seconds or 0.0 for r in read_metrics(run_dir).of(TrainEpochRecord))


def lr_at(t: TrainSpec, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate for 0-based ``epoch`` and ``step`` within it.

    step: the official schedule (x0.1 from 50% of the epochs, x0.01 from 75%, x0.001 in the
    final epoch); cosine: per step from lr down to 0; constant; multistep: x lr_gamma for
    each milestone m <= epoch (torch's MultiStepLR: after m finished epochs).
    """
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "multistep":
        return t.lr * t.lr_gamma ** sum(1 for m in t.milestones if m <= epoch)
    if t.schedule == "cosine":
        progress = (epoch * steps_per_epoch + step) / max(1, t.epochs * steps_per_epoch)
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    e = epoch + 1  # the official code counts epochs from 1
    if e >= t.epochs and t.epochs > 1:
        return t.lr * 1e-3
    if e >= 0.75 * t.epochs:
        return t.lr * 1e-2
    if e >= 0.5 * t.epochs:
        return t.lr * 1e-1
    return t.lr


def pag_weight_at(t: TrainSpec, epoch: int) -> float:
    """lambda for 0-based ``epoch`` (warm-up: the first pag_warmup_epochs use a factor)."""
    return t.pag_weight * (t.pag_warmup_factor if epoch < t.pag_warmup_epochs else 1.0)


# ---------------------------------------------------------------------------------------
# the loop


def train(
    spec: RunSpec,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
    launch: Launch | None = None,
    trust: CodeTrust = UNTRUSTED,
) -> TrainResult:
    """Train ``spec`` into its run folder. Returns when done or after a Ctrl-C or SIGTERM
    (state saved).

    ``trust``: whether a ``package.module:factory`` in ``model.arch`` may be imported
    (`pagctl.trust`; by default not: the spec came from a file).

    ``on_step(epoch, step)`` is called after every optimiser step (0-based counters).
    ``launch``: this process's place in a torchrun launch: data-parallel training
    (`pagctl.distributed.replicas`), rank 0 writing the run folder; None: one process.
    """
    from pagctl.distributed.launch import process_group, rank_device
    from pagctl.distributed.replicas import Replicas

    t = spec.train
    if launch is None:
        replicas = Replicas(accumulation=t.accumulation_steps)
        dev = resolve_device(device)
        return _train(spec, replicas, dev, resume=resume, overwrite=overwrite,
                      progress=progress, on_step=on_step, cache_dir=cache_dir, log=log,
                      trust=trust)
    if spec.data.download:
        raise SpecError("data.download: under torchrun every process would download at once; "
                        "download first in one process ('pagctl train SPEC --download "
                        "--dry-run'), then launch without --download")
    replicas = Replicas(launch.rank, launch.world_size, t.accumulation_steps)
    dev = resolve_device(rank_device(device, launch))
    replicas.check(spec.data.batch_size, None, t.drop_last)  # every rank alike, before joining
    with process_group(launch, "nccl" if dev.type == "cuda" else "gloo"):
        return _train(spec, replicas, dev, resume=resume, overwrite=overwrite,
                      progress=progress and launch.leader, on_step=on_step,
                      cache_dir=cache_dir, log=log if launch.leader else None, trust=trust)


def _train(spec: RunSpec, replicas: Replicas, dev: torch.device, *, resume: bool,
           overwrite: bool, progress: bool, on_step: Callable[[int, int], None] | None,
           cache_dir: Path | None, log: Callable[[str], None] | None,
           trust: CodeTrust) -> TrainResult:
    """`train` as one replica (the only one, or one rank of a launch).

    The phases, each a function below: the run folder (`_open_folder`, rank 0), what the
    steps read (`_build`), a fresh start or the saved state (`_start`), then epochs of
    steps (`_step`, each micro-batch `_micro_step`, counted into the `EpochSums`), each
    epoch ended by `_end_epoch` (monitor, record, weights, state) on rank 0. What stays
    here is the order of it all and the two ways out: a stop request (Ctrl-C, SIGTERM)
    after a step or at an epoch's end.
    """
    from pagctl.progress import ProgressBar, StopFlag

    with ExitStack() as stack:
        # ---- the run folder: rank 0 refuses or checks it before anything is built
        folder = _open_folder(spec, replicas, stack, resume=resume, overwrite=overwrite)
        run_dir = spec.run_dir

        # ---- data, model, target-gradient source, inner attack, optimiser
        run = _build(spec, replicas, dev, cache_dir, trust)
        t, steps = spec.train, run.steps

        # ---- start fresh, or restore the saved state (every rank reads it; rank 0 checked)
        start = _start(run, folder, resume, cache_dir)
        sums, best = start.sums, start.best
        replicas.start(run.model)
        emit = log or (lambda msg: None)
        emit(_run_line(run))

        # ---- the loop: epochs of steps, then the monitor, the record and the saves
        last: dict[str, Any] = {}
        with StopFlag() as stop, ProgressBar("train", t.epochs * steps, enabled=progress) as bar, \
                StepCost(run.model, dev) as cost:
            bar.update(completed=start.epoch * steps + start.step,
                       description=f"epoch {start.epoch + 1}/{t.epochs}")
            for epoch in range(start.epoch, t.epochs):
                first = start.step if epoch == start.epoch else 0
                blocks, batches = _epoch_batches(run, epoch, first)
                weight = pag_weight_at(t, epoch)
                run.model.train()
                if first == 0:
                    sums = EpochSums()
                tick = time.perf_counter()
                for step, block in enumerate(blocks, start=first):
                    stopping = _step(run, cost, sums, batches, block, epoch, step, weight, stop)

                    # -- progress, Ctrl-C / SIGTERM (on any rank: every rank stops here)
                    sums.seconds += time.perf_counter() - tick
                    tick = time.perf_counter()
                    bar.update(advance=1, description=f"epoch {epoch + 1}/{t.epochs}",
                               info=sums.running_text())
                    if on_step is not None:
                        on_step(epoch, step)
                    if not replicas.distributed:  # alone, a request made until now counts
                        stopping = stop.requested
                    if stopping and step + 1 < steps:
                        _save_state(folder, run, epoch, step + 1,
                                    replicas.reduce_sums(sums.as_dict()), best)
                        return _result(run_dir, folder, epoch, True, last, sums.seconds)

                # -- end of epoch: the sums over every replica; rank 0 monitors and saves
                sums = EpochSums.from_dict(replicas.reduce_sums(sums.as_dict()))
                if folder is not None:
                    record, best = _end_epoch(run, folder, epoch, weight, sums, best,
                                              start.align_source)
                    last = record.to_json()
                    emit(_epoch_line(last))
                sums = EpochSums()
                if replicas.agree(stop.requested):  # every rank waits for rank 0's saves
                    return _result(run_dir, folder, epoch + 1, epoch + 1 < t.epochs, last)
        return _result(run_dir, folder, t.epochs, False, last)


def _result(run_dir: Path, folder: RunFolder | None, epochs_done: int, interrupted: bool,
            last: dict[str, Any], partial_seconds: float = 0.0) -> TrainResult:
    """The `TrainResult` of a run that ends here: its training seconds are the recorded
    epochs' and, stopped within an epoch, ``partial_seconds`` of that epoch's steps (rank 0
    alone reads them; ``folder`` is None elsewhere)."""
    spent = 0.0 if folder is None else run_train_seconds(run_dir) + partial_seconds
    return TrainResult(run_dir, epochs_done, interrupted, last, spent)


# ---------------------------------------------------------------------------------------
# the loop's phases, in the order they run


def _open_folder(spec: RunSpec, replicas: Replicas, stack: ExitStack, *, resume: bool,
                 overwrite: bool) -> RunFolder | None:
    """Rank 0's run folder, refused or checked and held (its lock) until ``stack`` closes;
    None on the other ranks, which raise `LeaderFailed` when rank 0 refused it."""
    folder: RunFolder | None = None
    refused: PagctlError | None = None
    if replicas.leader:
        try:
            folder = RunFolder(spec, command="train", resume=resume, overwrite=overwrite)
            stack.enter_context(folder)
        except PagctlError as exc:
            refused = exc
    _follow_leader(replicas, refused)
    return folder


@dataclass(frozen=True)
class _Run:
    """What the loop's phases read, built once (`_build`): the setup (data, model, source),
    this replica's place, the device, the optimiser and the training generator (state that
    the steps advance), the inner attack, the input-gradient method, whether inputs go
    channels-last, how many BatchNorm layers are synchronised across processes, the
    training images and the steps of an epoch. One value, so that each phase takes the
    run and what is its own (the epoch, the step, the batch) rather than a dozen
    arguments."""

    s: Setup
    replicas: Replicas
    device: torch.device
    opt: torch.optim.Optimizer
    gen: torch.Generator
    inner: InnerAttack | None
    grad_method: Method
    channels_last: bool
    synced: int
    n_train: int
    steps: int

    @property
    def model(self) -> NormalizedModel:
        """The network (the setup's, moved to the device by `_build`)."""
        return self.s.model


def _build(spec: RunSpec, replicas: Replicas, dev: torch.device, cache_dir: Path | None,
           trust: CodeTrust) -> _Run:
    """Data, model (on ``dev``, channels-last on a GPU when asked, BatchNorm synchronised
    across processes when asked), target-gradient source, inner attack, SGD, the training
    generator (seeded ``train.seed``) and the steps per epoch; refuses what cannot train
    (SpecError naming the field)."""
    import torch

    from pagctl.distributed.replicas import synchronise_batchnorm
    from pagctl.gradients import method_for

    s = setup(spec, dev, cache_dir=cache_dir, trust=trust)
    t = spec.train
    model = s.model.to(dev)
    channels_last = t.channels_last and dev.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    synced = synchronise_batchnorm(model) \
        if replicas.distributed and t.sync_batchnorm else 0
    grad_method = method_for(t.grad_method, dev)
    if synced and grad_method == "batched":
        raise SpecError("train.grad_method: 'batched' (a vmapped reverse pass) cannot run "
                        "through BatchNorm synchronised across processes; use loop or "
                        "repeat, or train.sync_batchnorm: false")
    inner = _inner_attack(s, cache_dir)
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                          weight_decay=t.weight_decay, nesterov=t.nesterov)
    gen = torch.Generator().manual_seed(t.seed)
    n_train = len(s.bundle.train)  # type: ignore[arg-type]
    b = spec.data.batch_size
    steps = n_train // b if t.drop_last else math.ceil(n_train / b)
    if steps == 0:
        raise SpecError(f"data.batch_size: {b} exceeds the {n_train} training images with "
                        "train.drop_last; lower it")
    replicas.check(b, n_train, t.drop_last)
    return _Run(s, replicas, dev, opt, gen, inner, grad_method, channels_last, synced,
                n_train, steps)


@dataclass(frozen=True)
class _Start:
    """Where the loop begins: 0-based ``epoch`` and ``step``, the epoch's running sums so
    far, the best model so far (``{"epoch", "score"}`` or empty) and the monitor's
    alignment source (rank 0's; None elsewhere or without one)."""

    epoch: int
    step: int
    sums: EpochSums
    best: dict[str, float]
    align_source: Any


def _start(run: _Run, folder: RunFolder | None, resume: bool, cache_dir: Path | None
           ) -> _Start:
    """Start fresh, or restore the saved state: rank 0 first builds the monitor's source,
    checks that safetensors can hold the model (refused before the folder is begun, not at
    the first epoch's save) and begins the folder; every rank then restores the same saved
    model, optimiser and RNG states, rank 0 alone its running sums (it carries them for
    all: `Replicas.reduce_sums` adds the others' zeros), and drops the records written
    after the state."""
    from pagctl.checkpoint import check_saveable, read_saved_state

    spec = run.s.spec
    saved: SavedState | None = None
    align_source: Any = None  # the monitor's, on rank 0 (which alone runs it)
    failed: PagctlError | None = None
    if folder is not None:
        try:
            align_source = _alignment_source(run.s, cache_dir)
            check_saveable(run.model.net.state_dict(), f"model.arch: {spec.model.arch}")
            saved = folder.start()
        except PagctlError as exc:
            failed = exc
    _follow_leader(run.replicas, failed)
    if resume and not run.replicas.leader:
        saved = read_saved_state(spec.run_dir)
    if saved is None:
        return _Start(0, 0, EpochSums(), {}, align_source)
    epoch, step, sums, best = _restore(saved, run.model, run.opt, run.gen, run.device)
    if folder is None:
        sums = EpochSums()
    else:
        folder.trim_metrics(lambda r: r.get("kind") != "train_epoch" or (
            isinstance(r.get("epoch"), int) and r["epoch"] <= epoch))
    return _Start(epoch, step, sums, best, align_source)


def _run_line(run: _Run) -> str:
    """The log line a run starts with: images, steps, device, PAG, objective, processes."""
    spec, inner, replicas = run.s.spec, run.inner, run.replicas
    t, b = spec.train, spec.data.batch_size
    adversarial = "" if inner is None else \
        f", objective {t.objective} (inner attack {inner.name}, {inner.mode} mode)"
    parallel = "" if replicas.parts == 1 else \
        (f", {replicas.world_size} processes x {replicas.accumulation} micro-batches of "
         f"{b // replicas.parts} ({run.synced} BatchNorm layers synchronised)")
    pag_text = f"on (source {spec.target_gradients.name}, gradients by {run.grad_method})" \
        if run.s.pag_active else "off"
    return (f"{spec.name}: {run.n_train} training images, {run.steps} steps/epoch, device "
            f"{run.device}, PAG {pag_text}{adversarial}{parallel}")


def _epoch_batches(run: _Run, epoch: int, first: int
                   ) -> tuple[list[Tensor], Iterator[tuple[Tensor, Tensor, Tensor]]]:
    """The epoch's steps from 0-based step ``first`` on: each step's global batch (dataset
    positions, (B,) int64, in the epoch's order, seeded by the run seed and the epoch and
    never by the training generator, so a resumed epoch has the same batches), and this
    replica's micro-batches of them, loaded in order: (indices (n,), images (n, C, H, W),
    labels (n,))."""
    import torch

    from pagctl.data import iter_chunks

    spec, n_train, b = run.s.spec, run.n_train, run.s.spec.data.batch_size
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(
        spec.train.seed * 1_000_003 + epoch))
    blocks = [perm[i * b: min((i + 1) * b, n_train)] for i in range(first, run.steps)]
    batches = iter_chunks(run.s.bundle.train, [
        block[part] for block in blocks for part in run.replicas.micro_slices(len(block))],
        workers=spec.data.workers)
    return blocks, batches


@dataclass(frozen=True)
class _StepDraws:
    """What a step draws from the training generator for its global batch of ``rows``
    images, in this order: crop offsets (rows, 2) and flips (rows,) (None without that
    augmentation), then the K target classes per image (rows, K) (None without PAG). Every
    replica draws the whole batch's, so each slice's rows are the same on any layout."""

    rows: int
    offsets: Tensor | None
    flips: Tensor | None
    classes: Tensor | None


def _step(run: _Run, cost: StepCost, sums: EpochSums,
          batches: Iterator[tuple[Tensor, Tensor, Tensor]], block: Tensor, epoch: int,
          step: int, weight: float, stop: StopFlag) -> bool:
    """One optimiser step on the global batch ``block`` ((B,) dataset positions): the
    step's learning rate and draws (`_StepDraws`), each of this replica's micro-batches
    (`_micro_step`) counted into ``sums``, the gradients summed over the replicas, a
    non-finite loss refused (ModelError), SGD, the buffers made rank 0's. Returns whether
    any replica was asked to stop (read after the micro-batches, in the same all-reduce
    as the gradients)."""
    import torch

    from pagctl.data.augment import draw_augmentation
    from pagctl.losses import sample_target_classes

    s, t, replicas = run.s, run.s.spec.train, run.replicas
    cost.begin(sums)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(t, epoch, step, run.steps)
    n_step = len(block)
    offsets, flips = draw_augmentation(s.spec.data, n_step, run.gen)
    classes = sample_target_classes(
        torch.zeros(n_step, dtype=torch.int64), s.bundle.num_classes,
        t.classes_per_image, run.gen) if s.pag_active else None
    draws = _StepDraws(n_step, offsets, flips, classes)
    run.opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro, rows in enumerate(replicas.micro_slices(n_step)):
        batch = next(batches)
        seed = step_seed(t.seed, epoch, step, replicas.part(micro))
        terms = _micro_step(run, cost, batch, draws, rows, seed, weight)
        loss_sum += terms.loss * terms.rows
        sums.add(terms, t.beta)
    stopping, total = replicas.finish_step(run.model, stop.requested, loss_sum)
    if not math.isfinite(total):
        raise ModelError(f"loss became {total / n_step} at epoch {epoch + 1} step "
                         f"{step + 1}; lower train.lr or train.pag_weight")
    run.opt.step()
    replicas.sync_buffers(run.model)
    cost.end()
    return stopping


def _micro_step(run: _Run, cost: StepCost, batch: tuple[Tensor, Tensor, Tensor],
                draws: _StepDraws, rows: slice, seed: int, weight: float) -> MicroTerms:
    """One micro-batch: rows ``rows`` of the step's global batch, ``batch`` = (dataset
    indices (n,), images (n, C, H, W) in [0, 1], labels (n,) int64). x_adv from the inner
    attack (seeded ``seed``), the K target and input gradients on x or x_adv (the PAG
    term, ``weight`` λ), the objective, then the backward of the loss weighted by the
    micro-batch's share of the global batch (the replicas' and micro-batches' gradients
    add up to the global batch's mean). Returns its terms, as numbers.

    One forward pass serves both terms where they share an input: the PAG pass's logits
    are the objective's on that input. Shape: the network sees (n, C, H, W), its logits are
    (n, classes); targets and input gradients are (n, K, C, H, W)."""
    import torch

    from pagctl.data.augment import Augmented
    from pagctl.gradients import logits_and_input_gradients
    from pagctl.losses import objective_loss, pag_loss

    s, t, dev, model = run.s, run.s.spec.train, run.device, run.model
    idx, x, y = batch
    if run.replicas.parts > 1:  # layers that draw (dropout): per slice
        torch.manual_seed(seed)
    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    offsets, flips = draws.offsets, draws.flips
    net: Any = model if offsets is None and flips is None else Augmented(
        model, None if offsets is None else offsets[rows],
        None if flips is None else flips[rows], s.spec.data.crop_padding)
    x_adv = None
    if run.inner is not None:
        cost.phase("attack")
        x_adv = _attack_slice(run.inner, run.replicas, net, model, x, y, seed)
        if run.channels_last:
            x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    clean_logits: Tensor | None = None
    adv_logits: Tensor | None = None
    # bfloat16 autocast (train.amp), through the double backward, on any device
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=t.amp):
        if draws.classes is not None:
            cost.phase("pag")
            pag_x = x if t.pag_on == "clean" or x_adv is None else x_adv
            classes = draws.classes[rows].to(dev)
            with torch.no_grad():
                targets = s.source(pag_x, y, classes, index=idx)
            logits, grads = logits_and_input_gradients(
                net, pag_x, classes, create_graph=True, method=run.grad_method)
            pag = pag_loss(grads.float(), targets.float())
            if pag_x is x:
                clean_logits = logits
            else:
                adv_logits = logits
        else:
            pag = torch.zeros((), device=dev)
        cost.phase("step")
        if t.objective in ("ce", "trades", "mart") and clean_logits is None:
            clean_logits = net(x)
        if t.objective != "ce" and adv_logits is None:
            adv_logits = net(x_adv)
        objective, robust = objective_loss(
            t.objective, None if clean_logits is None else clean_logits.float(),
            None if adv_logits is None else adv_logits.float(), y, t.beta)
        loss = objective + weight * pag if s.pag_active else objective
    n = len(idx)
    share = n / draws.rows  # the micro-batch's part of the global mean
    (loss if share == 1.0 else loss * share).backward()  # type: ignore[no-untyped-call]
    return MicroTerms(
        rows=n, loss=float(loss.detach()), objective=float(objective.detach()),
        robust=0.0 if robust is None else float(robust.detach()), pag=float(pag.detach()),
        clean_correct=None if clean_logits is None
        else float((clean_logits.argmax(1) == y).sum()),
        adv_correct=None if adv_logits is None else float((adv_logits.argmax(1) == y).sum()))


def _end_epoch(run: _Run, folder: RunFolder, epoch: int, weight: float, sums: EpochSums,
               best: dict[str, float], align_source: Any
               ) -> tuple[TrainEpochRecord, dict[str, float]]:
    """Rank 0 after 0-based ``epoch``'s steps (``sums``: every replica's): the monitor when
    due (every ``eval.every`` epochs and the last; `monitor`), the best model by
    validation (`_selection_score`) saved when it improves, the epoch's record appended,
    the last weights and the state (at the next epoch's start) saved. Returns the record
    and the best model so far."""
    s, spec = run.s, run.s.spec
    evaluated: dict[str, Any] = {}
    if (epoch + 1) % spec.eval.every == 0 or epoch + 1 == spec.train.epochs:
        tick = time.perf_counter()
        evaluated = monitor(s, epoch, align_source)
        evaluated["eval_seconds"] = time.perf_counter() - tick
    score = _selection_score(evaluated)
    if score is not None and score > best.get("score", -1.0):
        best = {"epoch": float(epoch + 1), "score": score}
        save_model(spec.run_dir, run.model, s.config, spec, file=BEST_MODEL_FILE,
                   test_sha256=s.test_sha256)
        evaluated["best"] = True
    if run.replicas.distributed:
        evaluated["processes"] = run.replicas.world_size
    record = _epoch_record(s, epoch, run.steps, weight, sums, evaluated)
    append_record(spec.run_dir, record)
    save_model(spec.run_dir, run.model, s.config, spec, test_sha256=s.test_sha256)
    _save_state(folder, run, epoch + 1, 0, EpochSums().as_dict(), best)
    return record, best


def _save_state(folder: RunFolder | None, run: _Run, epoch: int, step: int,
                sums: dict[str, float], best: dict[str, float]) -> None:
    """On rank 0 (``folder``), the state to resume at 0-based ``epoch`` and ``step``: the
    model, the optimiser, the RNG states and the counters; ``sums`` in their flat form
    (`EpochSums.as_dict`, as state.json has always held them)."""
    if folder is not None:
        folder.save_state({"model": run.model}, run.opt, _rng_state(run.gen),
                          {"epoch": epoch, "step": step, "sums": sums, "best": best})


def _attack_slice(inner: InnerAttack, replicas: Replicas, net: Any, model: torch.nn.Module,
                  x: Tensor, y: Tensor, seed: int) -> Tensor:
    """The inner attack on this replica's slice, BatchNorm by the slice's own statistics
    (an attack may stop early on one rank; it must not wait for the others). A user error
    it raises is this rank's alone: `RankError`, which every rank reports."""
    from pagctl.distributed.replicas import local_statistics

    try:
        with local_statistics(model):
            return inner(net, model, x, y, seed)
    except PagctlError as exc:
        if not replicas.distributed:
            raise
        raise RankError(f"rank {replicas.rank}: {exc}") from exc


def _follow_leader(replicas: Replicas, error: PagctlError | None) -> None:
    """Share rank 0's outcome of a step only it takes (the run folder's checks, its start):
    rank 0 raises its error; the other ranks raise `LeaderFailed` with its message (they
    exit like it, and rank 0 alone reports it)."""
    message = replicas.leader_outcome(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise LeaderFailed(message)


def prepare(spec: RunSpec, *, device: str = "auto", resume: bool = False,
            overwrite: bool = False, cache_dir: Path | None = None,
            trust: CodeTrust = UNTRUSTED) -> Setup:
    """Everything `train` builds before its first step, without training or writing into
    the run folder (``pagctl train --dry-run``): the run folder's checks, the data, the
    model, the target-gradient source, the inner attack and the alignment monitor's source.
    Raises what
    `train` would raise for them."""
    from pagctl.distributed.replicas import Replicas

    RunFolder(spec, command="train", resume=resume, overwrite=overwrite)
    s = setup(spec, resolve_device(device), cache_dir=cache_dir, trust=trust)
    Replicas(accumulation=spec.train.accumulation_steps).check(
        spec.data.batch_size, len(s.bundle.train), spec.train.drop_last)  # type: ignore[arg-type]
    _inner_attack(s, cache_dir)
    _alignment_source(s, cache_dir)
    return s


# ---------------------------------------------------------------------------------------
# the running sums and the cost of a step


PHASES = ("attack", "pag", "step")
"""The parts of a training step whose cost an epoch record gives (`StepCost`)."""


@dataclass(frozen=True)
class MicroTerms:
    """One micro-batch's part of a step, as numbers: its ``rows`` images; the means over
    them of the total loss, the objective, the objective's robust term (0.0 for an
    objective without one) and the PAG term; how many of them the clean and the
    adversarial logits classify correctly (None where that forward pass did not run)."""

    rows: int
    loss: float
    objective: float
    robust: float
    pag: float
    clean_correct: float | None
    adv_correct: float | None


@dataclass
class PhaseCost:
    """One phase's cost over an epoch's steps (`StepCost`): rows through the model forward
    and backward, and wall seconds."""

    forward: float = 0.0
    backward: float = 0.0
    seconds: float = 0.0


@dataclass
class EpochSums:
    """An epoch's running totals on this replica (`Replicas.reduce_sums` adds the
    replicas' up at the epoch's end): each loss term summed over images (a micro-batch's
    mean times its rows; ``ce`` is the objective less β times its robust term), correct
    clean and adversarial predictions with the images each was counted on, the images
    seen, the steps' seconds, and each phase's cost (`StepCost`).

    A value with named fields rather than the dict it replaces: the loop names what it
    adds, and a misspelt total is a type error. The flat dict (`as_dict`,
    `from_dict`) remains the form they travel in: state.json's counters (so states saved
    by earlier versions resume) and the replicas' all-reduce. Everything is a float, so a
    resumed epoch continues the same sums bit for bit.
    """

    loss: float = 0.0
    ce: float = 0.0
    robust: float = 0.0
    pag: float = 0.0
    correct: float = 0.0
    clean_seen: float = 0.0
    adv_correct: float = 0.0
    adv_seen: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0
    cost: dict[str, PhaseCost] = field(
        default_factory=lambda: {phase: PhaseCost() for phase in PHASES})

    _TOTALS = ("loss", "ce", "robust", "pag", "correct", "clean_seen", "adv_correct",
               "adv_seen", "seen", "seconds")

    def add(self, terms: MicroTerms, beta: float) -> None:
        """Count one micro-batch in (``beta``: the objective's robust-term weight)."""
        n = terms.rows
        self.loss += terms.loss * n
        self.ce += (terms.objective - beta * terms.robust) * n
        self.robust += terms.robust * n
        self.pag += terms.pag * n
        if terms.clean_correct is not None:
            self.correct += terms.clean_correct
            self.clean_seen += n
        if terms.adv_correct is not None:
            self.adv_correct += terms.adv_correct
            self.adv_seen += n
        self.seen += n

    def means(self, objective: str, pag_active: bool) -> dict[str, Any]:
        """The epoch's means, as `TrainEpochRecord` fields: the loss terms per image
        (``robust`` for trades and mart, ``pag`` None with PAG off), the training
        accuracies (clean, adversarial) where counted, the passes per image and seconds of
        each phase, and the steps' seconds."""
        seen = max(1.0, self.seen)
        out: dict[str, Any] = {"loss": self.loss / seen, "ce": self.ce / seen,
                               "pag": self.pag / seen if pag_active else None}
        if objective in ("trades", "mart"):
            out["robust"] = self.robust / seen
        if self.clean_seen:
            out["train_accuracy"] = self.correct / self.clean_seen
        if self.adv_seen:
            out["train_adv_accuracy"] = self.adv_correct / self.adv_seen
        out["passes_per_image"] = {phase: {"forward": c.forward / seen,
                                           "backward": c.backward / seen}
                                   for phase, c in self.cost.items()}
        out.update({f"{phase}_seconds": c.seconds for phase, c in self.cost.items()},
                   train_seconds=self.seconds)
        return out

    def running_text(self) -> str:
        """The progress bar's text: the epoch's running loss terms."""
        seen = max(1.0, self.seen)
        info = f"loss {self.loss / seen:.3f} ce {self.ce / seen:.3f}"
        if self.robust:
            info += f" robust {self.robust / seen:.3f}"
        if self.pag:
            info += f" pag {self.pag / seen:.3f}"
        return info

    def as_dict(self) -> dict[str, float]:
        """The flat form: the totals by name, then ``<phase>_forward``, ``_backward``,
        ``_seconds`` per phase (state.json's order)."""
        out = {name: float(getattr(self, name)) for name in self._TOTALS}
        for phase, c in self.cost.items():
            out.update({f"{phase}_forward": c.forward, f"{phase}_backward": c.backward,
                        f"{phase}_seconds": c.seconds})
        return out

    @classmethod
    def from_dict(cls, flat: Mapping[str, Any]) -> EpochSums:
        """`as_dict`'s form read back; a key it lacks starts at zero (a state saved before
        that total existed), a key it does not know is ignored."""
        sums = cls()
        for name in cls._TOTALS:
            if name in flat:
                setattr(sums, name, float(flat[name]))
        for phase, c in sums.cost.items():
            for part in ("forward", "backward", "seconds"):
                if f"{phase}_{part}" in flat:
                    setattr(c, part, float(flat[f"{phase}_{part}"]))
        return sums


class StepCost:
    """What each part of a training step costs, counted into the epoch's running sums
    (`EpochSums.cost`).

    Phases (`PHASES`): ``attack`` (the inner attack), ``pag`` (the target-gradient source and
    the K input gradients with ``create_graph``) and ``step`` (everything else: the
    objective's forward passes, the loss, the one backward of the total loss including its
    second-order part through the K gradients, the optimiser). Data loading is in none.

    Passes are counted at the model, not assumed: a forward hook adds the batch's rows to
    the phase's ``forward``; a hook on each output that needs a gradient adds its rows to
    its ``backward`` each time a reverse pass starts there (so the PAG term's K
    input-gradient passes count K, the final backward counts one; a ``batched`` vmapped pass
    counts one; ``repeat`` counts its K·N rows). Seconds are wall time per phase; on a GPU
    the device is synchronised at each phase change so that work is not booked to the
    next phase (a small cost, only where the device runs asynchronously).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self._model = model
        self._sync = device.type == "cuda"
        self._sums: EpochSums | None = None
        self._phase = "step"
        self._tick = 0.0
        self._handle: Any = None

    def __enter__(self) -> StepCost:
        self._handle = self._model.register_forward_hook(self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _now(self) -> float:
        if self._sync:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def _forward(self, module: Any, args: Any, output: Any) -> None:
        sums = self._sums
        if sums is None or not hasattr(output, "shape"):
            return
        rows = float(output.shape[0])
        sums.cost[self._phase].forward += rows
        if output.requires_grad:
            output.register_hook(self._backward)

    def _backward(self, grad: Tensor) -> None:
        if self._sums is not None:
            self._sums.cost[self._phase].backward += float(grad.shape[0])

    def begin(self, sums: EpochSums) -> None:
        """Start a step, counting into ``sums``, in phase ``step``."""
        self._sums, self._phase, self._tick = sums, "step", self._now()

    def phase(self, name: str) -> None:
        """Book the time since the last change to the current phase and enter ``name``."""
        assert self._sums is not None and name in PHASES
        now = self._now()
        self._sums.cost[self._phase].seconds += now - self._tick
        self._phase, self._tick = name, now

    def end(self) -> None:
        """Book the rest of the step and stop counting (monitor passes are not a step's)."""
        self.phase("step")
        self._sums = None


# ---------------------------------------------------------------------------------------
# the loop's helpers


def _inner_attack(s: Setup, cache_dir: Path | None) -> InnerAttack | None:
    """The run's inner attack (None for objective ``ce``); with ``pag_on: adversarial`` the
    target-gradient source must be able to score new images."""
    from pagctl.protocols import requires_index

    t = s.spec.train
    inner = InnerAttack.build(t, s.bundle, s.device, cache_dir)
    if inner is not None and s.pag_active and t.pag_on == "adversarial" and \
            requires_index(s.source):
        raise SpecError(f"train.pag_on: '{s.spec.target_gradients.name}' serves stored "
                        "training images only and cannot give targets for adversarial "
                        "inputs; use pag_on: clean")
    return inner


def _selection_score(evaluated: dict[str, Any]) -> float | None:
    """What the best model is chosen by: validation robust accuracy, else validation clean
    accuracy (no ``eval.attack``); None without a validation split or monitor."""
    for key in ("val_robust_accuracy", "val_clean_accuracy"):
        if evaluated.get(key) is not None:
            return float(evaluated[key])
    return None


def _alignment_source(s: Setup, cache_dir: Path | None) -> Any:
    """The source the monitor scores alignment against: ``eval.align_source``, else the
    training source when PAG is on; None when there is none or when the training source
    cannot score test images (a bank, `pagctl.protocols.requires_index`). A separate
    ``eval.align_source`` that cannot is a SpecError."""
    from pagctl import registry
    from pagctl.protocols import requires_index

    spec = s.spec
    ref = spec.eval.align_source
    if ref is None or (ref == spec.target_gradients and s.source is not None):
        source = s.source if ref is not None or s.pag_active else None
        return None if requires_index(source) else source  # a bank: no monitor, no error
    ctx = build_context(s.bundle, s.device, spec.train.seed, cache_dir or default_cache_dir())
    source = registry.target_gradients.build(ref, ctx, "eval.align_source")
    if requires_index(source):
        raise SpecError(f"eval.align_source: '{ref.name}' serves training images only and "
                        "cannot score test images; choose another source (e.g. "
                        "nearest_neighbor) or null")
    return source


def _rng_state(gen: torch.Generator) -> dict[str, Tensor]:
    import torch

    state = {"train": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = st
    return state


def _restore(saved: SavedState, model: torch.nn.Module, opt: torch.optim.Optimizer,
             gen: torch.Generator, device: torch.device
             ) -> tuple[int, int, EpochSums, dict[str, float]]:
    """Load the saved model, optimiser and RNG states; (epoch, step, running sums, best
    model so far). A state saved before the sums had a key starts that key at zero (and
    counts the clean accuracy over every image seen, as that version did)."""
    import torch

    model.load_state_dict(saved.module_state("model"))
    saved.restore_optimizer(opt, device)
    gen.set_state(saved.tensors["rng.train"])
    torch.set_rng_state(saved.tensors["rng.torch"])
    cuda = [saved.tensors[k] for k in sorted(saved.tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    c = saved.counters
    sums = EpochSums.from_dict(dict(c["sums"]))
    if "clean_seen" not in c["sums"]:
        sums.clean_seen = sums.seen
    return int(c["epoch"]), int(c["step"]), sums, dict(c.get("best") or {})


def _epoch_record(s: Setup, epoch: int, steps: int, weight: float, sums: EpochSums,
                  evaluated: dict[str, Any]) -> TrainEpochRecord:
    """The epoch's record: its training terms (`EpochSums.means`) and, when the monitor
    ran, what it measured (`monitor`) and how long it took."""
    t = s.spec.train
    objective: dict[str, Any] = {} if t.objective == "ce" else {"objective": t.objective}
    return TrainEpochRecord(
        epoch=epoch + 1, epochs=t.epochs, lr=lr_at(t, epoch, steps - 1, steps),
        pag_weight=weight if s.pag_active else 0.0, **objective,
        **sums.means(t.objective, s.pag_active), **evaluated)


def monitor(s: Setup, epoch: int, align_source: Any) -> dict[str, Any]:
    """The per-epoch monitor on the first ``eval.limit`` test images after 0-based
    ``epoch``: ``n_test`` (and ``data_sha256``, which images those are),
    ``clean_accuracy``, and with ``eval.attack`` ``robust_accuracy`` and ``monitor`` (the
    attack), with a source ``alignment``. With a validation split, the
    same on every validation image: ``n_val``, ``val_clean_accuracy`` and
    ``val_robust_accuracy``.

    The monitoring attack and the class sampling of the alignment metric are seeded from the
    run seed and the epoch, never from the training RNG, so evaluating does not change what
    training does next (resume stays bit-for-bit).
    """
    import torch

    from pagctl.align import mean_alignment
    from pagctl.data import subset_digest

    spec, device = s.spec, s.device
    n_test = len(s.bundle.test)  # type: ignore[arg-type]
    n = min(spec.eval.limit or n_test, n_test)
    indices = torch.arange(n)
    seed = spec.train.seed + 1000 * (epoch + 1)
    batch = spec.data.eval_batch_size
    out: dict[str, Any] = {"n_test": n, "data_sha256": subset_digest(s.bundle.test, indices)}
    out.update(_accuracies(s, s.bundle.test, indices, seed, ""))
    if s.bundle.validation is not None:
        n_val = len(s.bundle.validation)  # type: ignore[arg-type]
        out["n_val"] = n_val
        out.update(_accuracies(s, s.bundle.validation, torch.arange(n_val), seed, "val_"))
    if align_source is not None:
        out["alignment"] = mean_alignment(
            s.model, s.bundle.test, indices, align_source, num_classes=s.bundle.num_classes,
            classes_per_image=spec.train.classes_per_image, batch_size=batch, device=device,
            seed=seed)
    return out


def _accuracies(s: Setup, images: Any, indices: Tensor, seed: int, prefix: str
                ) -> dict[str, Any]:
    """``clean_accuracy`` and, with ``eval.attack``, ``robust_accuracy`` and ``monitor`` on
    ``indices`` of ``images``, each key prefixed with ``prefix`` but ``monitor``."""
    from pagctl import registry
    from pagctl.evaluation.request import EvaluationRequest
    from pagctl.robustness.engine import clean_accuracy, run_attack

    spec, device, batch = s.spec, s.device, s.spec.data.eval_batch_size
    if spec.eval.attack is None:
        return {f"{prefix}clean_accuracy": clean_accuracy(
            s.model, images, indices, batch_size=batch, device=device)}
    ref = spec.eval.attack
    params = registry.attacks.validate_params(ref.name, ref.params, "eval.attack")
    attack = registry.attacks.instantiate(
        ref.name, params, build_context(s.bundle, device, seed, None), "eval.attack")
    rep = run_attack(s.model, attack, images, indices, name=ref.name, params=params,
                     request=EvaluationRequest(batch_size=batch, device=device, seed=seed))
    return {f"{prefix}clean_accuracy": rep.clean_accuracy,
            f"{prefix}robust_accuracy": rep.robust_accuracy,
            "monitor": {"attack": rep.attack, "params": rep.params}}


def _epoch_line(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']}/{r['epochs']}", f"loss {r['loss']:.4f}", f"ce {r['ce']:.4f}"]
    if r.get("pag") is not None:
        parts.append(f"pag {r['pag']:.4f}")
    if r.get("robust") is not None:
        parts.append(f"robust term {r['robust']:.4f}")
    for key, label in (("clean_accuracy", "clean"), ("robust_accuracy", "robust"),
                       ("alignment", "align"), ("val_robust_accuracy", "val robust")):
        if r.get(key) is not None:
            parts.append(f"{label} {r[key]:.3f}")
    parts.append(f"{r['train_seconds'] + r.get('eval_seconds', 0.0):.1f}s")
    if r.get("best"):
        parts.append("(best so far)")
    return "  ".join(parts)
