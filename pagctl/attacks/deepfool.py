"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016), L2 and L∞: a minimum-norm attack.

One function, :func:`deepfool`, does the work; ``DeepFool`` is its plugin. Per example,
with ``y`` the label and ``k`` the candidate classes (``y`` and the ``candidates − 1`` other
classes of highest clean logit), each step linearises the differences ``f_k = z_k − z_y``
of the logits at the current point ``x_i`` (gradients ``w_k``), picks the class whose
linearised boundary is nearest, ``l = argmin_k |f_k| / ‖w_k‖_q`` (``q`` the dual norm: 2 for
L2, 1 for L∞), and adds the step that reaches it, plus 1e-4:

- L2: ``r_i = (|f_l| / ‖w_l‖₂ + 1e-4) · w_l / ‖w_l‖₂``,
- L∞: ``r_i = (|f_l| / ‖w_l‖₁ + 1e-4) · sign(w_l)``,

(each norm with 1e-8 added to guard against a zero gradient). The next point is ``x_{i+1} =
clip(x + (1 + overshoot) · Σ r_i, 0, 1)``: the overshoot scales the whole perturbation, as
in the paper's code. An example stops at its first misclassified iterate, after at most
``steps`` steps. This is foolbox's ``L2DeepFoolAttack`` / ``LinfDeepFoolAttack`` (logits
loss) step for step; torchattacks' ``DeepFool`` (L2 only) instead applies the overshoot to
each step, clips after each, and always takes every class as a candidate.

Deliberate differences from foolbox: the candidates are ranked after the label, not after
the clean prediction (the same for the points attacked, below); the last iterate is
checked (one more forward pass), and pagctl reports robust accuracy at a budget: the
returned point is the misclassified iterate when its norm is at most ``eps``, else the
clean input (a point DeepFool does not break within ``steps`` is returned unchanged too).
Examples the model already misclassifies are returned unchanged and not attacked.

Each step costs one forward pass and ``candidates − 1`` backward passes over the examples
still correctly classified.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.steps import Norm, NormParam, fit_to_budget, norms_of, per_example
from pagctl.protocols import Epsilon, PluginParams

STEP_PAD = 1e-4
"""Added to the distance to the nearest linearised boundary at every step (the paper's code
and foolbox)."""
NORM_PAD = 1e-8
"""Added to the gradient norms, so a zero gradient gives a zero step, never NaN."""


def candidate_classes(logits: Tensor, labels: Tensor, candidates: int | None) -> Tensor:
    """The label, then the other classes by decreasing logit: ``candidates`` columns in all
    (every class when None or larger). Shape: (N, K), (N,) -> (N, min(candidates, K))."""
    k = logits.shape[1] if candidates is None else min(candidates, logits.shape[1])
    others = logits.scatter(1, labels[:, None], float("-inf")).argsort(dim=1, descending=True)
    return torch.cat((labels[:, None], others[:, :k - 1]), dim=1)


def _step(diffs: Tensor, grads: Tensor, norm: Norm) -> Tensor:
    """The step to the nearest linearised boundary, padded by ``STEP_PAD``.
    Shape: (M, k − 1), (M, k − 1, C, H, W) -> (M, C, H, W)."""
    flat = grads.flatten(2)
    dual = flat.norm(p=2, dim=2) if norm == "l2" else flat.abs().sum(dim=2)
    distances = diffs.abs() / (dual + NORM_PAD)
    best = distances.argmin(dim=1)
    rows = torch.arange(diffs.shape[0], device=diffs.device)
    distance, grad = distances[rows, best] + STEP_PAD, grads[rows, best]
    if norm == "l2":
        return per_example(distance / (dual[rows, best] + NORM_PAD), grad) * grad
    return per_example(distance, grad) * grad.sign()


