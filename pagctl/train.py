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
appends one `pagctl.records.TrainEpochRecord` to metrics.jsonl, with the cost of its steps
(`StepCost`). The run folder's life (refuse or resume, create, save state) is
`pagctl.checkpoint.RunFolder`, shared with score training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
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
    from pagctl.spec import RunSpec, TrainSpec


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    interrupted: bool
    last: dict[str, Any] = field(default_factory=dict)


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
    """`train` as one replica (the only one, or one rank of a launch)."""
    import torch

    from pagctl.checkpoint import check_saveable, read_saved_state
    from pagctl.data import iter_chunks
    from pagctl.data.augment import Augmented, draw_augmentation
    from pagctl.distributed.replicas import synchronise_batchnorm
    from pagctl.gradients import logits_and_input_gradients, method_for
    from pagctl.losses import objective_loss, pag_loss, sample_target_classes
    from pagctl.progress import ProgressBar, StopFlag

    # ---- the run folder: rank 0 refuses or checks it before anything is built
    with ExitStack() as stack:
        folder: RunFolder | None = None
        refused: PagctlError | None = None
        if replicas.leader:
            try:
                folder = RunFolder(spec, command="train", resume=resume, overwrite=overwrite)
                stack.enter_context(folder)
            except PagctlError as exc:
                refused = exc
        _follow_leader(replicas, refused)
        run_dir = spec.run_dir

        # ---- data, model, target-gradient source, inner attack, monitor, optimiser
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
        needs_clean = t.objective in ("ce", "trades", "mart")
        needs_adv = t.objective != "ce"

        # ---- start fresh, or restore the saved state (every rank reads it; rank 0 checked)
        sums = _zero_sums()
        best: dict[str, float] = {}
        start_epoch, start_step = 0, 0
        saved: SavedState | None = None
        align_source: Any = None  # the monitor's, on rank 0 (which alone runs it)
        failed: PagctlError | None = None
        if folder is not None:
            try:
                align_source = _alignment_source(s, cache_dir)
                # a model safetensors cannot hold is refused before the folder is begun,
                # not at the first epoch's save
                check_saveable(model.net.state_dict(), f"model.arch: {spec.model.arch}")
                saved = folder.start()
            except PagctlError as exc:
                failed = exc
        _follow_leader(replicas, failed)
        if resume and not replicas.leader:
            saved = read_saved_state(run_dir)
        if saved is not None:
            start_epoch, start_step, sums, best = _restore(saved, model, opt, gen, dev)
            if folder is not None:
                folder.trim_metrics(lambda r: r.get("kind") != "train_epoch" or (
                    isinstance(r.get("epoch"), int) and r["epoch"] <= start_epoch))
            else:
                sums = _zero_sums()  # rank 0 carries the saved running sums, for all
        replicas.start(model)
        emit = log or (lambda msg: None)
        adversarial = "" if inner is None else \
            f", objective {t.objective} (inner attack {inner.name}, {inner.mode} mode)"
        parallel = "" if replicas.parts == 1 else \
            (f", {replicas.world_size} processes x {replicas.accumulation} micro-batches of "
             f"{b // replicas.parts} ({synced} BatchNorm layers synchronised)")
        pag_text = f"on (source {spec.target_gradients.name}, gradients by {grad_method})" \
            if s.pag_active else "off"
        emit(f"{spec.name}: {n_train} training images, {steps} steps/epoch, device {dev}, "
             f"PAG {pag_text}{adversarial}{parallel}")

        def save_state(epoch: int, step: int, sums: dict[str, float]) -> None:
            if folder is not None:
                folder.save_state({"model": model}, opt, _rng_state(gen),
                                  {"epoch": epoch, "step": step, "sums": sums, "best": best})

        # ---- the loop: epochs of steps, then the monitor, the record and the saves
        amp = t.amp  # bfloat16 autocast, through the double backward, on any device
        last: dict[str, Any] = {}
        with StopFlag() as stop, ProgressBar("train", t.epochs * steps, enabled=progress) as bar, \
                StepCost(model, dev) as cost:
            bar.update(completed=start_epoch * steps + start_step,
                       description=f"epoch {start_epoch + 1}/{t.epochs}")
            for epoch in range(start_epoch, t.epochs):
                perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(
                    t.seed * 1_000_003 + epoch))
                weight = pag_weight_at(t, epoch)
                model.train()
                first = start_step if epoch == start_epoch else 0
                if first == 0:
                    sums = _zero_sums()
                # every step's global batch, cut into this replica's micro-batches
                blocks = [perm[i * b: min((i + 1) * b, n_train)] for i in range(first, steps)]
                batches = iter_chunks(s.bundle.train, [
                    block[part] for block in blocks for part in replicas.micro_slices(len(block))],
                    workers=spec.data.workers)
                tick = time.perf_counter()
                for step, block in enumerate(blocks, start=first):
                    # -- one step: the global batch's draws, then per micro-batch x_adv,
                    #    targets, objective (+ λ·PAG) and backward; the gradients summed; SGD
                    cost.begin(sums)
                    for group in opt.param_groups:
                        group["lr"] = lr_at(t, epoch, step, steps)
                    n_step = len(block)
                    offsets, flips = draw_augmentation(spec.data, n_step, gen)
                    step_classes = sample_target_classes(
                        torch.zeros(n_step, dtype=torch.int64), s.bundle.num_classes,
                        t.classes_per_image, gen) if s.pag_active else None
                    opt.zero_grad(set_to_none=True)
                    loss_sum = 0.0
                    for micro, rows in enumerate(replicas.micro_slices(n_step)):
                        idx, x, y = next(batches)
                        if replicas.parts > 1:  # layers that draw (dropout): per slice
                            torch.manual_seed(step_seed(t.seed, epoch, step, replicas.part(micro)))
                        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                        if channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        net: Any = model if offsets is None and flips is None else Augmented(
                            model, None if offsets is None else offsets[rows],
                            None if flips is None else flips[rows], spec.data.crop_padding)
                        x_adv = None
                        if inner is not None:
                            cost.phase("attack")
                            x_adv = _attack_slice(inner, replicas, net, model, x, y, step_seed(
                                t.seed, epoch, step, replicas.part(micro)))
                            if channels_last:
                                x_adv = x_adv.contiguous(memory_format=torch.channels_last)
                        clean_logits: Tensor | None = None
                        adv_logits: Tensor | None = None
                        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                            enabled=amp):
                            if step_classes is not None:
                                cost.phase("pag")
                                pag_x = x if t.pag_on == "clean" or x_adv is None else x_adv
                                classes = step_classes[rows].to(dev)
                                with torch.no_grad():
                                    targets = s.source(pag_x, y, classes, index=idx)
                                logits, grads = logits_and_input_gradients(
                                    net, pag_x, classes, create_graph=True,
                                    method=grad_method)
                                pag = pag_loss(grads.float(), targets.float())
                                if pag_x is x:
                                    clean_logits = logits
                                else:
                                    adv_logits = logits
                            else:
                                pag = torch.zeros((), device=dev)
                            cost.phase("step")
                            if needs_clean and clean_logits is None:
                                clean_logits = net(x)
                            if needs_adv and adv_logits is None:
                                adv_logits = net(x_adv)
                            objective, robust = objective_loss(
                                t.objective,
                                None if clean_logits is None else clean_logits.float(),
                                None if adv_logits is None else adv_logits.float(), y, t.beta)
                            loss = objective + weight * pag if s.pag_active else objective
                        n = len(idx)
                        share = n / n_step  # the micro-batch's part of the global mean
                        (loss if share == 1.0 else loss * share).backward()  # type: ignore[no-untyped-call]

                        # -- running sums
                        loss_value = float(loss.detach())
                        loss_sum += loss_value * n
                        sums["loss"] += loss_value * n
                        robust_value = 0.0 if robust is None else float(robust.detach())
                        sums["ce"] += (float(objective.detach()) - t.beta * robust_value) * n
                        sums["robust"] += robust_value * n
                        sums["pag"] += float(pag.detach()) * n
                        if clean_logits is not None:
                            sums["correct"] += float((clean_logits.argmax(1) == y).sum())
                            sums["clean_seen"] += n
                        if adv_logits is not None:
                            sums["adv_correct"] += float((adv_logits.argmax(1) == y).sum())
                            sums["adv_seen"] += n
                        sums["seen"] += n
                    stopping, total = replicas.finish_step(model, stop.requested, loss_sum)
                    if not math.isfinite(total):
                        raise ModelError(
                            f"loss became {total / n_step} at epoch {epoch + 1} step "
                            f"{step + 1}; lower train.lr or train.pag_weight")
                    opt.step()
                    replicas.sync_buffers(model)
                    cost.end()

                    # -- progress, Ctrl-C / SIGTERM (on any rank: every rank stops here)
                    sums["seconds"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                    bar.update(advance=1, description=f"epoch {epoch + 1}/{t.epochs}",
                               info=_running(sums))
                    if on_step is not None:
                        on_step(epoch, step)
                    if not replicas.distributed:  # alone, a request made until now counts
                        stopping = stop.requested
                    if stopping and step + 1 < steps:
                        save_state(epoch, step + 1, replicas.reduce_sums(sums))
                        return TrainResult(run_dir, epoch, True, last)

                # -- end of epoch: monitor, record, weights (last, best), state (rank 0)
                sums = replicas.reduce_sums(sums)
                if folder is not None:
                    evaluated: dict[str, Any] = {}
                    if (epoch + 1) % spec.eval.every == 0 or epoch + 1 == t.epochs:
                        tick = time.perf_counter()
                        evaluated = monitor(s, epoch, align_source)
                        evaluated["eval_seconds"] = time.perf_counter() - tick
                    score = _selection_score(evaluated)
                    if score is not None and score > best.get("score", -1.0):
                        best = {"epoch": float(epoch + 1), "score": score}
                        save_model(run_dir, model, s.config, spec, file=BEST_MODEL_FILE,
                                   test_sha256=s.test_sha256)
                        evaluated["best"] = True
                    if replicas.distributed:
                        evaluated["processes"] = replicas.world_size
                    record = _epoch_record(s, epoch, steps, weight, sums, evaluated)
                    append_record(run_dir, record)
                    save_model(run_dir, model, s.config, spec, test_sha256=s.test_sha256)
                    save_state(epoch + 1, 0, _zero_sums())
                    last = record.to_json()
                    emit(_epoch_line(last))
                sums = _zero_sums()
                if replicas.agree(stop.requested):  # every rank waits for rank 0's saves
                    return TrainResult(run_dir, epoch + 1, epoch + 1 < t.epochs, last)
        return TrainResult(run_dir, t.epochs, False, last)


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
# the loop's helpers


PHASES = ("attack", "pag", "step")
"""The parts of a training step whose cost an epoch record gives (`StepCost`)."""


def _zero_sums() -> dict[str, float]:
    sums = {"loss": 0.0, "ce": 0.0, "robust": 0.0, "pag": 0.0, "correct": 0.0,
            "clean_seen": 0.0, "adv_correct": 0.0, "adv_seen": 0.0, "seen": 0.0,
            "seconds": 0.0}
    for phase in PHASES:
        sums.update({f"{phase}_forward": 0.0, f"{phase}_backward": 0.0,
                     f"{phase}_seconds": 0.0})
    return sums


class StepCost:
    """What each part of a training step costs, counted into the epoch's running sums.

    Phases (`PHASES`): ``attack`` (the inner attack), ``pag`` (the target-gradient source and
    the K input gradients with ``create_graph``) and ``step`` (everything else: the
    objective's forward passes, the loss, the one backward of the total loss including its
    second-order part through the K gradients, the optimiser). Data loading is in none.

    Passes are counted at the model, not assumed: a forward hook adds the batch's rows to
    ``<phase>_forward``; a hook on each output that needs a gradient adds its rows to
    ``<phase>_backward`` each time a reverse pass starts there (so the PAG term's K
    input-gradient passes count K, the final backward counts one; a ``batched`` vmapped pass
    counts one; ``repeat`` counts its K·N rows). Seconds are wall time per phase; on a GPU
    the device is synchronised at each phase change so that work is not booked to the
    next phase (a small cost, only where the device runs asynchronously).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self._model = model
        self._sync = device.type == "cuda"
        self._sums: dict[str, float] | None = None
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
        sums[f"{self._phase}_forward"] += rows
        if output.requires_grad:
            output.register_hook(self._backward)

    def _backward(self, grad: Tensor) -> None:
        if self._sums is not None:
            self._sums[f"{self._phase}_backward"] += float(grad.shape[0])

    def begin(self, sums: dict[str, float]) -> None:
        """Start a step, counting into ``sums``, in phase ``step``."""
        self._sums, self._phase, self._tick = sums, "step", self._now()

    def phase(self, name: str) -> None:
        """Book the time since the last change to the current phase and enter ``name``."""
        assert self._sums is not None and name in PHASES
        now = self._now()
        self._sums[f"{self._phase}_seconds"] += now - self._tick
        self._phase, self._tick = name, now

    def end(self) -> None:
        """Book the rest of the step and stop counting (monitor passes are not a step's)."""
        self.phase("step")
        self._sums = None


def _running(sums: dict[str, float]) -> str:
    """The progress bar's text: the epoch's running loss terms."""
    seen = max(1.0, sums["seen"])
    info = f"loss {sums['loss'] / seen:.3f} ce {sums['ce'] / seen:.3f}"
    if sums["robust"]:
        info += f" robust {sums['robust'] / seen:.3f}"
    if sums["pag"]:
        info += f" pag {sums['pag'] / seen:.3f}"
    return info


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
             ) -> tuple[int, int, dict[str, float], dict[str, float]]:
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
    zero = _zero_sums()
    sums = {**zero, **{k: float(v) for k, v in dict(c["sums"]).items() if k in zero}}
    if "clean_seen" not in c["sums"]:
        sums["clean_seen"] = sums["seen"]
    return int(c["epoch"]), int(c["step"]), sums, dict(c.get("best") or {})


def _epoch_record(s: Setup, epoch: int, steps: int, weight: float, sums: dict[str, float],
                  evaluated: dict[str, Any]) -> TrainEpochRecord:
    """The epoch's record: its training terms and, when the monitor ran, what it measured
    (`monitor`) and how long it took."""
    t = s.spec.train
    seen = max(1.0, sums["seen"])
    extra: dict[str, Any] = {}
    if t.objective != "ce":
        extra["objective"] = t.objective
        if t.objective in ("trades", "mart"):
            extra["robust"] = sums["robust"] / seen
    if sums["clean_seen"]:
        extra["train_accuracy"] = sums["correct"] / sums["clean_seen"]
    if sums["adv_seen"]:
        extra["train_adv_accuracy"] = sums["adv_correct"] / sums["adv_seen"]
    passes = {phase: {"forward": sums[f"{phase}_forward"] / seen,
                      "backward": sums[f"{phase}_backward"] / seen} for phase in PHASES}
    return TrainEpochRecord(
        epoch=epoch + 1, epochs=t.epochs, lr=lr_at(t, epoch, steps - 1, steps),
        pag_weight=weight if s.pag_active else 0.0, loss=sums["loss"] / seen,
        ce=sums["ce"] / seen, pag=sums["pag"] / seen if s.pag_active else None,
        train_seconds=sums["seconds"], passes_per_image=passes,
        attack_seconds=sums["attack_seconds"], pag_seconds=sums["pag_seconds"],
        step_seconds=sums["step_seconds"], **extra, **evaluated)


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
