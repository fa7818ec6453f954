"""Training class-conditional score models by denoising score matching (``pagctl
train-score``).

The score model (`pagctl.score.model`) supplies the Score-Based Gradients target source
(``sbg``): g(x, t) = s(x_σ, σ, t) − s(x_σ, σ, ∅), which by Bayes' rule is
∇ log p(t | x_σ). This module holds the training loop (`train_score`); the spec
(`ScoreSpec`, built-ins in ``pagctl/specs/score/``) is `pagctl.score.spec` and the samples
figure `pagctl.score.figures`. The run folder's life (refuse or resume, create, save state)
is the one training classifiers shares (`pagctl.checkpoint.RunFolder`).

Training, per example: σ log-uniform in [sigma_min, sigma_max], ε ~ N(0, I),
x_σ = x + σ·ε, the label replaced by the null class with probability ``null_prob``, and
loss = mean ‖ε̂(x_σ, σ, t') − ε‖². Adam, linear warm-up then constant or cosine learning
rate, gradient-norm clipping, optional EMA of the weights (used for sampling and saved as
the model). Every random draw (batch order, σ, ε, null mask, flips) comes from seeded
generators, never the global RNG, so an interrupted run resumed with ``resume=True``
ends with exactly the weights of an uninterrupted one.

Run folder (every file written atomically)::

    <out_dir>/
      model.safetensors   weights (the EMA weights when train.ema is set)
      config.json         ScoreModelConfig: network, num_classes, input_shape, centring, σ range
      spec.json           the validated ScoreSpec
      metrics.jsonl       {"kind": "score_train", "step", "loss", "lr", "seconds"} every log_every
      state.safetensors   model, EMA, Adam state, generator state, counters (for resume)
      state.json          a readable copy of the counters
      samples.png         per_class samples of every class (the toy: a scatter over the data)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pagctl.checkpoint import RunFolder, append_record
from pagctl.errors import ModelError, SpecError
from pagctl.records import ScoreDoneRecord, ScoreTrainRecord
from pagctl.score.figures import SAMPLES_FILE, write_samples_figure
from pagctl.score.model import ScoreModel, ScoreModelConfig, save_score_model
from pagctl.score.spec import ScoreSpec, ScoreTrainSpec

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from pagctl.data import DataBundle

__all__ = ["ScoreTrainResult", "dsm_loss", "lr_at", "model_config_for", "train_score"]


# ---------------------------------------------------------------------------------------
# training


@dataclass
class ScoreTrainResult:
    run_dir: Path
    steps_done: int
    interrupted: bool
    last: dict[str, Any] = field(default_factory=dict)
    samples: Path | None = None


def model_config_for(spec: ScoreSpec, bundle: DataBundle, trained_steps: int = 0
                     ) -> ScoreModelConfig:
    """The network config of ``spec`` on ``bundle``: centre = the dataset's default
    per-channel mean, σ_d = the root mean square of its per-channel std."""
    sigma_data = math.sqrt(sum(s * s for s in bundle.std) / len(bundle.std))
    try:
        return ScoreModelConfig(
            network=spec.model.resolved_kind(bundle.input_shape),
            num_classes=bundle.num_classes, input_shape=bundle.input_shape,
            width=spec.model.width, channel_mult=spec.model.channel_mult,
            blocks=spec.model.blocks, dropout=spec.model.dropout, center=bundle.mean,
            sigma_data=sigma_data, sigma_min=spec.train.sigma_min,
            sigma_max=spec.train.sigma_max, trained_steps=trained_steps,
            ema=spec.train.ema is not None)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise SpecError(f"model: {msg}") from None


def lr_at(t: ScoreTrainSpec, step: int) -> float:
    """Learning rate at 0-based ``step``: linear warm-up, then constant or cosine to 0."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * (step - t.warmup_steps) / span))


def _batch_order(n: int, batch: int, seed: int, step: int,
                 cache: dict[int, Tensor]) -> Tensor:
    """Dataset positions of ``step``'s batch: epoch e uses a permutation seeded by (seed, e),
    so the order depends on the step number only."""
    import torch

    per_epoch = max(1, n // batch)
    epoch, within = divmod(step, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + epoch))
    return cache[epoch][within * batch: (within + 1) * batch]


def dsm_loss(model: ScoreModel, x: Tensor, y: Tensor, gen: torch.Generator,
             t: ScoreTrainSpec) -> Tensor:
    """Denoising score-matching loss of one batch, every draw from ``gen`` (a CPU
    generator). Shape: x (B, C, H, W) in [0, 1], y (B,) int64 -> scalar."""
    import torch

    b = x.shape[0]
    log_lo, log_hi = math.log(t.sigma_min), math.log(t.sigma_max)
    sigma = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(b, generator=gen))
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32)
    null = torch.rand(b, generator=gen) < t.null_prob
    dev = x.device
    sigma, eps, null = sigma.to(dev), eps.to(dev), null.to(dev)
    y = torch.where(null, torch.full_like(y, model.null_class), y)
    x_sigma = x + sigma.view(-1, 1, 1, 1) * eps
    loss: Tensor = (model(x_sigma, sigma, y).float() - eps).square().mean()
    return loss


