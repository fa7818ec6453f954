"""Training class-conditional score models by denoising score matching.

The score model (`pagctl.score_model`) supplies the Score-Based Gradients target source
(``sbg``): g(x, t) = s(x_σ, σ, t) − s(x_σ, σ, ∅), which by Bayes' rule is
∇ log p(t | x_σ). This module holds its spec (`ScoreSpec`, built-ins in
``pagctl/specs/score/``), the training loop (`train_score`) and the samples figure.

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
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pagctl import checkpoint
from pagctl.errors import SpecError
from pagctl.score_model import (
    ScoreModel,
    ScoreModelConfig,
    ScoreRun,
    load_score_run,
    sample,
)
from pagctl.spec import DataSpec, apply_override, format_validation_error, read_spec_mapping

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from pagctl.data import DataBundle

__all__ = [
    "SAMPLES_FILE",
    "ScoreModel",
    "ScoreModelConfig",
    "ScoreRun",
    "ScoreSpec",
    "ScoreTrainResult",
    "builtin_score_spec_names",
    "load_score_run",
    "load_score_spec",
    "model_config_for",
    "sample",
    "train_score",
    "validate_score_spec",
]

SAMPLES_FILE = "samples.png"
RUN_FILES = (*checkpoint.RUN_FILES, SAMPLES_FILE)
SPEC_FOLDER = ("specs", "score")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScoreNetSpec(_Frozen):
    kind: Literal["auto", "unet", "mlp"] = Field(
        default="auto", description="network: unet (images), mlp (flattened input); auto = "
        "mlp for 1x1 inputs such as the toy points, unet otherwise")
    width: int = Field(default=64, ge=4, description="base channels (unet) or hidden units "
                       "(mlp)")
    channel_mult: tuple[int, ...] = Field(
        default=(1, 2), min_length=1, description="unet: one resolution level per entry, "
        "with width * mult channels (height and width must divide by 2^(levels-1))")
    blocks: int = Field(default=2, ge=1, description="residual blocks per level (unet) or "
                        "residual layers (mlp)")
    dropout: float = Field(default=0.0, ge=0, lt=1)

    def resolved_kind(self, input_shape: tuple[int, int, int]) -> Literal["unet", "mlp"]:
        if self.kind != "auto":
            return self.kind
        return "mlp" if input_shape[1:] == (1, 1) else "unet"


class ScoreTrainSpec(_Frozen):
    steps: int = Field(default=4000, ge=1, description="optimiser steps")
    batch_size: int = Field(default=128, ge=1, description="images per step (data.batch_size "
                            "is not used by score training)")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate")
    warmup_steps: int = Field(default=100, ge=0, description="linear learning-rate warm-up")
    schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="after warm-up: constant, or cosine down to 0")
    grad_clip: float | None = Field(default=1.0, gt=0, description="clip the gradient norm "
                                    "(null: no clipping)")
    sigma_min: float = Field(default=0.01, gt=0, description="lowest training noise level")
    sigma_max: float = Field(default=1.0, gt=0, description="highest training noise level "
                             "(also where sampling starts)")
    null_prob: float = Field(default=0.1, ge=0, lt=1, description="share of examples trained "
                             "with the null class (the unconditional score)")
    seed: int = Field(default=0, description="seeds initialisation, batch order, sigma, "
                      "noise, null mask, flips and the samples")
    ema: float | None = Field(default=0.999, gt=0, lt=1, description="EMA decay of the "
                              "weights (warmed up as min(decay, (1+t)/(10+t))); null: no EMA")
    hflip: bool = Field(default=False, description="random horizontal flips (natural images; "
                        "not digits or the toy)")
    amp: bool = Field(default=False, description="bfloat16 autocast (CUDA only)")
    log_every: int = Field(default=100, ge=1, description="steps per metrics.jsonl record")
    save_every: int = Field(default=1000, ge=1, description="steps between saves of "
                            "state.safetensors and model.safetensors")

    @model_validator(mode="after")
    def _sigma_range(self) -> ScoreTrainSpec:
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min "
                             f"({self.sigma_min})")
        return self


class ScoreSampleSpec(_Frozen):
    steps: int = Field(default=32, ge=1, description="noise levels of the Heun sampler "
                       "(2 * steps - 1 network calls)")
    per_class: int = Field(default=10, ge=0, description="samples per class in samples.png "
                           "(0: no figure)")
    guidance: float = Field(default=0.0, ge=0, description="classifier-free guidance weight "
                            "w for samples.png (0: the plain conditional model)")


class ScoreSpec(_Frozen):
    """A score-model training run. Field names are the keys of the spec file and --set."""

    version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name")
    description: str = ""
    data: DataSpec
    model: ScoreNetSpec = Field(default_factory=ScoreNetSpec)
    train: ScoreTrainSpec = Field(default_factory=ScoreTrainSpec)
    sample: ScoreSampleSpec = Field(default_factory=ScoreSampleSpec)
    out_dir: Path | None = Field(default=None, description="run folder; null = runs/<name>")

    @model_validator(mode="after")
    def _unused_data_fields(self) -> ScoreSpec:
        if self.data.augment != "none":
            raise ValueError("data.augment: score training does not crop; use "
                             "train.hflip for flips and leave data.augment at none")
        return self

    @property
    def run_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else Path("runs") / self.name


# ---------------------------------------------------------------------------------------
# loading specs


def _spec_folder() -> Any:
    folder = resources.files("pagctl")
    for part in SPEC_FOLDER:
        folder = folder / part
    return folder


def builtin_score_spec_names() -> list[str]:
    """Names of the score specs shipped in ``pagctl/specs/score``."""
    return sorted(p.name[: -len(".yaml")] for p in _spec_folder().iterdir()
                  if p.name.endswith(".yaml"))


def _read_score_mapping(source: str) -> dict[str, Any]:
    data, _ = read_spec_mapping(source, names=builtin_score_spec_names(),
                                folder=_spec_folder(), kind="score spec",
                                listing="pagctl train-score --list",
                                sections="data, model, train, sample")
    return data


def validate_score_spec(data: dict[str, Any]) -> ScoreSpec:
    """Validate a mapping; SpecError with one ``dotted.path: message`` line per problem."""
    try:
        return ScoreSpec.model_validate(data)
    except ValidationError as exc:
        text = format_validation_error(exc).replace("pagctl train --schema",
                                                    "pagctl train-score --schema")
        # the data.augment check is a model-level validator: its message names the field
        text = text.replace("spec: data.augment:", "data.augment:")
        raise SpecError(text) from None


def load_score_spec(source: str | Path,
                    overrides: list[str] | tuple[str, ...] = ()) -> ScoreSpec:
    """Read a score spec file (or built-in name), apply ``a.b=c`` overrides (values parsed
    as YAML), validate once."""
    data = _read_score_mapping(str(source))
    for item in overrides:
        apply_override(data, item)
    return validate_score_spec(data)


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


class _Progress:
    """One rich bar over the training steps, with ETA and the running loss (stderr)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from pagctl.progress import stderr_console

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=stderr_console, disable=not enabled,
            transient=False)
        self._task = self._progress.add_task("score", total=total, info="")

    def __enter__(self) -> _Progress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, completed: int, info: str = "", description: str = "score") -> None:
        self._progress.update(self._task, completed=completed, info=info,
                              description=description)