def _run(model: nn.Module, x: Tensor, y: Tensor, classes: Tensor, *, norm: Norm, steps: int,
         overshoot: float) -> tuple[Tensor, Tensor]:
    """DeepFool on every example of ``x``: (the iterates where each stopped, whether each is
    misclassified). Shape: (M, C, H, W), (M,), (M, k) -> (M, C, H, W), (M,) bool."""
    points, total = x.clone(), torch.zeros_like(x)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    active = torch.arange(x.shape[0], device=x.device)
    for i in range(steps + 1):
        with torch.enable_grad():
            x_var = points[active].requires_grad_(i < steps)
            logits = model(x_var)
            newly = logits.argmax(dim=1) != y[active]
            fooled[active[newly]] = True
            if i == steps:
                break
            keep = ~newly
            if not bool(keep.any()):
                break
            own = classes[active]
            diffs = logits.gather(1, own[:, 1:]) - logits.gather(1, own[:, :1])
            grads = torch.stack([
                torch.autograd.grad(diffs[keep, j].sum(), x_var,
                                    retain_graph=j < diffs.shape[1] - 1)[0][keep]
                for j in range(diffs.shape[1])], dim=1)
        active = active[keep]
        total[active] += _step(diffs[keep].detach(), grads, norm)
        points[active] = (x[active] + (1.0 + overshoot) * total[active]).clamp(0.0, 1.0)
    return points, fooled


def deepfool(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm = "l2",
    eps: float = math.inf,
    steps: int = 50,
    overshoot: float = 0.02,
    candidates: int | None = 10,
) -> Tensor:
    """DeepFool: per example, the first misclassified iterate if its ``norm`` is at most
    ``eps``, else ``x`` (``eps = inf`` returns every misclassified iterate found).

    Examples the model misclassifies at ``x`` are returned unchanged. Runs in whatever mode
    the caller left ``model`` in. Shape: inputs (N, C, H, W) in [0, 1], labels (N,) ->
    (N, C, H, W), same dtype/device, in [0, 1], ``‖x_adv − x‖ <= eps`` per example.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (overshoot >= 0 and math.isfinite(overshoot)):
        raise ValueError(f"overshoot must be finite and >= 0, got {overshoot}")
    if candidates is not None and candidates < 2:
        raise ValueError(f"candidates must be >= 2 (or None: every class), got {candidates}")
    x0 = x.detach()
    if eps == 0 or x0.shape[0] == 0:
        return x0.clone()
    y = y.to(x0.device)
    with torch.no_grad():
        clean = model(x0).detach()
    if clean.shape[1] < 2:
        raise ValueError(f"deepfool needs at least 2 classes, the model gives {clean.shape[1]}")
    attack = (clean.argmax(dim=1) == y).nonzero().squeeze(1)
    out = x0.clone()
    if attack.numel():
        classes = candidate_classes(clean[attack], y[attack], candidates)
        points, fooled = _run(model, x0[attack], y[attack], classes, norm=norm, steps=steps,
                              overshoot=overshoot)
        fooled &= norms_of(points - x0[attack], norm) <= eps
        out[attack[fooled]] = points[fooled]
    return fit_to_budget(x0, out, norm, eps)


class DeepFool(AttackBase):
    """DeepFool: steps to the nearest linearised class boundary until misclassified; robust
    where the point it reaches lies farther than eps."""

    min_classes = 2
    name = "deepfool"

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=0.5, ge=0, allow_inf_nan=False,
            description="budget in the attack's norm, [0, 1] pixel space (set it for linf, "
            "e.g. \"8/255\"): points whose DeepFool point lies farther count as robust and "
            "are returned unchanged",
        )
        norm: NormParam = Field(default="l2", description="l2 or linf (any case)")
        steps: int = Field(default=50, ge=1, description="most steps per example")
        overshoot: float = Field(
            default=0.02, ge=0, allow_inf_nan=False,
            description="the perturbation is scaled by 1 + overshoot to cross the boundary",
        )
        candidates: int | None = Field(
            default=10, ge=2, description="classes linearised per step: the label and the "
            "others of highest clean logit (one backward pass each); null = every class",
        )

    norm: Norm
    params: Params

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs."""
        p = self.params
        return deepfool(model, x, y, norm=self.norm, eps=self.eps, steps=p.steps,
                        overshoot=p.overshoot, candidates=p.candidates)