def _before(record: dict[str, Any], step: int) -> bool:
    """Whether a metrics record was written up to ``step`` (a resumed run keeps those)."""
    if record.get("kind") == "score_train":
        return isinstance(record.get("step"), int) and record["step"] <= step
    return record.get("kind") != "score_done"


def _ema_update(ema_params: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """ema ← ema + (1 − decay)(θ − ema), for all tensors at once."""
    import torch

    with torch.no_grad():
        torch._foreach_lerp_(list(ema_params), list(params), 1.0 - decay)


def train_score(
    spec: ScoreSpec,
    *,
    device: str = "auto",
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> ScoreTrainResult:
    """Train ``spec``'s score model into its run folder; returns when done or after a
    Ctrl-C (the first one stops after the current step and saves state; the result is
    then ``interrupted``). ``resume`` continues a saved state exactly; an existing folder is
    refused without ``resume`` or ``overwrite`` (CheckpointError). ``on_step(step)`` is called
    after every optimiser step (0-based). Writes samples.png at the end (skipped, with a
    log line, when matplotlib is missing).

    The phases, each a function below, as in `pagctl.train`: what the steps read
    (`_build`), a fresh start or the saved state (`_start`), the steps (`_step`) with a
    record every ``log_every`` and the state every ``save_every``, the end (`_finish`).
    """
    from pagctl.progress import ProgressBar, StopFlag

    # ---- the run folder: refuse or check before building anything
    folder = RunFolder(spec, command="train-score", resume=resume, overwrite=overwrite,
                       folder="score run", what="score spec", files=(SAMPLES_FILE,))
    run_dir = folder.path

    with folder:
        # ---- data, model, EMA copy, optimiser
        run = _build(spec, device)
        t = spec.train

        # ---- start fresh, or restore the saved state
        start, sums = _start(run, folder)
        emit = log or (lambda msg: None)
        n_params = sum(p.numel() for p in run.model.parameters())
        emit(f"{spec.name}: {run.config.network} score model, {n_params:,} parameters, "
             f"{run.n_train} training images of {run.bundle.num_classes} classes, "
             f"{t.steps} steps, device {run.device}")

        # ---- the loop: steps, a record every log_every, the state every save_every
        order_cache: dict[int, Tensor] = {}
        last: dict[str, Any] = {}
        run.model.train()
        with StopFlag() as stop, ProgressBar("score", t.steps, enabled=progress) as bar:
            bar.update(completed=start)
            tick = time.perf_counter()
            for step in range(start, t.steps):
                sums.add(_step(run, step, order_cache))
                now = time.perf_counter()
                sums.seconds += now - tick
                tick = now
                done = step + 1
                if done % t.log_every == 0 or done == t.steps:
                    record = ScoreTrainRecord(step=done, steps=t.steps, loss=sums.mean_loss(),
                                              lr=lr_at(t, step), seconds=sums.seconds)
                    append_record(run_dir, record)
                    last = record.to_json()
                    sums.restart_loss()
                    emit(f"step {done}/{t.steps}  loss {last['loss']:.4f}  "
                         f"{sums.seconds:.1f}s")
                bar.update(completed=done, info=f"loss {last.get('loss', float('nan')):.4f}")
                if on_step is not None:
                    on_step(step)
                if done < t.steps and (stop.requested or done % t.save_every == 0):
                    _save(folder, run, done, sums, weights=not stop.requested)
                    tick = time.perf_counter()
                    if stop.requested:
                        return ScoreTrainResult(run_dir, done, True, last)

        # ---- the end: final weights, samples
        samples_path = _finish(run, folder, sums, emit)
    return ScoreTrainResult(run_dir, t.steps, False, last, samples_path)


# ---------------------------------------------------------------------------------------
# the loop's phases, in the order they run


@dataclass(frozen=True)
class _Run:
    """What the loop's phases read, built once (`_build`): the spec, the device, the data
    (``n_train`` training images), the network config, the model and its EMA copy (None
    without ``train.ema``) with their parameters, Adam, and the generator every draw comes
    from (state that the steps advance)."""

    spec: ScoreSpec
    device: torch.device
    bundle: DataBundle
    n_train: int
    config: ScoreModelConfig
    model: ScoreModel
    ema: ScoreModel | None
    params: Sequence[Tensor]
    ema_params: Sequence[Tensor]
    opt: torch.optim.Optimizer
    gen: torch.Generator

    @property
    def sampler(self) -> ScoreModel:
        """The model that samples and is saved: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.model


def _build(spec: ScoreSpec, device: str) -> _Run:
    """Data (an empty training set refused), the model initialised from ``train.seed``
    (without drawing from the global RNG), its EMA copy, Adam, the training generator."""
    import torch

    from pagctl.build import resolve_device
    from pagctl.data import load_data

    dev = resolve_device(device)
    t = spec.train
    bundle = load_data(spec.data)
    n_train = len(bundle.train)  # type: ignore[arg-type]
    if n_train == 0:
        raise SpecError("data: the training set is empty")
    config = model_config_for(spec, bundle)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model = ScoreModel(config).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False) if t.ema is not None else None
    params = list(model.parameters())
    ema_params = list(ema.parameters()) if ema is not None else []
    opt = torch.optim.Adam(params, lr=t.lr, foreach=True)
    gen = torch.Generator().manual_seed(t.seed)
    return _Run(spec, dev, bundle, n_train, config, model, ema, params, ema_params, opt, gen)


@dataclass
class _Sums:
    """The running sums: the loss summed over the steps since the last record and their
    count (restarted at each record), and the seconds of every step so far. Floats, saved
    in state.json as ``{"loss", "count", "seconds"}`` (`as_dict`), so a resumed run
    continues them exactly."""

    loss: float = 0.0
    count: float = 0.0
    seconds: float = 0.0

    def add(self, loss: Tensor) -> None:
        """Count one step's loss (a scalar) in."""
        self.loss += float(loss.detach())
        self.count += 1

    def mean_loss(self) -> float:
        """The mean loss of the steps since the last record."""
        return self.loss / max(1.0, self.count)

    def restart_loss(self) -> None:
        """After a record: the loss and its count from zero, the seconds kept."""
        self.loss, self.count = 0.0, 0.0

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "count": self.count, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, flat: Mapping[str, Any]) -> _Sums:
        return cls(float(flat["loss"]), float(flat["count"]), float(flat["seconds"]))


def _start(run: _Run, folder: RunFolder) -> tuple[int, _Sums]:
    """Start fresh (the folder begun), or restore the saved model, EMA, Adam and generator
    states and drop the records written after them. Returns the 0-based step to start at
    and the running sums so far."""
    saved = folder.start()
    if saved is None:
        return 0, _Sums()
    run.model.load_state_dict(saved.module_state("model"))
    if run.ema is not None:
        run.ema.load_state_dict(saved.module_state("ema"))
    saved.restore_optimizer(run.opt, run.device)
    run.gen.set_state(saved.tensors["rng.train"])
    start, sums = int(saved.counters["step"]), _Sums.from_dict(saved.counters["sums"])
    folder.trim_metrics(lambda r: _before(r, start))
    return start, sums


def _step(run: _Run, step: int, order_cache: dict[int, Tensor]) -> Tensor:
    """One optimiser step at 0-based ``step``: its batch (`_batch_order`), flipped at
    random (``train.hflip``, from the generator), the learning rate, the loss (`dsm_loss`;
    bfloat16 autocast with ``train.amp`` on a GPU), a non-finite loss refused
    (ModelError), the backward, clipping, Adam and the EMA. Returns the loss (a scalar)."""
    import torch

    from pagctl.data import get_batch

    t, dev = run.spec.train, run.device
    idx = _batch_order(run.n_train, t.batch_size, t.seed, step, order_cache)
    x, y = get_batch(run.bundle.train, idx)
    if t.hflip:
        flips = torch.rand(x.shape[0], generator=run.gen) < 0.5
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(t, step)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                        enabled=t.amp and dev.type == "cuda"):
        loss = dsm_loss(run.model, x, y, run.gen, t)
    if not torch.isfinite(loss):
        raise ModelError(f"score training: the loss became {loss.item()} at step "
                         f"{step + 1}; lower train.lr")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    if t.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.params, t.grad_clip, foreach=True)
    run.opt.step()
    if run.ema is not None:
        _ema_update(run.ema_params, run.params, min(t.ema or 0.0, (1 + step) / (10 + step)))
    return loss