def _truncate_metrics(run_dir: Path, keep_step: int) -> None:
    """Drop training records after ``keep_step`` (a resumed run writes them again)."""
    path = run_dir / checkpoint.METRICS_FILE
    if not path.is_file():
        return
    out = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "score_train" \
                and int(rec.get("step", 0)) > keep_step:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "score_done":
            continue
        out.append(line)
    checkpoint.atomic_write_text(path, "".join(out))


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
    """
    import torch

    from pagctl.build import resolve_device
    from pagctl.data import get_batch, load_data
    from pagctl.train import _StopFlag

    run_dir = spec.run_dir
    checkpoint.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        saved = _read_run_spec(run_dir)
        no_dir = {"out_dir": None}
        if saved.model_copy(update=no_dir) != spec.model_copy(update=no_dir):
            raise SpecError(f"--resume: the spec differs from {run_dir}/spec.json; resume "
                            f"with 'pagctl train-score {run_dir / 'spec.json'} --out "
                            f"{run_dir} --resume' or use --overwrite")
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
    ema_decay = t.ema or 0.0
    params = list(model.parameters())
    ema_params = list(ema.parameters()) if ema is not None else []
    opt = torch.optim.Adam(params, lr=t.lr, foreach=True)
    gen = torch.Generator().manual_seed(t.seed)
    start, sums = 0, {"loss": 0.0, "count": 0.0, "seconds": 0.0}
    if resume:
        tensors, meta = checkpoint.load_state(run_dir)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        checkpoint.optimizer_from_flat(opt, {k: v.to(dev) for k, v in tensors.items()},
                                       meta["optimizer"])
        gen.set_state(tensors["rng.train"])
        start, sums = int(meta["step"]), dict(meta["sums"])
        _truncate_metrics(run_dir, start)
    else:
        if overwrite and run_dir.is_dir():
            (run_dir / SAMPLES_FILE).unlink(missing_ok=True)
        checkpoint.create_run_dir(run_dir, overwrite=overwrite)
        checkpoint.atomic_write_text(run_dir / checkpoint.SPEC_FILE,
                                     spec.model_dump_json(indent=2) + "\n")
    emit = log or (lambda msg: None)
    n_params = sum(p.numel() for p in model.parameters())
    emit(f"{spec.name}: {config.network} score model, {n_params:,} parameters, "
         f"{n_train} training images of {bundle.num_classes} classes, {t.steps} steps, "
         f"device {dev}")

    def save(step: int, *, weights: bool) -> None:
        extra = {f"ema.{k}": v for k, v in ema.state_dict().items()} if ema is not None else {}
        _save_state(run_dir, model, extra, opt, gen, {"step": step, "sums": sums,
                                                      "spec_hash": _spec_hash(spec)})
        if weights:
            save_model(run_dir, ema if ema is not None else model,
                       config.model_copy(update={"trained_steps": step}))

    amp = t.amp and dev.type == "cuda"
    order_cache: dict[int, Tensor] = {}
    last: dict[str, Any] = {}
    model.train()
    step = start
    with _StopFlag() as stop, _Progress(t.steps, enabled=progress) as bar:
        bar.update(start)
        tick = time.perf_counter()
        for step in range(start, t.steps):
            idx = _batch_order(n_train, t.batch_size, t.seed, step, order_cache)
            x, y = get_batch(bundle.train, idx)
            if t.hflip:
                flips = torch.rand(x.shape[0], generator=gen) < 0.5
                x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(t, step)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                loss = dsm_loss(model, x, y, gen, t)
            if not torch.isfinite(loss):
                raise RuntimeError(f"score training: the loss became {loss.item()} at step "
                                   f"{step + 1}; lower train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if t.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip, foreach=True)
            opt.step()
            if ema is not None:
                _ema_update(ema_params, params, min(ema_decay, (1 + step) / (10 + step)))
            sums["loss"] += float(loss.detach())
            sums["count"] += 1
            now = time.perf_counter()
            sums["seconds"] += now - tick
            tick = now
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                last = {"kind": "score_train", "step": done, "steps": t.steps,
                        "loss": sums["loss"] / max(1.0, sums["count"]), "lr": lr_at(t, step),
                        "seconds": sums["seconds"]}
                checkpoint.append_metrics(run_dir, last)
                sums["loss"], sums["count"] = 0.0, 0.0
                emit(f"step {done}/{t.steps}  loss {last['loss']:.4f}  "
                     f"{sums['seconds']:.1f}s")
            bar.update(done, f"loss {last.get('loss', float('nan')):.4f}")
            if on_step is not None:
                on_step(step)
            if done < t.steps and (stop.requested or done % t.save_every == 0):
                save(done, weights=not stop.requested)
                tick = time.perf_counter()
                if stop.requested:
                    return ScoreTrainResult(run_dir, done, True, last)
    save(t.steps, weights=True)
    samples_path = None
    tick = time.perf_counter()
    if spec.sample.per_class > 0:
        samples_path = write_samples_figure(run_dir, ema if ema is not None else model,
                                            bundle, spec, log=emit)
    checkpoint.append_metrics(run_dir, {"kind": "score_done", "steps": t.steps,
                                        "train_seconds": sums["seconds"],
                                        "sample_seconds": time.perf_counter() - tick})
    return ScoreTrainResult(run_dir, t.steps, False, last, samples_path)


def _spec_hash(spec: ScoreSpec) -> str:
    import hashlib

    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def _read_run_spec(run_dir: Path) -> ScoreSpec:
    from pagctl.errors import CheckpointError

    path = run_dir / checkpoint.SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {checkpoint.SPEC_FILE}; not a score run folder")
    try:
        return ScoreSpec.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        first = format_validation_error(exc).splitlines()[0]
        raise CheckpointError(f"{path}: invalid score spec ({first})") from None


def _save_state(run_dir: Path, model: ScoreModel, extra: dict[str, Tensor],
                opt: torch.optim.Optimizer, gen: torch.Generator, meta: dict[str, Any]) -> None:
    """state.safetensors: model, EMA, Adam tensors and the generator, with the counters in
    its metadata (so tensors and counters always come from one save); state.json a copy."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(extra)
    opt_tensors, opt_meta = checkpoint.optimizer_to_flat(opt)
    tensors.update(opt_tensors)
    tensors["rng.train"] = gen.get_state()
    full = json.dumps({**meta, "optimizer": opt_meta}, indent=2)
    checkpoint.atomic_save_tensors(tensors, run_dir / checkpoint.STATE_FILE,
                                   {"pagctl_state": full})
    checkpoint.atomic_write_text(run_dir / checkpoint.STATE_META_FILE, full + "\n")


