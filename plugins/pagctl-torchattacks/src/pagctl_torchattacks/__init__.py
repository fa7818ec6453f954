"""torchattacks' attacks as pagctl attack plugins, with pydantic-validated parameters.

Each adapter builds the torchattacks object for the model it is called with, runs it, and
makes the result honour pagctl's Attack contract, which torchattacks does not promise:

- **Model mode.** torchattacks puts the whole model in eval mode for the attack and
  afterwards calls ``model.train()`` if the top module was training, which loses per-module
  flags (a BatchNorm kept in eval inside a training model ends up training). The adapter
  lets the attack run in eval mode and then restores every module's own flag.
- **Global RNG.** PGD's random start draws from the global RNG, and AutoAttack's stages
  call ``torch.random.manual_seed``. Each call runs inside ``torch.random.fork_rng``, seeded
  with :func:`call_seed` (``seed``, or the run's seed, and a per-call counter), so the
  caller's RNG is untouched and the calls are reproducible. A CUDA seed queued while CUDA
  is not yet initialised is discarded too, so it cannot surface later.
- **Gradients.** CW, DeepFool and FAB call ``backward()``, which accumulates ``.grad`` on
  the model's parameters. The parameters are frozen (``requires_grad=False``) during the
  call and restored afterwards, which also saves computing gradients nobody reads.
- **Normalisation.** torchattacks normalises inputs itself when the model's class is named
  ``RobModel`` and has ``mean``/``std``. pagctl models normalise inside ``forward``, so the
  adapter switches torchattacks' normalisation off.
- **Budget.** CW and DeepFool are minimum-norm attacks without a budget: the adapter takes
  ``eps`` and returns their point only where its L2 distance is at most ``eps``, else the
  clean input. Rows with NaN or infinite values are replaced by the clean input, the result
  gets the inputs' dtype and device, and pagctl's attack shell
  (:class:`pagctl.attacks.base.AttackBase`, which the adapters subclass, as pagctl's own
  attacks do) fits it into the budget (rounding in ``x + delta`` can overshoot a budget by
  an ulp) and answers an empty batch or ``eps = 0`` with the inputs, untouched.
- ``torch.no_grad()``: the attacks run under ``torch.enable_grad()``, so calling them from
  an evaluation loop works. DeepFool's return value, a tuple in some torchattacks versions,
  is unpacked.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torchattacks
from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.steps import Norm, NormParam, l2_norms
from pagctl.protocols import BuildContext, Epsilon, PluginParams

__all__ = ["TaAutoAttack", "TaCW", "TaDeepFool", "TaPGD", "TaPGDL2", "TorchattacksAdapter",
           "call_seed"]
__version__ = "0.1.0"

_MASK64 = (1 << 64) - 1


def call_seed(seed: int, call: int) -> int:
    """The RNG seed of the ``call``-th call (from 0) of an attack built with ``seed``.

    The first call uses ``seed`` itself, so it reproduces a direct torchattacks call made
    right after ``torch.manual_seed(seed)``. Later calls use a splitmix64 hash of
    ``(seed, call)``: they differ from each other and from the first calls of nearby seeds.
    """
    if call == 0:
        return seed
    z = (seed + call * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return fallback


@contextlib.contextmanager
def _lazy_cuda_seeds_kept() -> Iterator[None]:
    """Forget any CUDA seed queued inside the block while CUDA is not initialised.

    ``torch.manual_seed`` on a machine whose CUDA is not initialised queues the seed and
    applies it when CUDA starts, later and outside ``fork_rng``. The queue is private to
    torch, so this is best effort: without it, nothing is done.
    """
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    try:
        saved = dict(vars(tracker)) if tracker is not None else None
    except TypeError:  # no __dict__ in this torch version: leave it alone
        saved = None
    try:
        yield
    finally:
        if (tracker is not None and saved is not None
                and not torch.cuda.is_initialized()):  # type: ignore[no-untyped-call]
            tracker.__dict__.update(
                {k: list(v) if isinstance(v, list) else v for k, v in saved.items()})


@contextlib.contextmanager
def _isolated(model: nn.Module, seed: int) -> Iterator[None]:
    """Run a torchattacks call without side effects on ``model`` or the global RNG.

    Inside: gradients enabled, the model's parameters frozen, the CPU (and initialised
    CUDA) generators seeded with ``seed``. Afterwards: every module's train/eval flag, every
    parameter's ``requires_grad`` and the RNG states are as before.
    """
    modes = [(m, m.training) for m in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    initialised = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda = list(range(torch.cuda.device_count())) if initialised else []
    try:
        with _lazy_cuda_seeds_kept(), torch.random.fork_rng(devices=cuda), \
                torch.enable_grad():
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed_all(seed)
            for p in trainable:
                p.requires_grad_(False)
            yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for module, was_training in modes:
            module.training = was_training


def _without_normalisation(attack: Any) -> None:
    """Switch off torchattacks' own input normalisation on ``attack`` and its sub-attacks
    (pagctl models take [0, 1] pixels and normalise inside)."""
    for atk in [attack, *getattr(attack, "_attacks", {}).values()]:
        atk.normalization_used = None
        atk._normalization_applied = None


class TorchattacksAdapter(AttackBase):
    """Shared body of the adapters: build the torchattacks object, run it, enforce the contract.

    Subclasses set ``Params`` and implement :meth:`make`; an adapter whose ``Params`` have no
    ``norm`` sets the class attribute ``norm``; minimum-norm attacks also set
    ``minimum_norm = True`` (their point is kept only within ``eps`` in L2). The params, the
    budget, ``seed`` and the call's boundary are `pagctl.attacks.base.AttackBase`'s.
    """

    Params: ClassVar[type[PluginParams]]
    minimum_norm: ClassVar[bool] = False
    norm: Norm = "linf"

    def __init__(self, params: Any, ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self._calls = 0

    def make(self, model: nn.Module, seed: int) -> Any:
        """The torchattacks attack for ``model`` (``seed``: for attacks that take one)."""
        raise NotImplementedError

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs, same dtype
        and device (``AttackBase.__call__`` fits them within ``eps`` in ``norm``).

        Successive calls use different, reproducible seeds (see :func:`call_seed`).
        """
        seed = call_seed(self.seed, self._calls)
        self._calls += 1
        device = _model_device(model, x.device)
        with _isolated(model, seed):
            # torchattacks prints when it cannot find the model's device; we set it below.
            with contextlib.redirect_stdout(io.StringIO()):
                attack = self.make(model, seed)
            _without_normalisation(attack)
            attack.set_device(device)
            result = attack(x.clone().to(device), y.detach().to(device))
        if isinstance(result, (tuple, list)):  # DeepFool in some versions: (images, targets)
            result = result[0]
        x_adv = result.detach().to(device=x.device, dtype=x.dtype)
        keep = torch.isfinite(x_adv).flatten(1).all(dim=1)
        if self.minimum_norm:
            keep &= l2_norms(x_adv - x) <= self.eps
        return torch.where(keep.reshape((-1,) + (1,) * (x.dim() - 1)), x_adv, x)