def _save(folder: RunFolder, run: _Run, step: int, sums: _Sums, *, weights: bool) -> None:
    """The state to resume at 0-based ``step`` (model, EMA, Adam, generator, counters)
    and, with ``weights``, the sampling model as model.safetensors (not after a Ctrl-C:
    an interrupted run's weights are its last save's)."""
    modules: dict[str, torch.nn.Module] = {"model": run.model}
    if run.ema is not None:
        modules["ema"] = run.ema
    folder.save_state(modules, run.opt, {"train": run.gen.get_state()},
                      {"step": step, "sums": sums.as_dict()})
    if weights:
        save_score_model(folder.path, run.sampler,
                         run.config.model_copy(update={"trained_steps": step}))


def _finish(run: _Run, folder: RunFolder, sums: _Sums, log: Callable[[str], None]
            ) -> Path | None:
    """After the last step: the final state and weights, samples.png (None without
    ``sample.per_class``, or when matplotlib is missing) and the closing record."""
    spec = run.spec
    _save(folder, run, spec.train.steps, sums, weights=True)
    samples_path = None
    tick = time.perf_counter()
    if spec.sample.per_class > 0:
        samples_path = write_samples_figure(folder.path, run.sampler, run.bundle, spec,
                                            log=log)
    append_record(folder.path, ScoreDoneRecord(steps=spec.train.steps,
                                               train_seconds=sums.seconds,
                                               sample_seconds=time.perf_counter() - tick))
    return samples_path
