"""The plugin contract: what a target-gradient source and an attack are, and the checks
that hold every plugin to it.

Protocols, not base classes: a plugin needs only torch and pydantic. An entry point resolves
to a *factory* (usually the class itself) with a nested pydantic ``Params`` model; pagctl
validates the user's parameters against ``Params`` and calls ``factory(params, ctx)`` once,
then calls the built object with tensors.

Tensor conventions (``Shape:`` in docstrings):

- inputs ``(N, C, H, W)`` float pixels in [0, 1] (normalisation lives inside the model);
- labels ``(N,)`` int64; classes ``(N, K)`` int64, the K target classes per image;
- target / model gradients ``(N, K, C, H, W)``.

Optional attributes a plugin may declare (read only through the functions here):

- a source's ``requires_index = True``: it serves indexed training images only (a bank), so
  it cannot score test images (`requires_index`);
- a source's ``disables_pag = True``: training skips the PAG term (`disables_pag`);
- a source's ``reseed(seed)``: restarts the randomness it draws for inputs without an index
  from ``seed``. A source that draws any must declare it: align-score reseeds it per batch
  (`reseed_source`), so a batch's targets do not depend on the batches before it and
  sharded scores merge exactly;
- an attack's ``eps`` / ``norm``: its budget when its ``Params`` do not hold them
  (`declared_budget`);
- an attack's ``stages()``: an ensemble run stage by stage (`Ensemble`, `attack_stages`);
- an attack's ``passes_per_point()``: the most model passes (forwards and backwards, one
  per example) one call spends on a point, read from its params; the engine's ETA costs
  the stages still to run with it (`declared_passes`).

The checks below are the contract's one implementation: the attack engine calls them on
every batch, the registry's guard on every source call, and `pagctl.testing` (the
conformance suite for plugin authors) turns their errors into ``AssertionError``. A broken
rule raises `PluginContractError` with one line: ``"<who> broke the contract: <what>"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, BeforeValidator

from pagctl.errors import PluginContractError, PluginRuntimeError
from pagctl.spec import FrozenModel

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
    from torch.utils.data import Dataset


class PluginParams(FrozenModel):
    """Base for plugin ``Params``: frozen, unknown keys rejected, every float finite (inf
    and NaN refused). The rules are `pagctl.spec.FrozenModel`'s, the base of every value
    pagctl validates once; this is the contract's name for it, the one a plugin inherits."""


def parse_fraction(value: Any) -> Any:
    """Accept ``"8/255"``, ``"0.5"`` or a number; return a float (exact fraction evaluated;
    a decimal too large for a float is infinite, which the field's finiteness check then
    refuses). Refused here: booleans, and fractions whose exact value would take long to
    compute (numbers longer than 40 characters: a spec from elsewhere must not be able to
    stall pagctl)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                top, _, bottom = text.partition("/")
                if max(len(top), len(bottom)) > 40:
                    raise ValueError
                number = float(Fraction(text))
            else:
                number = float(text)
        except (ValueError, ZeroDivisionError, OverflowError):
            raise ValueError(
                f"expected a number or an exact fraction such as '8/255', got {value!r}"
            ) from None
        return number
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

    Shape: inputs (N,C,H,W), labels (N,), classes (N,K) -> (N,K,C,H,W), finite, float, not
    requiring grad, on the inputs' device, any scale. ``index`` holds the inputs' positions
    in ``BuildContext.train_set`` when they are (un-augmented) training images, else None.
    Optional class attributes: ``requires_index`` and ``disables_pag`` (module docstring).
    """

    def __call__(
        self, inputs: Tensor, labels: Tensor, classes: Tensor, *, index: Tensor | None = None
    ) -> Tensor: ...


@runtime_checkable
class Attack(Protocol):
    """Shape: (N,C,H,W) in [0,1], (N,) -> adversarial inputs, same shape/dtype/device,
    in [0,1] and inside the attack's budget. Never modifies ``inputs``, never changes the
    model's mode, parameters or buffers, never touches the global RNG.
    Optional attributes: ``eps`` and ``norm`` (the budget, when not in ``Params``), and
    ``passes_per_point()`` (its cost, for the ETA)."""

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor: ...


