"""Class-conditional score models: the network, the sampler, and loading a trained run.

A score model estimates ∇ log p(x_σ | t) of the data after adding Gaussian noise of
standard deviation σ, for every class t and, through one extra "null" class (index
``num_classes``), for the unconditional density ∇ log p(x_σ). One network serves both, as in
classifier-free guidance: training replaces the label by the null class for a share of the
examples (`pagctl.score.train`).

Parameterisation (Karras et al., 2022, "EDM" preconditioning, written for noise prediction).
With x̃ = x_σ − c (c: per-channel data centre, e.g. the dataset's pixel mean),
σ_d the data's pixel standard deviation and c_in = 1/√(σ² + σ_d²), the raw network F sees
c_in·x̃, the noise level as log(σ)/4 and the class, and the model returns

    ε̂(x_σ, σ, t) = σ·c_in²·x̃ − σ_d·c_in·F(c_in·x̃, log(σ)/4, t),

which is exactly (x̃ − D)/σ for EDM's denoiser D = c_skip·x̃ + c_out·F. Inputs and training
targets of F have unit variance at every σ, so all noise levels train well. The score is
s(x_σ, σ, t) = −ε̂/σ; the denoised estimate (Tweedie) is x_σ − σ·ε̂.

Networks: a small U-Net for images (GroupNorm, SiLU, residual blocks, one resolution level
per ``channel_mult`` entry) and a residual MLP for tiny inputs such as the 2-D toy points
(``(2, 1, 1)``). In both, the noise level (sinusoidal features of log σ, then an MLP) and the
class (an embedding with ``num_classes + 1`` rows, the last one the null class) are summed
into one embedding that every block adds to its features (the blocks: `pagctl.score.nets`).

A run folder (``pagctl train-score``) holds ``model.safetensors`` (the weights; the EMA
weights when EMA is enabled) and ``config.json`` (`ScoreModelConfig`: enough to rebuild the
network without the spec); `load_score_run` reads it back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, ValidationError, model_validator
from torch import Tensor, nn

from pagctl.errors import CheckpointError
from pagctl.score.nets import NoiseEmbedding, ScoreMLP, ScoreUNet
from pagctl.spec import FrozenModel

if TYPE_CHECKING:
    from pagctl.score.spec import ScoreSpec

__all__ = [
    "ScoreModel",
    "ScoreModelConfig",
    "ScoreRun",
    "load_score_run",
    "sample",
    "save_score_model",
    "sigma_schedule",
]

CONFIG_KIND = "score_model"


class ScoreModelConfig(FrozenModel):
    """Everything needed to rebuild a score network (``config.json`` of a score run)."""

    kind: Literal["score_model"] = "score_model"
    format: Literal[1] = 1
    network: Literal["unet", "mlp"]
    num_classes: int = Field(ge=1)
    input_shape: tuple[int, int, int]
    width: int = Field(ge=1, description="base channels (unet) or hidden units (mlp)")
    channel_mult: tuple[int, ...] = Field(default=(1, 2), min_length=1,
                                          description="unet: channels per level = width * mult")
    blocks: int = Field(default=2, ge=1,
                        description="residual blocks per level (unet) or layers (mlp)")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    center: tuple[float, ...] = Field(description="per-channel centre c subtracted from x")
    sigma_data: float = Field(gt=0, description="σ_d of the preconditioning")
    sigma_min: float = Field(gt=0, description="lowest noise level trained")
    sigma_max: float = Field(gt=0, description="highest noise level trained")
    trained_steps: int = Field(default=0, ge=0)
    ema: bool = Field(default=False, description="the saved weights are the EMA weights")

    @model_validator(mode="after")
    def _consistent(self) -> ScoreModelConfig:
        if len(self.center) != self.input_shape[0]:
            raise ValueError(f"center has {len(self.center)} entries for "
                             f"{self.input_shape[0]} channels")
        if self.sigma_max <= self.sigma_min:
            raise ValueError("sigma_max must exceed sigma_min")
        if self.network == "unet":
            down = 2 ** (len(self.channel_mult) - 1)
            h, w = self.input_shape[1:]
            if h % down or w % down:
                raise ValueError(f"a U-Net with {len(self.channel_mult)} levels needs height "
                                 f"and width divisible by {down}, got {h}x{w}; use fewer "
                                 "channel_mult entries or kind mlp")
        return self


# ---------------------------------------------------------------------------------------
# the preconditioned model


class ScoreModel(nn.Module):
    """ε̂(x_σ, σ, t) with EDM preconditioning around a class-conditional network.

    ``null_class`` (= ``num_classes``) selects the unconditional score. Inputs are noisy
    pixels x_σ = x + σ·ε with x in [0, 1] (no normalisation needed: centring and scaling are
    part of the model). Shape: x (N, C, H, W), sigma a float or (N,), classes (N,) int64
    in [0, num_classes] or None (all null) -> (N, C, H, W).
    """

    center: Tensor

    def __init__(self, config: ScoreModelConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.null_class = config.num_classes
        self.input_shape = config.input_shape
        self.sigma_data = config.sigma_data
        self.sigma_min, self.sigma_max = config.sigma_min, config.sigma_max
        c = config.input_shape[0]
        emb_dim = max(64, min(4 * config.width, 512)) if config.network == "unet" \
            else config.width
        self.noise_emb = NoiseEmbedding(emb_dim)
        self.class_emb = nn.Embedding(config.num_classes + 1, emb_dim)
        self.net: nn.Module
        if config.network == "unet":
            self.net = ScoreUNet(c, config.width, config.channel_mult, config.blocks, emb_dim,
                             config.dropout)
        else:
            dim = c * config.input_shape[1] * config.input_shape[2]
            self.net = ScoreMLP(dim, config.width, config.blocks, emb_dim, config.dropout)
        self.register_buffer("center", torch.tensor(config.center).view(1, -1, 1, 1),
                             persistent=False)

    def _sigma(self, sigma: float | Tensor, x: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return s.expand(x.shape[0]) if s.dim() == 0 else s.reshape(x.shape[0])

    def _classes(self, classes: Tensor | None, x: Tensor) -> Tensor:
        if classes is None:
            return torch.full((x.shape[0],), self.null_class, dtype=torch.int64,
                              device=x.device)
        return classes.to(device=x.device, dtype=torch.int64).reshape(x.shape[0])

    def forward(self, x: Tensor, sigma: float | Tensor, classes: Tensor | None) -> Tensor:
        s = self._sigma(sigma, x)
        y = self._classes(classes, x)
        sv = s.view(-1, 1, 1, 1)
        xt = x - self.center
        c_in = (sv.square() + self.sigma_data**2).rsqrt()
        emb = self.noise_emb(s.log() / 4) + self.class_emb(y)
        out = self.net(xt * c_in, emb)
        eps: Tensor = sv * c_in.square() * xt - self.sigma_data * c_in * out
        return eps

    def score(self, x: Tensor, sigma: float | Tensor, classes: Tensor | None) -> Tensor:
        """∇ log p(x_σ | t) (classes None or the null class: ∇ log p(x_σ)) = −ε̂/σ."""
        eps: Tensor = self(x, sigma, classes)
        return -eps / self._sigma(sigma, x).view(-1, 1, 1, 1)

    def denoise(self, x: Tensor, sigma: float | Tensor, classes: Tensor | None) -> Tensor:
        """E[x | x_σ, t] (Tweedie): x_σ − σ·ε̂."""
        eps: Tensor = self(x, sigma, classes)
        return x - self._sigma(sigma, x).view(-1, 1, 1, 1) * eps


# ---------------------------------------------------------------------------------------
# sampling


def sigma_schedule(sigma_max: float, sigma_min: float, steps: int) -> Tensor:
    """``steps`` noise levels, geometric from sigma_max down to sigma_min (float64)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64)
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps,
                                    dtype=torch.float64))


