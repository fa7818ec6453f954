"""The attack shell, written once: `AttackBase` holds what every attack class repeats, so an
attack is its ``Params`` and one method, :meth:`AttackBase.perturb`.

What the shell holds (hyperparameters at construction, tensors at call time, as foolbox's
``attacks/base.py``):

- the validated ``params`` and the ``ctx`` (`pagctl.protocols.BuildContext`) it was built
  from;
- the declared budget, ``eps`` and ``norm``, read as the engine reads it
  (`pagctl.protocols.declared_budget`: the ``Params`` fields, else the class's attribute, as
  PGD-L2's ``norm = "l2"``), so what an attack promises and what ``pagctl attack`` checks
  cannot differ;
- ``seed`` (``params.seed``, or the run's seed when it is None or absent) and ``generator``,
  a CPU ``torch.Generator`` seeded with it: the attack's only source of randomness (never
  the global RNG). One generator per built attack, and successive calls continue its
  stream; ``pagctl attack`` builds a fresh attack for every batch with that batch's seed
  (`pagctl.robustness.engine.PerBatch`), so a batch's randomness depends on its seed alone
  and a resumed or sharded evaluation redraws exactly what an uninterrupted one drew;
- the call's boundary, :meth:`AttackBase.__call__`: the inputs detached (never modified), an
  empty batch or a zero budget answered with a copy of the inputs without querying the
  model, the labels on the inputs' device, and the result fitted into the budget and the
  [0, 1] box (`pagctl.attacks.steps.fit_to_budget`: ``x + δ − x`` can round past ε; a no-op
  on points already inside).

The Protocol stays the contract (`pagctl.protocols.Attack`): pagctl never asks whether an
attack subclasses this, and a plugin that writes its own ``__init__`` and ``__call__`` is as
welcome. The shell is the convenience the built-ins use too, one level deep: no abstract
hooks beyond ``perturb``, no setters, no mode or device state. It lives in its own room, not
in `pagctl.attacks.steps`: the steps are stateless functions an algorithm composes, the
shell is the object pagctl builds and calls, which holds state between the two.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast, get_args

from pydantic import BaseModel
from torch import Tensor, nn

from pagctl.attacks.steps import BudgetNorm, fit_to_budget, seeded_generator
from pagctl.protocols import BuildContext, declared_budget

__all__ = ["AttackBase"]


class AttackBase:
    """Base of an attack plugin: subclass it, nest a ``Params`` (a
    `pagctl.protocols.PluginParams` with ``eps``, and ``norm`` unless the class sets one),
    and write :meth:`perturb`.

    Class attributes a subclass may set: ``norm`` (the budget's norm when ``Params`` has no
    ``norm`` field), ``min_classes`` with ``name`` (building for fewer classes raises
    ``ValueError("<name> needs at least <min_classes> classes")``, which pagctl reports as a
    user error naming the field). Annotate ``params: Params`` in the subclass to type it.
    """

    Params: ClassVar[type[BaseModel]]
    name: ClassVar[str] = "attack"
    min_classes: ClassVar[int] = 0
    params: BaseModel
    norm: BudgetNorm
    eps: float

    def __init__(self, params: Any, ctx: BuildContext) -> None:
        if ctx.num_classes < self.min_classes:
            raise ValueError(f"{self.name} needs at least {self.min_classes} classes")
        norm, eps = declared_budget(self, params)
        if eps is None or norm not in get_args(BudgetNorm):
            raise TypeError(f"{type(self).__name__}: an AttackBase needs a budget: 'eps' in "
                            f"its Params and a norm in {get_args(BudgetNorm)} (a 'norm' field "
                            f"or class attribute), got eps={eps!r}, norm={norm!r}")
        self.params = params
        self.ctx = ctx
        self.eps = eps
        self.norm = cast(BudgetNorm, norm)  # checked above
        seed = getattr(params, "seed", None)
        self.seed: int = ctx.seed if seed is None else int(seed)
        self.generator = seeded_generator(self.seed, ctx)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs, same dtype
        and device, in [0, 1] and within ``eps`` of ``inputs`` in ``norm`` (module
        docstring: the boundary). Successive calls continue one seeded random stream."""
        x = inputs.detach()
        if x.shape[0] == 0 or self.eps == 0:
            return x.clone()
        return fit_to_budget(x, self.perturb(model, x, labels.to(x.device)), self.norm,
                             self.eps)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The attack itself, on a non-empty batch with ``eps > 0``: ``x`` detached, ``y`` on
        its device. Return points of the same shape; the caller fits them into the budget.
        Draw randomness from ``self.generator`` only; leave the model's mode, parameters and
        buffers as they are. Shape: (N, C, H, W), (N,) -> (N, C, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} must define perturb(model, x, y)")