class TaPGD(TorchattacksAdapter):
    """torchattacks.PGD: L-inf PGD on the cross-entropy, uniform random start (Madry et al.)."""

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="torchattacks `eps`: L-inf radius in [0, 1] pixel space (number or "
            "fraction string such as \"8/255\")",
        )
        alpha: Epsilon = Field(
            default=2 / 255, gt=0, allow_inf_nan=False,
            description="torchattacks `alpha`: step size (signed-gradient step per pixel)",
        )
        steps: int = Field(default=10, ge=0, description="torchattacks `steps`: iterations")
        random_start: bool = Field(
            default=True, description="torchattacks `random_start`: start from a uniform "
            "random point of the box",
        )
        seed: int | None = Field(
            default=None, description="seed of the random start (torchattacks draws from the "
            "global RNG; the adapter forks and seeds it); null = the run's seed",
        )

    params: Params

    def make(self, model: nn.Module, seed: int) -> Any:
        p = self.params
        return torchattacks.PGD(model, eps=p.eps, alpha=p.alpha, steps=p.steps,
                                random_start=p.random_start)


class TaPGDL2(TorchattacksAdapter):
    """torchattacks.PGDL2: L2 PGD on the cross-entropy, random start in the ball (Madry et al.)."""

    norm = "l2"

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=1.0, ge=0, allow_inf_nan=False,
            description="torchattacks `eps`: L2 radius in [0, 1] pixel space",
        )
        alpha: Epsilon = Field(
            default=0.2, gt=0, allow_inf_nan=False,
            description="torchattacks `alpha`: L2 length of each step",
        )
        steps: int = Field(default=10, ge=0, description="torchattacks `steps`: iterations")
        random_start: bool = Field(
            default=True, description="torchattacks `random_start`: start from a random point "
            "of the ball (torchattacks draws the radius uniformly, not uniformly in volume)",
        )
        seed: int | None = Field(
            default=None, description="seed of the random start (torchattacks draws from the "
            "global RNG; the adapter forks and seeds it); null = the run's seed",
        )

    params: Params

    def make(self, model: nn.Module, seed: int) -> Any:
        p = self.params
        return torchattacks.PGDL2(model, eps=p.eps, alpha=p.alpha, steps=p.steps,
                                  random_start=p.random_start)


