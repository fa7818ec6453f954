"""Training with the PAG objective, in one readable loop.

    loss = CE(f(x), y) + lambda * mean_{i, k} (1 - cos(grad_x log p(t_ik | x_i), g(x_i, t_ik)))

with K target classes t_ik per image sampled without replacement (all classes when K equals
the number of classes, the paper's setting) and g from a target-gradient source. lambda is the
real weight; the official code's ``pag_coeff`` c corresponds to lambda = 10 c.

One forward pass per step serves both terms: the logits give the cross-entropy and their
log-softmax is differentiated (with ``create_graph``) for the K input gradients. Augmentation
(random crop / flip) is applied inside the model call and differentiated through, so gradients
are taken with respect to the un-augmented image and compared to targets computed on it.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl import checkpoint
from pagctl.build import build_context, default_cache_dir, resolve_device, setup
from pagctl.errors import SpecError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

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
    final epoch); cosine: per step from lr down to 0; constant.
    """
    if t.schedule == "constant":
        return t.lr
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


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _rng_state(gen: torch.Generator) -> dict[str, Tensor]:
    import torch

    state = {"train": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = st
    return state


def _restore_rng(gen: torch.Generator, tensors: dict[str, Tensor]) -> None:
    import torch

    gen.set_state(tensors["rng.train"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


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
) -> TrainResult:
    """Train ``spec`` into its run folder. Returns when done or after a Ctrl-C (state saved).

    ``on_step(epoch, step)`` is called after every optimiser step (0-based counters).
    """
    import torch
    import torch.nn.functional as F

    from pagctl import registry
    from pagctl.augment import Augmented, draw_augmentation
    from pagctl.data import iter_batches
    from pagctl.evaluate import evaluate
    from pagctl.gradients import logits_and_input_gradients
    from pagctl.losses import pag_loss, sample_target_classes
    from pagctl.progress import TrainProgress

    run_dir = spec.run_dir
    checkpoint.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        saved = checkpoint.read_spec(run_dir)
        # out_dir may differ (a folder resumed by path, or moved); the folder is what counts
        no_dir = {"out_dir": None}
        if saved.model_copy(update=no_dir) != spec.model_copy(update=no_dir):
            raise SpecError(f"--resume: the spec differs from {run_dir}/spec.json; resume "
                            f"with 'pagctl train {run_dir} --resume' or use --overwrite")
    dev = resolve_device(device)
    s = setup(spec, dev, cache_dir=cache_dir)
    t = spec.train
    model = s.model.to(dev)
    if t.channels_last and dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    align_source = s.source if s.pag_active else None
    if spec.eval.align_source is not None:
        if spec.eval.align_source == spec.target_gradients and s.source is not None:
            align_source = s.source
        else:
            ctx = build_context(s.bundle, dev, t.seed, cache_dir or default_cache_dir())
            align_source = registry.target_gradients.build(spec.eval.align_source, ctx,
                                                           "eval.align_source")
            if getattr(align_source, "requires_index", False):
                raise SpecError(f"eval.align_source: '{spec.eval.align_source.name}' serves "
                                "training images only and cannot score test images; choose "
                                "another source (e.g. nearest_neighbor) or null")
    if getattr(align_source, "requires_index", False):
        align_source = None  # a bank has no targets for test images: no alignment monitor
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                          weight_decay=t.weight_decay, nesterov=t.nesterov)
    gen = torch.Generator().manual_seed(t.seed)
    n_train = len(s.bundle.train)  # type: ignore[arg-type]
    b = spec.data.batch_size
    steps = n_train // b if t.drop_last else math.ceil(n_train / b)
    if steps == 0:
        raise SpecError(f"data.batch_size: {b} exceeds the {n_train} training images with "
                        "train.drop_last; lower it")
    start_epoch, start_step = 0, 0
    sums = {"loss": 0.0, "ce": 0.0, "pag": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0}
    if resume:
        tensors, meta = checkpoint.load_state(run_dir)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        checkpoint.optimizer_from_flat(opt, {k: v.to(dev) for k, v in tensors.items()},
                                       meta["optimizer"])
        _restore_rng(gen, tensors)
        start_epoch, start_step, sums = meta["epoch"], meta["step"], meta["sums"]
        checkpoint.truncate_metrics(run_dir, keep=start_epoch)
    else:
        checkpoint.create_run_dir(run_dir, overwrite=overwrite)
        checkpoint.write_spec(run_dir, spec)
    emit = log or (lambda msg: None)
    emit(f"{spec.name}: {n_train} training images, {steps} steps/epoch, device {dev}, "
         f"PAG {'on' if s.pag_active else 'off'} (source {spec.target_gradients.name})")

    def save_state(epoch: int, step: int) -> None:
        checkpoint.save_state(run_dir, model, opt, _rng_state(gen),
                              {"epoch": epoch, "step": step, "sums": sums,
                               "spec_hash": checkpoint.spec_hash(spec)})

    amp = t.amp and dev.type == "cuda"
    last: dict[str, Any] = {}
    epoch = start_epoch
    with _StopFlag() as stop, TrainProgress(t.epochs, steps, enabled=progress) as bar:
        bar.advance_to(start_epoch, start_step)
        for epoch in range(start_epoch, t.epochs):
            perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(
                t.seed * 1_000_003 + epoch))
            weight = pag_weight_at(t, epoch)
            model.train()
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                sums = dict.fromkeys(sums, 0.0)
            batches = iter_batches(s.bundle.train, perm[first * b: steps * b], b,
                                   workers=spec.data.workers)
            tick = time.perf_counter()
            for step, (idx, x, y) in enumerate(batches, start=first):
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if t.channels_last and dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                for group in opt.param_groups:
                    group["lr"] = lr_at(t, epoch, step, steps)
                offsets, flips = draw_augmentation(spec.data, len(idx), gen)
                net: Any = model if offsets is None and flips is None else \
                    Augmented(model, offsets, flips, spec.data.crop_padding)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                    if s.pag_active:
                        classes = sample_target_classes(y, s.bundle.num_classes,
                                                        t.classes_per_image, gen)
                        with torch.no_grad():
                            targets = s.source(x, y, classes, index=idx)
                        logits, grads = logits_and_input_gradients(
                            net, x, classes, create_graph=True, method=t.grad_method)
                        ce = F.cross_entropy(logits.float(), y)
                        pag = pag_loss(grads.float(), targets.float())
                        loss = ce + weight * pag
                    else:
                        logits = net(x)
                        ce = F.cross_entropy(logits.float(), y)
                        pag = torch.zeros((), device=dev)
                        loss = ce
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; "
                        "lower train.lr or train.pag_weight")
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                sums["loss"] += float(loss.detach()) * len(idx)
                sums["ce"] += float(ce.detach()) * len(idx)
                sums["pag"] += float(pag.detach()) * len(idx)
                sums["correct"] += float((logits.argmax(1) == y).sum())
                sums["seen"] += len(idx)
                sums["seconds"] += time.perf_counter() - tick
                tick = time.perf_counter()
                bar.step(epoch, sums)
                if on_step is not None:
                    on_step(epoch, step)
                if stop.requested and step + 1 < steps:
                    save_state(epoch, step + 1)
                    return TrainResult(run_dir, epoch, True, last)
            seen = max(1.0, sums["seen"])
            record: dict[str, Any] = {
                "kind": "train_epoch", "epoch": epoch + 1, "epochs": t.epochs,
                "lr": lr_at(t, epoch, steps - 1, steps), "pag_weight": weight if s.pag_active
                else 0.0, "loss": sums["loss"] / seen, "ce": sums["ce"] / seen,
                "pag": sums["pag"] / seen if s.pag_active else None,
                "train_accuracy": sums["correct"] / seen, "train_seconds": sums["seconds"]}
            if (epoch + 1) % spec.eval.every == 0 or epoch + 1 == t.epochs:
                tick = time.perf_counter()
                record.update(evaluate(s, epoch, align_source))
                record["eval_seconds"] = time.perf_counter() - tick
            checkpoint.append_metrics(run_dir, record)
            checkpoint.save_model(run_dir, model, s.config, spec)
            sums = dict.fromkeys(sums, 0.0)
            save_state(epoch + 1, 0)
            bar.epoch_done(record)
            emit(_epoch_line(record))
            last = record
            if stop.requested:
                return TrainResult(run_dir, epoch + 1, epoch + 1 < t.epochs, last)
    return TrainResult(run_dir, t.epochs, False, last)


def _epoch_line(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']}/{r['epochs']}", f"loss {r['loss']:.4f}", f"ce {r['ce']:.4f}"]
    if r.get("pag") is not None:
        parts.append(f"pag {r['pag']:.4f}")
    for key, label in (("clean_accuracy", "clean"), ("robust_accuracy", "robust"),
                       ("alignment", "align")):
        if r.get(key) is not None:
            parts.append(f"{label} {r[key]:.3f}")
    parts.append(f"{r['train_seconds'] + r.get('eval_seconds', 0.0):.1f}s")
    return "  ".join(parts)
