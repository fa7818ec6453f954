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
from pagctl.errors import SpecError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from pagctl.data import DataBundle
    from pagctl.models import NormalizedModel
    from pagctl.spec import PluginRef, RunSpec, TrainSpec


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    interrupted: bool
    last: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"--device {name}: CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SpecError(f"--device: '{name}' is not a device; use auto, cpu or cuda") from None


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
# augmentation, differentiated through


class _Augmented:
    """``model(augment(x))`` with crop offsets and flips drawn once per step."""

    def __init__(self, model: nn.Module, offsets: Tensor | None, flips: Tensor | None,
                 padding: int) -> None:
        self.model, self.offsets, self.flips, self.padding = model, offsets, flips, padding

    def __call__(self, x: Tensor) -> Tensor:
        import torch
        import torch.nn.functional as F

        if self.offsets is not None:
            n, c, h, w = x.shape
            p = self.padding
            padded = F.pad(x, (p, p, p, p))
            dev = x.device
            rows = self.offsets[:, 0:1].to(dev) + torch.arange(h, device=dev)  # (N, H)
            cols = self.offsets[:, 1:2].to(dev) + torch.arange(w, device=dev)  # (N, W)
            x = padded[torch.arange(n, device=dev)[:, None, None, None],
                       torch.arange(c, device=dev)[None, :, None, None],
                       rows[:, None, :, None], cols[:, None, None, :]]
        if self.flips is not None:
            x = torch.where(self.flips.to(x.device)[:, None, None, None], x.flip(-1), x)
        return self.model(x)


def _draw_augmentation(spec: RunSpec, n: int, gen: torch.Generator) -> tuple[
        Tensor | None, Tensor | None]:
    import torch

    d = spec.data
    if d.augment == "none":
        return None, None
    rows = 1 if d.shared_augmentation else n
    offsets = torch.randint(0, 2 * d.crop_padding + 1, (rows, 2), generator=gen)
    flips = torch.rand(rows, generator=gen) < 0.5 if d.augment == "crop_flip" else None
    if d.shared_augmentation:
        offsets = offsets.expand(n, 2)
        flips = flips.expand(n) if flips is not None else None
    return offsets, flips


# ---------------------------------------------------------------------------------------
# building everything from a spec


@dataclass
class Setup:
    spec: RunSpec
    device: torch.device
    bundle: DataBundle
    model: NormalizedModel
    config: dict[str, Any]
    source: Any
    pag_active: bool


def _build_ctx(bundle: DataBundle, device: torch.device, seed: int,
               cache_dir: Path | None) -> Any:
    from pagctl.protocols import BuildContext

    return BuildContext(num_classes=bundle.num_classes, input_shape=bundle.input_shape,
                        device=device, seed=seed, train_set=bundle.train,
                        cache_dir=cache_dir, data_fingerprint=bundle.fingerprint)


def default_cache_dir() -> Path:
    import os

    env = os.environ.get("PAGCTL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pagctl"


def setup(spec: RunSpec, device: torch.device, *, build_plugins: bool = True,
          cache_dir: Path | None = None) -> Setup:
    """Load data, build the model and validate (and optionally build) the plugins."""
    import torch

    from pagctl import registry
    from pagctl.data import load_data
    from pagctl.models import build_model, timm_config

    bundle = load_data(spec.data)
    k = spec.train.classes_per_image
    if k > bundle.num_classes:
        raise SpecError(f"train.classes_per_image: K={k} but '{bundle.name}' has "
                        f"{bundle.num_classes} classes; use at most {bundle.num_classes}")
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, num_classes=bundle.num_classes,
                        in_chans=bundle.input_shape[0], default_mean=bundle.mean,
                        default_std=bundle.std)
    config = timm_config(model, spec.model, bundle.num_classes, bundle.input_shape[0],
                         bundle.input_shape)
    refs: list[tuple[PluginRef, Any, str]] = [
        (spec.target_gradients, registry.target_gradients, "target_gradients")]
    if spec.eval.attack is not None:
        refs.append((spec.eval.attack, registry.attacks, "eval.attack"))
    if spec.eval.align_source is not None:
        refs.append((spec.eval.align_source, registry.target_gradients, "eval.align_source"))
    for ref, reg, where in refs:
        reg.validate_params(ref.name, ref.params, where)
    source = None
    if build_plugins:
        ctx = _build_ctx(bundle, device, spec.train.seed, cache_dir or default_cache_dir())
        source = registry.target_gradients.build(spec.target_gradients, ctx,
                                                 "target_gradients")
    pag_active = spec.train.pag_weight > 0 and not getattr(source, "disables_pag", False) \
        and spec.target_gradients.name != "none"
    return Setup(spec, device, bundle, model, config, source, pag_active)