def sample(model: ScoreModel, classes: Tensor, *, steps: int, generator: torch.Generator,
           guidance: float = 0.0, batch_size: int = 512) -> Tensor:
    """Draw one image per entry of ``classes`` with the deterministic probability-flow ODE.

    Heun's method (Karras et al., 2022, Algorithm 1) over ``steps`` geometric noise levels
    from the model's sigma_max to its sigma_min, then one last Euler step to σ = 0 (the
    denoised estimate). The start x = c + sigma_max·z, z ~ N(0, I) from ``generator`` (a CPU
    generator; the global RNG is never used). ``guidance`` w > 0 uses
    ε̂ = ε̂(∅) + (1 + w)(ε̂(t) − ε̂(∅)) (classifier-free guidance; 0 = the plain conditional
    model). The model is used as is (put it in eval mode first).

    Shape: classes (N,) int64 in [0, num_classes] (num_classes: unconditional) ->
    (N, C, H, W) float32 in [0, 1] on the model's device.
    """
    param = next(model.parameters())
    device = param.device
    classes = classes.reshape(-1).to(torch.int64)
    if classes.numel() and bool(((classes < 0) | (classes > model.null_class)).any()):
        raise ValueError(f"classes must lie in [0, {model.null_class}]")
    sigmas = sigma_schedule(model.sigma_max, model.sigma_min, steps).tolist() + [0.0]
    z = torch.randn((classes.shape[0], *model.input_shape), generator=generator,
                    dtype=torch.float32)
    out = []
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        for start in range(0, classes.shape[0], batch_size):
            y = classes[start: start + batch_size].to(device)
            x = model.center + model.sigma_max * z[start: start + batch_size].to(device)

            def eps(x: Tensor, s: float, y: Tensor = y) -> Tensor:
                if guidance == 0.0:
                    return model(x, s, y)  # type: ignore[no-any-return]
                both = model(torch.cat([x, x]), s, torch.cat([y, torch.full_like(
                    y, model.null_class)]))
                cond, uncond = both.chunk(2)
                return uncond + (1.0 + guidance) * (cond - uncond)  # type: ignore[no-any-return]

            for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
                d = eps(x, s)  # dx/dσ of the probability-flow ODE
                x_next = x + (s_next - s) * d
                if s_next > 0:
                    x_next = x + (s_next - s) * 0.5 * (d + eps(x_next, s_next))
                x = x_next
            out.append(x.clamp(0.0, 1.0))
    if not out:
        return torch.empty((0, *model.input_shape), device=device)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------
