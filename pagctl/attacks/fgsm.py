"""Fast gradient sign method (Goodfellow et al. 2015) and its L2 analogue: one step of
length ε on the untargeted cross-entropy loss."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.steps import Norm, NormParam, fit_to_budget, loss_gradient, normalize_l2
from pagctl.protocols import Epsilon, PluginParams


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, norm: Norm,
         eps: float) -> Tensor:
    """One step of length ``eps``: ``x + eps·sign(∇)`` (L∞) or ``x + eps·∇/‖∇‖₂`` (L2),
    clipped to [0, 1]. Runs in whatever mode the caller left ``model`` in.

    Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W), same dtype/device.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x0 = x.detach()
    if eps == 0 or x0.shape[0] == 0:
        return x0.clone()
    grad = loss_gradient(model, x0, y.to(x0.device))
    step = normalize_l2(grad) if norm == "l2" else grad.sign()
    return fit_to_budget(x0, (x0 + eps * step).clamp(0.0, 1.0), norm, eps)


class FGSM(AttackBase):
    """Single-step attack; deterministic (no random start)."""

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="step length = budget in [0, 1] pixel space (number or \"8/255\")",
        )
        norm: NormParam = Field(
            default="linf",
            description="linf: signed gradient; l2: L2-normalised gradient (any case)",
        )

    params: Params
    norm: Norm

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs."""
        return fgsm(model, x, y, norm=self.norm, eps=self.eps)