@runtime_checkable
class Ensemble(Protocol):
    """An attack made of named stages run one after another on the points still robust.

    ``stages()`` returns ``[(name, attack), ...]``; each attack follows the Attack protocol.
    """

    def stages(self) -> list[tuple[str, Attack]]: ...


P = TypeVar("P", bound=BaseModel, contravariant=True)
T = TypeVar("T", covariant=True)


class PluginFactory(Protocol[P, T]):
    """What an entry point resolves to (usually the plugin class)."""

    Params: type[BaseModel]

    def __call__(self, params: P, ctx: BuildContext) -> T: ...


# ---------------------------------------------------------------------------------------
# the optional attributes


def requires_index(source: Any) -> bool:
    """Whether the source serves indexed training images only (it cannot score test images)."""
    return bool(getattr(source, "requires_index", False))


def disables_pag(source: Any) -> bool:
    """Whether training with this source skips the PAG term (the ``none`` source)."""
    return bool(getattr(source, "disables_pag", False))


def reseed_source(source: Any, seed: int) -> bool:
    """Restart the source's own randomness (for inputs without an index) from ``seed`` when
    it declares ``reseed``; whether it did (a source without it is deterministic)."""
    reseed = getattr(source, "reseed", None)
    if not callable(reseed):
        return False
    reseed(seed)
    return True


def attack_stages(attack: Any, name: str) -> list[tuple[str, Attack]]:
    """The stages of ``attack``: its own list for an Ensemble, else one stage named ``name``."""
    stages = getattr(attack, "stages", None)
    if callable(stages):
        listed = list(stages())
        if not listed:
            raise PluginContractError(f"attack '{name}' broke the contract: stages() is empty")
        return listed
    return [(name, attack)]


def declared_passes(attack: Any) -> float | None:
    """The model passes per attacked point ``attack`` declares (``passes_per_point()``), an
    upper bound the engine's ETA uses before the stage has run; None when it declares none,
    or something other than a positive finite number (a wrong hint must not stop a run)."""
    passes = getattr(attack, "passes_per_point", None)
    if not callable(passes):
        return None
    try:
        value = float(passes())
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


NORMS: dict[str, float] = {"l0": 0.0, "l1": 1.0, "l2": 2.0, "linf": math.inf}
"""The budgets pagctl can check, with the order p of each vector norm. ``l0`` counts pixels,
not coordinates: a pixel position (one of H × W) where any channel differs counts once, as
in Sparse-RS, so its ``eps`` is a number of pixels."""
BUDGET_TOLERANCE = 1e-6
"""Relative slack of the budget check (float rounding of x + δ − x)."""


def declared_budget(attack: Any, params: BaseModel | None) -> tuple[str | None, float | None]:
    """(norm, eps) an attack declares: ``params.eps`` / ``params.norm`` when its Params have
    them, else the built object's ``eps`` / ``norm`` attributes; None where neither says."""
    eps = getattr(params, "eps", None)
    if eps is None:
        eps = getattr(attack, "eps", None)
    norm = getattr(params, "norm", None) or getattr(attack, "norm", None)
    return (str(norm) if norm is not None else None, float(eps) if eps is not None else None)


def perturbation_norms(delta: Tensor, norm: str) -> Tensor:
    """Each example's size in ``norm`` (one of `NORMS`; ``l0``: pixels changed, any channel).
    Shape: (N, C, H, W) -> (N,)."""
    import torch

    if norm == "l0":
        return delta.ne(0).any(dim=1).flatten(1).sum(dim=1).to(delta.dtype)
    sizes: Tensor = torch.linalg.vector_norm(delta.flatten(1), ord=NORMS[norm], dim=1)
    return sizes


# ---------------------------------------------------------------------------------------
# the checks