# ---------------------------------------------------------------------------------------
# evaluation after an epoch


def evaluate(s: Setup, epoch: int, align_source: Any) -> dict[str, Any]:
    """Clean accuracy, monitoring-attack accuracy and mean alignment cosine on test."""
    import torch

    from pagctl import registry
    from pagctl.attack import eval_mode, run_attack
    from pagctl.data import get_batch
    from pagctl.losses import cosine_alignment, sample_target_classes

    spec, device = s.spec, s.device
    n_test = len(s.bundle.test)  # type: ignore[arg-type]
    n = min(spec.eval.limit or n_test, n_test)
    indices = torch.arange(n)
    seed = spec.train.seed + 1000 * (epoch + 1)
    out: dict[str, Any] = {"n_test": n}
    if spec.eval.attack is not None:
        ctx = _build_ctx(s.bundle, device, seed, None)
        attack = registry.attacks.build(spec.eval.attack, ctx, "eval.attack")
        params = registry.attacks.validate_params(spec.eval.attack.name,
                                                  spec.eval.attack.params, "eval.attack")
        rep = run_attack(s.model, attack, s.bundle.test, indices, name=spec.eval.attack.name,
                         params=params, batch_size=spec.data.eval_batch_size, device=device,
                         seed=seed)
        out.update(clean_accuracy=rep.clean_accuracy, robust_accuracy=rep.robust_accuracy,
                   monitor={"attack": rep.attack, "params": rep.params})
    if align_source is not None:
        gen = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0
        correct = 0
        with eval_mode(s.model):
            for lo in range(0, n, spec.data.eval_batch_size):
                x, y = get_batch(s.bundle.test, indices[lo: lo + spec.data.eval_batch_size])
                x, y = x.to(device), y.to(device)
                classes = sample_target_classes(y, s.bundle.num_classes,
                                                spec.train.classes_per_image, gen)
                with torch.no_grad():
                    targets = align_source(x, y, classes)
                logits, grads = _logits_grads(s.model, x, classes, create_graph=False)
                correct += int((logits.argmax(1) == y).sum())
                cos = cosine_alignment(grads, targets)
                total += float(cos.sum())
                count += cos.numel()
        out["alignment"] = total / max(1, count)
        out.setdefault("clean_accuracy", correct / max(1, n))
    elif "clean_accuracy" not in out:
        correct = 0
        with eval_mode(s.model), torch.no_grad():
            for lo in range(0, n, spec.data.eval_batch_size):
                x, y = get_batch(s.bundle.test, indices[lo: lo + spec.data.eval_batch_size])
                correct += int((s.model(x.to(device)).argmax(1) == y.to(device)).sum())
        out["clean_accuracy"] = correct / max(1, n)
    return out


def _logits_grads(model: Any, x: Tensor, classes: Tensor, *,
                  create_graph: bool) -> tuple[Tensor, Tensor]:
    from pagctl.gradients import logits_and_input_gradients

    return logits_and_input_gradients(model, x, classes, create_graph=create_graph)


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
    from pagctl.data import get_batch
    from pagctl.losses import pag_loss, sample_target_classes
    from pagctl.progress import TrainProgress

    run_dir = spec.run_dir
    checkpoint.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        saved = checkpoint.read_spec(run_dir)
        if saved != spec:
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
            ctx = _build_ctx(s.bundle, dev, t.seed, cache_dir or default_cache_dir())
            align_source = registry.target_gradients.build(spec.eval.align_source, ctx,
                                                           "eval.align_source")
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
            for step in range(first, steps):
                tick = time.perf_counter()
                idx = perm[step * b: (step + 1) * b]
                x, y = get_batch(s.bundle.train, idx)
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if t.channels_last and dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                for group in opt.param_groups:
                    group["lr"] = lr_at(t, epoch, step, steps)
                offsets, flips = _draw_augmentation(spec, len(idx), gen)
                net: Any = model if offsets is None and flips is None else \
                    _Augmented(model, offsets, flips, spec.data.crop_padding)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                    if s.pag_active:
                        classes = sample_target_classes(y, s.bundle.num_classes,
                                                        t.classes_per_image, gen)
                        with torch.no_grad():
                            targets = s.source(x, y, classes, index=idx)
                        logits, grads = _logits_grads(net, x, classes, create_graph=True)
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
                loss.backward()
                opt.step()
                sums["loss"] += float(loss) * len(idx)
                sums["ce"] += float(ce) * len(idx)
                sums["pag"] += float(pag) * len(idx)
                sums["correct"] += float((logits.argmax(1) == y).sum())
                sums["seen"] += len(idx)
                sums["seconds"] += time.perf_counter() - tick
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