def save_model(run_dir: Path, model: ScoreModel, config: ScoreModelConfig) -> None:
    """model.safetensors + config.json (atomic writes)."""
    import torch

    from pagctl import __version__

    meta = {"format": "pt", "pagctl_version": __version__, "torch_version": torch.__version__,
            "kind": "score_model", "network": config.network}
    checkpoint.atomic_save_tensors(dict(model.state_dict()), run_dir / checkpoint.MODEL_FILE,
                                   meta)
    checkpoint.atomic_write_text(run_dir / checkpoint.CONFIG_FILE,
                                 config.model_dump_json(indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# the samples figure


def write_samples_figure(run_dir: Path, model: ScoreModel, bundle: DataBundle,
                         spec: ScoreSpec, *, log: Callable[[str], None] | None = None
                         ) -> Path | None:
    """Sample ``spec.sample.per_class`` images of every class and write samples.png: one row
    per class, or, for 2-D points, a scatter of the samples coloured by class over the
    training data. Returns the path, or None when matplotlib is missing."""
    import torch

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if log is not None:
            log(f"{SAMPLES_FILE} skipped: matplotlib is missing (pip install 'pagctl[plots]')")
        return None
    per = spec.sample.per_class
    k = bundle.num_classes
    classes = torch.arange(k).repeat_interleave(per)
    was_training = model.training
    model.eval()
    try:
        images = sample(model, classes, steps=spec.sample.steps,
                        generator=torch.Generator().manual_seed(spec.train.seed + 1),
                        guidance=spec.sample.guidance).cpu()
    finally:
        model.train(was_training)
    path = run_dir / SAMPLES_FILE
    title = f"{spec.name}: {per} samples per class ({spec.sample.steps} Heun steps" + (
        f", guidance {spec.sample.guidance:g})" if spec.sample.guidance else ")")
    if bundle.input_shape == (2, 1, 1):
        from pagctl.data import as_tensors

        data, labels = as_tensors(bundle.train)
        points_figure(path, data.reshape(-1, 2), labels, images.reshape(-1, 2), classes,
                      title=title)
    else:
        image_grid_figure(path, images.reshape(k, per, *bundle.input_shape),
                          list(bundle.class_names), title=title)
    return path


def image_grid_figure(path: Path, images: Tensor, row_names: list[str], *, title: str) -> None:
    """One row per class. Shape: images (rows, per_row, C, H, W) in [0, 1]."""
    from pagctl.figures import _pyplot, _save, _show

    plt = _pyplot("samples.png")
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(0.7 * cols + 0.6, 0.7 * rows + 0.4),
                             squeeze=False)
    for r in range(rows):
        for c in range(cols):
            _show(axes[r][c], images[r, c])
        axes[r][0].set_ylabel(row_names[r] if r < len(row_names) else str(r), fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


def points_figure(path: Path, data: Tensor, labels: Tensor, points: Tensor, classes: Tensor,
                  *, title: str) -> None:
    """Samples (coloured by class) over the training data (light). Shape: (N, 2), (N,),
    (M, 2), (M,)."""
    from pagctl.figures import _pyplot, _save

    plt = _pyplot("samples.png")
    fig, ax = plt.subplots(figsize=(5, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for cls in sorted(set(labels.tolist()) | set(classes.tolist())):
        colour = colours[cls % len(colours)]
        d = data[labels == cls]
        ax.scatter(d[:, 0], d[:, 1], s=4, alpha=0.15, color=colour)
        p = points[classes == cls]
        ax.scatter(p[:, 0], p[:, 1], s=14, color=colour, edgecolors="black", linewidths=0.4,
                   label=f"samples of class {cls}")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)
