"""The plugin contract: what a target-gradient source and an attack are.

Protocols, not base classes: a plugin needs only torch and pydantic. An entry point resolves
to a *factory* (usually the class itself) with a nested pydantic ``Params`` model; pagctl
validates the user's parameters against ``Params`` and calls ``factory(params, ctx)`` once,
then calls the built object with tensors.

Tensor conventions (``Shape:`` in docstrings):

- inputs ``(N, C, H, W)`` float pixels in [0, 1] (normalisation lives inside the model);
- labels ``(N,)`` int64; classes ``(N, K)`` int64, the K target classes per image;
- target / model gradients ``(N, K, C, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, BeforeValidator, ConfigDict

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
    from torch.utils.data import Dataset


class PluginParams(BaseModel):
    """Base for plugin ``Params``: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def parse_fraction(value: Any) -> Any:
    """Accept ``"8/255"``, ``"0.5"`` or a number; return a float (exact fraction evaluated)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"expected a number or an exact fraction such as '8/255', got {value!r}"
            ) from None
    return value


Epsilon = Annotated[float, BeforeValidator(parse_fraction)]
"""A perturbation budget: a float, or an exact fraction written as a string ("8/255")."""


@dataclass(frozen=True)
class BuildContext:
    """What a factory may use to build a plugin.

    ``train_set`` yields ``(image (C,H,W) float in [0,1], label int)``; ``data_fingerprint`` is
    a content hash of the training set, for cache keys; ``cache_dir`` is where precomputed
    data may be stored (None: do not cache).
    """

    num_classes: int
    input_shape: tuple[int, int, int]
    device: torch.device
    seed: int
    train_set: Dataset[Any] | None = None
    cache_dir: Path | None = None
    data_fingerprint: str | None = None


@runtime_checkable
class TargetGradientSource(Protocol):
    """g(x, t): a "ground-truth" perceptually aligned gradient for each target class.

    Shape: inputs (N,C,H,W), labels (N,), classes (N,K) -> (N,K,C,H,W), finite, any scale.
    ``index`` holds the inputs' positions in ``BuildContext.train_set`` when they are
    (un-augmented) training images, else None.
    """

    def __call__(
        self, inputs: Tensor, labels: Tensor, classes: Tensor, *, index: Tensor | None = None
    ) -> Tensor: ...


@runtime_checkable
class Attack(Protocol):
    """Shape: (N,C,H,W) in [0,1], (N,) -> adversarial inputs, same shape/dtype/device,
    in [0,1] and inside the attack's budget. Never modifies ``inputs``, never changes the
    model's mode, never touches the global RNG."""

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor: ...


P = TypeVar("P", bound=BaseModel, contravariant=True)
T = TypeVar("T", covariant=True)


class PluginFactory(Protocol[P, T]):
    """What an entry point resolves to (usually the plugin class)."""

    Params: type[BaseModel]

    def __call__(self, params: P, ctx: BuildContext) -> T: ...
