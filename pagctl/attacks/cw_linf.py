"""CW∞: PGD-L∞ ascending the Carlini–Wagner margin instead of the cross-entropy.

What TRADES (Zhang et al. 2019), MART (Wang et al. 2020) and the RobustBench leaderboards
report as "CW∞" is projected gradient descent in the L∞ ball on the margin of Carlini &
Wagner's loss, ``min(max_{j≠y} z_j − z_y, κ)`` on the logits ``z`` (`pagctl.attacks.pgd.
cw_margin`): signed-gradient steps, the projection, the random start and the choice of the
returned iterate are PGD's (`pagctl.attacks.pgd.pgd` with ``loss="cw"``). It is not Carlini
& Wagner's own L∞ algorithm (an iterative penalty on the pixels above a shrinking threshold
τ), and not a minimum-norm attack: it searches the fixed ε-ball as PGD does.

The margin does not saturate as the cross-entropy does: on a confident model the softmax
rounds to one and the cross-entropy's gradient to zero, while the logits' difference keeps
its gradient; it is also unchanged, step for step, by scaling the logits by a power of two.
``confidence`` κ caps the margin (TRADES and MART's code use ``clamp(z_y − max_{j≠y} z_j +
κ, min=0)`` with κ = 50, the same capped loss); at the default κ = 0 the gradient vanishes
once a point is misclassified, so a misclassified iterate stays where it is.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.pgd import Keep, default_step_size, pgd
from pagctl.protocols import BuildContext, Epsilon, PluginParams


class CWLinf(AttackBase):
    """PGD-L∞ on the Carlini–Wagner margin ("CW∞" in TRADES, MART and RobustBench)."""

    norm: Literal["linf"] = "linf"
    min_classes = 2
    name = "cw_linf"

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="L-infinity radius in [0, 1] pixel space, e.g. \"8/255\"",
        )
        steps: int = Field(default=20, ge=1, description="gradient steps per restart")
        step_size: float | None = Field(
            default=None, gt=0, allow_inf_nan=False,
            description="L-infinity step length; null = eps * max(2.5 / steps, 1/4)",
        )
        random_start: bool = Field(
            default=True, description="start from a uniform random point of the ball "
            "(clipped to [0, 1]) instead of the clean input",
        )
        restarts: int = Field(
            default=1, ge=1, description="independent random starts; later runs only attack "
            "the examples not yet misclassified (one run without random_start)",
        )
        confidence: float = Field(
            default=0.0, ge=0, allow_inf_nan=False,
            description="kappa: the margin max_{j != y} z_j - z_y stops rising at kappa "
            "(TRADES and MART's code: 50)",
        )
        keep: Keep = Field(
            default="first_fooled", description="first_fooled: per example the first "
            "misclassified iterate; last: the last iterate of the best restart",
        )
        seed: int | None = Field(
            default=None, description="seed of the random starts; null = the run's seed",
        )

    params: Params

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.step_size: float = (default_step_size(self.eps, params.steps)
                                 if params.step_size is None else params.step_size)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs
        (`pagctl.attacks.base.AttackBase`: successive calls continue one seeded stream)."""
        p = self.params
        return pgd(model, x, y, norm="linf", eps=self.eps, steps=p.steps,
                   step_size=self.step_size, random_start=p.random_start,
                   restarts=p.restarts, generator=self.generator, loss="cw",
                   confidence=p.confidence, keep=p.keep)
