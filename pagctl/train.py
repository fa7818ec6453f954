"""Training with the PAG objective, in one readable loop (``pagctl train``).

    loss = CE(f(x), y) + lambda * mean_{i, k} (1 - cos(grad_x log p(t_ik | x_i), g(x_i, t_ik)))

with K target classes t_ik per image sampled without replacement (all classes when K equals
the number of classes, the paper's setting) and g from a target-gradient source. lambda is the
real weight; the official code's ``pag_coeff`` c corresponds to lambda = 10 c.

One forward pass per step serves both terms: the logits give the cross-entropy and their
log-softmax is differentiated (with ``create_graph``) for the K input gradients. Augmentation
(random crop / flip) is applied inside the model call and differentiated through, so gradients
are taken with respect to the un-augmented image and compared to targets computed on it.

After every ``eval.every`` epochs (and the last) the per-epoch monitor (`monitor`) measures
the first ``eval.limit`` test points: clean accuracy, robust accuracy under ``eval.attack``
and the mean alignment with ``eval.align_source``. Each epoch appends one
`pagctl.records.TrainEpochRecord` to metrics.jsonl. The run folder's life (refuse or resume,
create, save state) is `pagctl.checkpoint.RunFolder`, shared with score training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.build import Setup, build_context, default_cache_dir, resolve_device, setup
from pagctl.checkpoint import RunFolder, SavedState, append_record, save_model
from pagctl.errors import ModelError, SpecError
from pagctl.records import TrainEpochRecord

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

    from pagctl.data import iter_batches
    from pagctl.data.augment import Augmented, draw_augmentation
    from pagctl.gradients import logits_and_input_gradients
    from pagctl.losses import pag_loss, sample_target_classes
    from pagctl.progress import ProgressBar, StopFlag

    # ---- the run folder: refuse or check before building anything
    folder = RunFolder(spec, command="train", resume=resume, overwrite=overwrite)
    run_dir = folder.path

    with folder:
        # ---- data, model, target-gradient source, alignment monitor, optimiser
        dev = resolve_device(device)
        s = setup(spec, dev, cache_dir=cache_dir)
        t = spec.train
        model = s.model.to(dev)
        channels_last = t.channels_last and dev.type == "cuda"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        align_source = _alignment_source(s, cache_dir)
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay, nesterov=t.nesterov)
        gen = torch.Generator().manual_seed(t.seed)
        n_train = len(s.bundle.train)  # type: ignore[arg-type]
        b = spec.data.batch_size
        steps = n_train // b if t.drop_last else math.ceil(n_train / b)
        if steps == 0:
            raise SpecError(f"data.batch_size: {b} exceeds the {n_train} training images with "
                            "train.drop_last; lower it")

        # ---- start fresh, or restore the saved state
        sums = _zero_sums()
        start_epoch, start_step = 0, 0
        saved = folder.start()
        if saved is not None:
            start_epoch, start_step, sums = _restore(saved, model, opt, gen, dev)
            folder.trim_metrics(lambda r: r.get("kind") != "train_epoch" or (
                isinstance(r.get("epoch"), int) and r["epoch"] <= start_epoch))
        emit = log or (lambda msg: None)
        emit(f"{spec.name}: {n_train} training images, {steps} steps/epoch, device {dev}, "
             f"PAG {'on' if s.pag_active else 'off'} (source {spec.target_gradients.name})")

        def save_state(epoch: int, step: int) -> None:
            folder.save_state({"model": model}, opt, _rng_state(gen),
                              {"epoch": epoch, "step": step, "sums": sums})

        # ---- the loop: epochs of steps, then the monitor, the record and the saves
        amp = t.amp and dev.type == "cuda"
        last: dict[str, Any] = {}
        with StopFlag() as stop, ProgressBar("train", t.epochs * steps, enabled=progress) as bar:
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
                batches = iter_batches(s.bundle.train, perm[first * b: steps * b], b,
                                       workers=spec.data.workers)
                tick = time.perf_counter()
                for step, (idx, x, y) in enumerate(batches, start=first):
                    # -- one step: augmentation draw, targets, CE (+ λ·PAG), SGD
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    if channels_last:
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
                        raise ModelError(
                            f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; "
                            "lower train.lr or train.pag_weight")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    opt.step()

                    # -- running sums, progress, Ctrl-C
                    sums["loss"] += float(loss.detach()) * len(idx)
                    sums["ce"] += float(ce.detach()) * len(idx)
                    sums["pag"] += float(pag.detach()) * len(idx)
                    sums["correct"] += float((logits.argmax(1) == y).sum())
                    sums["seen"] += len(idx)
                    sums["seconds"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                    bar.update(advance=1, description=f"epoch {epoch + 1}/{t.epochs}",
                               info=_running(sums))
                    if on_step is not None:
                        on_step(epoch, step)
                    if stop.requested and step + 1 < steps:
                        save_state(epoch, step + 1)
                        return TrainResult(run_dir, epoch, True, last)

                # -- end of epoch: monitor, record, weights, state
                evaluated: dict[str, Any] = {}
                if (epoch + 1) % spec.eval.every == 0 or epoch + 1 == t.epochs:
                    tick = time.perf_counter()
                    evaluated = monitor(s, epoch, align_source)
                    evaluated["eval_seconds"] = time.perf_counter() - tick
                record = _epoch_record(s, epoch, steps, weight, sums, evaluated)
                append_record(run_dir, record)
                save_model(run_dir, model, s.config, spec)
                sums = _zero_sums()
                save_state(epoch + 1, 0)
                last = record.to_json()
                emit(_epoch_line(last))
                if stop.requested:
                    return TrainResult(run_dir, epoch + 1, epoch + 1 < t.epochs, last)
        return TrainResult(run_dir, t.epochs, False, last)


def prepare(spec: RunSpec, *, device: str = "auto", resume: bool = False,
            overwrite: bool = False, cache_dir: Path | None = None) -> Setup:
    """Everything `train` builds before its first step, without training or writing into
    the run folder (``pagctl train --dry-run``): the run folder's checks, the data, the
    model, the target-gradient source and the alignment monitor's source. Raises what
    `train` would raise for them."""
    RunFolder(spec, command="train", resume=resume, overwrite=overwrite)
    s = setup(spec, resolve_device(device), cache_dir=cache_dir)
    _alignment_source(s, cache_dir)
    return s


# ---------------------------------------------------------------------------------------
# the loop's helpers


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "ce": 0.0, "pag": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0}


def _running(sums: dict[str, float]) -> str:
    """The progress bar's text: the epoch's running loss terms."""
    seen = max(1.0, sums["seen"])
    info = f"loss {sums['loss'] / seen:.3f} ce {sums['ce'] / seen:.3f}"
    if sums["pag"]:
        info += f" pag {sums['pag'] / seen:.3f}"
    return info


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
             ) -> tuple[int, int, dict[str, float]]:
    """Load the saved model, optimiser and RNG states; (epoch, step, running sums)."""
    import torch

    model.load_state_dict(saved.module_state("model"))
    saved.restore_optimizer(opt, device)
    gen.set_state(saved.tensors["rng.train"])
    torch.set_rng_state(saved.tensors["rng.torch"])
    cuda = [saved.tensors[k] for k in sorted(saved.tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    c = saved.counters
    return int(c["epoch"]), int(c["step"]), dict(c["sums"])


def _epoch_record(s: Setup, epoch: int, steps: int, weight: float, sums: dict[str, float],
                  evaluated: dict[str, Any]) -> TrainEpochRecord:
    """The epoch's record: its training terms and, when the monitor ran, what it measured
    (`monitor`) and how long it took."""
    t = s.spec.train
    seen = max(1.0, sums["seen"])
    return TrainEpochRecord(
        epoch=epoch + 1, epochs=t.epochs, lr=lr_at(t, epoch, steps - 1, steps),
        pag_weight=weight if s.pag_active else 0.0, loss=sums["loss"] / seen,
        ce=sums["ce"] / seen, pag=sums["pag"] / seen if s.pag_active else None,
        train_accuracy=sums["correct"] / seen, train_seconds=sums["seconds"], **evaluated)


def monitor(s: Setup, epoch: int, align_source: Any) -> dict[str, Any]:
    """The per-epoch monitor on the first ``eval.limit`` test images after 0-based
    ``epoch``: ``n_test``, ``clean_accuracy``, and with ``eval.attack`` ``robust_accuracy``
    and ``monitor`` (the attack), with a source ``alignment``.

    The monitoring attack and the class sampling of the alignment metric are seeded from the
    run seed and the epoch, never from the training RNG, so evaluating does not change what
    training does next (resume stays bit-for-bit).
    """
    import torch

    from pagctl import registry
    from pagctl.align import mean_alignment
    from pagctl.robustness.engine import clean_accuracy, run_attack

    spec, device = s.spec, s.device
    n_test = len(s.bundle.test)  # type: ignore[arg-type]
    n = min(spec.eval.limit or n_test, n_test)
    indices = torch.arange(n)
    seed = spec.train.seed + 1000 * (epoch + 1)
    batch = spec.data.eval_batch_size
    out: dict[str, Any] = {"n_test": n}
    if spec.eval.attack is not None:
        ref = spec.eval.attack
        params = registry.attacks.validate_params(ref.name, ref.params, "eval.attack")
        attack = registry.attacks.instantiate(
            ref.name, params, build_context(s.bundle, device, seed, None), "eval.attack")
        rep = run_attack(s.model, attack, s.bundle.test, indices, name=ref.name,
                         params=params, batch_size=batch, device=device, seed=seed)
        out.update(clean_accuracy=rep.clean_accuracy, robust_accuracy=rep.robust_accuracy,
                   monitor={"attack": rep.attack, "params": rep.params})
    else:
        out["clean_accuracy"] = clean_accuracy(s.model, s.bundle.test, indices,
                                               batch_size=batch, device=device)
    if align_source is not None:
        out["alignment"] = mean_alignment(
            s.model, s.bundle.test, indices, align_source, num_classes=s.bundle.num_classes,
            classes_per_image=spec.train.classes_per_image, batch_size=batch, device=device,
            seed=seed)
    return out


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