# the run folder's weights: saving and loading


def save_score_model(run_dir: Path, model: ScoreModel, config: ScoreModelConfig) -> None:
    """model.safetensors + config.json of a score run (atomic writes)."""
    from pagctl.checkpoint import save_weights

    save_weights(run_dir, dict(model.state_dict()), config.model_dump_json(indent=2) + "\n",
                 {"kind": CONFIG_KIND, "network": config.network})


@dataclass
class ScoreRun:
    """A trained score model (eval mode, parameters frozen) with its config and spec
    (``spec`` is None when the folder has no spec.json)."""

    run_dir: Path
    config: ScoreModelConfig
    spec: ScoreSpec | None
    model: ScoreModel


def build_score_model(config: ScoreModelConfig) -> ScoreModel:
    """A freshly initialised network; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return ScoreModel(config)


def read_config(path: Path) -> ScoreModelConfig:
    """config.json of a score run; CheckpointError (one line) when missing or invalid."""
    from pagctl.spec import format_validation_error

    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing; is this a score run folder "
                              "(pagctl train-score)?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({str(exc).splitlines()[0]}); restore "
                              "config.json or re-run training") from None
    if not isinstance(data, dict) or data.get("kind") != CONFIG_KIND:
        kind = data.get("kind", data.get("architecture")) if isinstance(data, dict) else None
        raise CheckpointError(f"{path}: not a score model (kind {kind!r}); pass a run folder "
                              "made by 'pagctl train-score'")
    try:
        return ScoreModelConfig.model_validate(data)
    except ValidationError as exc:
        first = format_validation_error(exc).splitlines()[0]
        raise CheckpointError(f"{path}: invalid score model config ({first}); restore "
                              "config.json or re-run training") from None


def load_score_run(run_dir: Path | str, device: str | torch.device = "cpu") -> ScoreRun:
    """Rebuild a score run's model from config.json + model.safetensors.

    The model is in eval mode with ``requires_grad`` off; the global RNG is left as it was.
    Raises CheckpointError (one line) for a missing folder or file, an invalid config or
    spec, or weights that are truncated or do not fit the config.
    """
    from pagctl.checkpoint import (
        CONFIG_FILE,
        MODEL_FILE,
        SPEC_FILE,
        load_error_detail,
        load_tensors,
        read_run_spec,
    )
    from pagctl.score.spec import ScoreSpec

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such score run folder; train one with "
                              "'pagctl train-score'")
    config = read_config(run_dir / CONFIG_FILE)
    spec = read_run_spec(run_dir, ScoreSpec, what="score spec") \
        if (run_dir / SPEC_FILE).is_file() else None
    if not (run_dir / MODEL_FILE).is_file():
        raise CheckpointError(f"{run_dir}: no {MODEL_FILE} (training has not saved weights "
                              "yet); train or resume it first")
    state = load_tensors(run_dir / MODEL_FILE)
    model = build_score_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{run_dir / MODEL_FILE}: weights do not match config.json "
            f"({load_error_detail(exc)}); the files come from different runs; restore them "
            "or re-run training") from None
    model.to(device).eval().requires_grad_(False)
    return ScoreRun(run_dir, config, spec, model)