def _broke(who: str, what: str) -> PluginContractError:
    return PluginContractError(f"{who} broke the contract: {what}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def raised(who: str, exc: BaseException) -> PluginRuntimeError:
    """The one-line error for a plugin that raised while called: names it and the error."""
    return PluginRuntimeError(f"{who} raised {type(exc).__name__}: {first_line(exc)}")


def check_inputs_untouched(who: str, pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Each (tensor given to the plugin, a copy taken before) is unchanged and has no .grad."""
    import torch

    for i, (given, before) in enumerate(pairs):
        if not torch.equal(given, before):
            raise _broke(who, f"it modified its inputs in place (input tensor #{i})")
        if given.grad is not None:
            raise _broke(who, f"it left a .grad on its input tensor #{i}")


def check_attack_output(who: str, inputs: Tensor, output: Any, norm: str | None,
                        eps: float | None) -> None:
    """An attack's output: a tensor of the inputs' shape, dtype and device, finite, in
    [0, 1], and within ``eps`` of ``inputs`` in ``norm`` (when it declares a budget)."""
    import torch

    if not isinstance(output, torch.Tensor):
        raise _broke(who, f"returned {type(output).__name__}, expected a tensor")
    x = inputs
    if output.shape != x.shape or output.dtype != x.dtype or output.device != x.device:
        raise _broke(who, f"returned shape {tuple(output.shape)}, {output.dtype} on "
                     f"{output.device}; expected {tuple(x.shape)}, {x.dtype} on {x.device}")
    bad = int((~torch.isfinite(output)).sum())
    if bad:
        raise _broke(who, f"returned {bad} non-finite values (NaN or infinite)")
    if output.numel() and (float(output.min()) < 0 or float(output.max()) > 1):
        raise _broke(who, f"returned values outside [0, 1] (min {float(output.min()):.4g}, "
                     f"max {float(output.max()):.4g}); clamp to the image box")
    if eps is None or norm is None:
        return
    if norm not in NORMS:
        raise _broke(who, f"declares a budget in norm {norm!r}, which cannot be checked; "
                     f"use one of {', '.join(NORMS)}")
    sizes = perturbation_norms(output - x, norm)
    worst = float(sizes.max()) if sizes.numel() else 0.0
    if worst > eps * (1 + BUDGET_TOLERANCE) + 1e-7:
        what = " (pixels changed)" if norm == "l0" else ""
        raise _broke(who, f"perturbation {norm} norm {worst:.6g}{what} exceeds eps {eps:.6g}")


def check_source_output(who: str, inputs: Tensor, classes: Tensor, output: Any) -> None:
    """A source's output: a float tensor (N, K, C, H, W) on the inputs' device, finite, not
    requiring grad."""
    import torch

    if not isinstance(output, torch.Tensor):
        raise _broke(who, f"returned {type(output).__name__}, expected a tensor")
    expected = (inputs.shape[0], classes.shape[1], *inputs.shape[1:])
    if tuple(output.shape) != expected or output.device != inputs.device:
        raise _broke(who, f"returned shape {tuple(output.shape)} on {output.device}, expected "
                     f"{expected} (N, K, C, H, W) on {inputs.device}")
    if not output.is_floating_point():
        raise _broke(who, f"returned {output.dtype}, expected a float dtype")
    bad = int((~torch.isfinite(output)).sum())
    if bad:
        raise _broke(who, f"{bad} NaN or infinite values in its target gradients")
    if output.requires_grad:
        raise _broke(who, "returned a tensor that requires grad; return a detached target")


class ModelSnapshot:
    """What a plugin call must leave alone on the model: every module's train/eval flag,
    every parameter and buffer, and the parameters' ``.grad``. Take it before the call,
    `check` after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = [m.training for m in model.modules()]
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.grads = {k for k, p in model.named_parameters() if p.grad is not None}

    def check(self, who: str) -> None:
        import torch

        if [m.training for m in self.model.modules()] != self.modes:
            raise _broke(who, "it changed the model's train/eval mode (restore each module's "
                         "flag)")
        for key, value in self.model.state_dict().items():
            if key in self.state and not torch.equal(value, self.state[key]):
                raise _broke(who, f"it changed the model's parameter or buffer '{key}' "
                             "(BatchNorm statistics update in train mode)")
        for key, p in self.model.named_parameters():
            if p.grad is not None and key not in self.grads:
                raise _broke(who, f"it left a .grad on the model parameter '{key}'")
