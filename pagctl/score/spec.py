"""Score-model training specs: `ScoreSpec` and its sections, and how they are loaded.

Built-in specs live in ``pagctl/specs/score/``; `load_score_spec` reads a file or a built-in
name, applies ``a.b=c`` overrides and validates once. The training loop that runs them is
`pagctl.score.train.train_score`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pagctl.errors import SpecError
from pagctl.spec import (
    DataSpec,
    FrozenModel,
    RunFolderPath,
    Seed,
    apply_override,
    format_validation_error,
    read_spec_mapping,
    set_value,
)

__all__ = [
    "ScoreNetSpec",
    "ScoreSampleSpec",
    "ScoreSpec",
    "ScoreTrainSpec",
    "builtin_score_spec_names",
    "load_score_spec",
    "validate_score_spec",
]

SPEC_FOLDER = ("specs", "score")


class ScoreNetSpec(FrozenModel):
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


class ScoreTrainSpec(FrozenModel):
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
    seed: Seed = Field(default=0, description="seeds initialisation, batch order, sigma, "
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


class ScoreSampleSpec(FrozenModel):
    steps: int = Field(default=32, ge=1, description="noise levels of the Heun sampler "
                       "(2 * steps - 1 network calls)")
    per_class: int = Field(default=10, ge=0, description="samples per class in samples.png "
                           "(0: no figure)")
    guidance: float = Field(default=0.0, ge=0, description="classifier-free guidance weight "
                            "w for samples.png (0: the plain conditional model)")


class ScoreSpec(FrozenModel):
    """A score-model training run. Field names are the keys of the spec file and --set."""

    version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name")
    description: str = ""
    data: DataSpec
    model: ScoreNetSpec = Field(default_factory=ScoreNetSpec)
    train: ScoreTrainSpec = Field(default_factory=ScoreTrainSpec)
    sample: ScoreSampleSpec = Field(default_factory=ScoreSampleSpec)
    out_dir: RunFolderPath | None = Field(default=None,
                                          description="run folder; null = runs/<name>")

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
        text = format_validation_error(exc, schema="pagctl train-score --schema",
                                       model=ScoreSpec)
        # the data.augment check is a model-level validator: its message names the field
        text = text.replace("spec: data.augment:", "data.augment:")
        raise SpecError(text) from None


def load_score_spec(source: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    values: dict[str, Any] | None = None) -> ScoreSpec:
    """Read a score spec file (or built-in name), apply ``a.b=c`` overrides (values parsed
    as YAML), then the typed ``values`` (dotted key: value), validate once."""
    data = _read_score_mapping(str(source))
    for item in overrides:
        apply_override(data, item)
    for key, value in (values or {}).items():
        set_value(data, key, value)
    return validate_score_spec(data)