class TaCW(TorchattacksAdapter):
    """torchattacks.CW: Carlini-Wagner L2 (fixed c, no binary search), kept only within eps."""

    norm = "l2"
    minimum_norm = True

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=0.5, ge=0, allow_inf_nan=False,
            description="L2 budget (not a torchattacks argument: CW minimises the norm; its "
            "point is returned only where ||x_adv - x||_2 <= eps, else the clean input)",
        )
        c: float = Field(
            default=1.0, gt=0, allow_inf_nan=False,
            description="torchattacks `c`: weight of the misclassification term against "
            "the squared L2 distance",
        )
        kappa: float = Field(
            default=0.0, ge=0, allow_inf_nan=False,
            description="torchattacks `kappa`: logit margin (confidence) a point needs",
        )
        steps: int = Field(default=50, ge=1, description="torchattacks `steps`: Adam steps")
        lr: float = Field(
            default=0.01, gt=0, allow_inf_nan=False,
            description="torchattacks `lr`: Adam learning rate in tanh space",
        )

    params: Params

    def make(self, model: nn.Module, seed: int) -> Any:
        p = self.params
        return torchattacks.CW(model, c=p.c, kappa=p.kappa, steps=p.steps, lr=p.lr)


class TaDeepFool(TorchattacksAdapter):
    """torchattacks.DeepFool: minimal L2 steps across the linearised decision boundary."""

    norm = "l2"
    minimum_norm = True

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=0.5, ge=0, allow_inf_nan=False,
            description="L2 budget (not a torchattacks argument: DeepFool minimises the norm; "
            "its point is returned only where ||x_adv - x||_2 <= eps, else the clean input)",
        )
        steps: int = Field(default=50, ge=1, description="torchattacks `steps`: iterations")
        overshoot: float = Field(
            default=0.02, ge=0, allow_inf_nan=False,
            description="torchattacks `overshoot`: relative step beyond the boundary",
        )

    params: Params

    def make(self, model: nn.Module, seed: int) -> Any:
        p = self.params
        return torchattacks.DeepFool(model, steps=p.steps, overshoot=p.overshoot)


class TaAutoAttack(TorchattacksAdapter):
    """torchattacks.AutoAttack: APGD-CE, APGD-T, FAB-T and Square (torchattacks' settings)."""

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="torchattacks `eps`: radius in [0, 1] pixel space, in `norm`",
        )
        norm: NormParam = Field(
            default="linf", description="torchattacks `norm`: 'linf' (passed as 'Linf') or "
            "'l2' (passed as 'L2'), in any case",
        )
        version: Literal["standard", "plus", "rand"] = Field(
            default="standard", description="torchattacks `version`: 'standard', 'plus' or "
            "'rand' (randomised models). torchattacks runs its gradient stages for 10 "
            "iterations, the reference AutoAttack for 100",
        )
        seed: int | None = Field(
            default=None, description="torchattacks `seed` of every stage; null = the run's "
            "seed (successive calls derive a new seed from it)",
        )

    params: Params

    def make(self, model: nn.Module, seed: int) -> Any:
        p = self.params
        return torchattacks.AutoAttack(
            model, norm={"linf": "Linf", "l2": "L2"}[p.norm], eps=p.eps, version=p.version,
            n_classes=self.ctx.num_classes, seed=seed, verbose=False)
