"""Momentum iterative FGSM (Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR
2018), L∞: from the clean input, ``steps`` signed steps of length ``step_size`` along the
accumulated gradient ``g_{t+1} = decay · g_t + ∇ / mean|∇|`` (the mean per example over all
its pixels), each clipped to the ε-box and to [0, 1].

It is PGD without a random start whose step direction carries momentum, so it runs
:func:`pagctl.attacks.pgd.pgd` with its ``decay`` option: the same loop, projection and
bookkeeping of the kept point. Per example, ``keep="first_fooled"`` (the default) returns the
first misclassified iterate, else the last one; the first iterate checked is the clean input,
so points the model already misclassifies come back unchanged. ``keep="last"`` returns the
last iterate, as the paper and torchattacks' ``MIFGSM`` do (a test checks it against
torchattacks point for point).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.pgd import Keep, pgd
from pagctl.attacks.steps import Norm
from pagctl.protocols import BuildContext, Epsilon, PluginParams


class MIFGSM(AttackBase):
    """MI-FGSM: iterated signed steps along a momentum of L1-scaled gradients (L∞);
    deterministic (no random start)."""

    norm: Norm = "linf"

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="L-infinity radius in [0, 1] pixel space, e.g. \"8/255\"",
        )
        steps: int = Field(default=10, ge=1, description="gradient steps")
        step_size: float | None = Field(
            default=None, gt=0, allow_inf_nan=False,
            description="length of each signed step; null = eps / steps (the paper's)",
        )
        decay: float = Field(
            default=1.0, ge=0, allow_inf_nan=False,
            description="momentum factor mu: the weight of the accumulated gradient "
            "(0 = iterated FGSM on L1-scaled gradients)",
        )
        keep: Keep = Field(
            default="first_fooled", description="first_fooled: per example the first "
            "misclassified iterate (evaluation); last: the last iterate (the paper's and "
            "torchattacks' output)",
        )

    params: Params

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.step_size: float = (params.step_size if params.step_size is not None
                                 else self.eps / params.steps)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs."""
        return pgd(
            model, x, y, norm="linf", eps=self.eps, steps=self.params.steps,
            step_size=self.step_size, random_start=False, restarts=1,
            generator=self.generator, decay=self.params.decay,
            keep=self.params.keep,
        )
