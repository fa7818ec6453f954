"""PGD in the L1 ball with sparse steps: SLIDE, the sparse L1 descent of Tramèr & Boneh
(NeurIPS 2019, "Adversarial Training and Robustness for Multiple Perturbations").

One function, :func:`pgd_l1`, does the work; ``PGDL1`` is its plugin. A steepest-ascent
step in L1 moves one coordinate; SLIDE moves the top ``1 − quantile`` of them instead. Per
step, on the cross-entropy's input gradient ``g`` at the iterate ``x_i``:

- ``g`` is zeroed where ``x_i`` lies on a face of the [0, 1] box and ``g`` points out of it;
- the coordinates with ``|g|`` at least the ``quantile`` of ``|g|`` over the example (numpy's
  linear-interpolation quantile) get ``sign(g)``, the others 0; the result ``e`` is divided
  by its L1 norm (a zero ``e`` stays zero);
- ``x_{i+1} = x + P(x_i + α · e − x)`` with ``P`` the exact Euclidean projection onto the
  L1 ball of radius ε intersected with the box (`pagctl.attacks.steps.project_l1_box`,
  which APGD-L1 uses too).

This is foolbox's ``SparseL1DescentAttack`` (after Tramèr's ``MultiRobustness`` code) step
for step, but for the projection: foolbox projects onto the L1 ball alone and then clips to
the box, which spends budget on the part of a step the clipping removes; the two coincide
wherever the L1 projection stays inside the box. No random start (foolbox's default) and so
no restarts: the attack is deterministic.

The returned point follows ``pagctl.attacks.pgd``'s ``keep``: per example the first
misclassified iterate (``"first_fooled"``, checked on the logits of each gradient pass, so
the last iterate is returned unchecked where no earlier one fooled the model), or the last
iterate (``"last"``, what foolbox returns).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.pgd import Keep, default_step_size
from pagctl.attacks.steps import fit_to_budget, logits_and_gradient, per_example, project_l1_box
from pagctl.protocols import BuildContext, Epsilon, PluginParams


def row_quantile(values: Tensor, q: float) -> Tensor:
    """Per row, numpy's default (``method="linear"``) ``q``-quantile, with numpy's
    arithmetic (the virtual index ``n·q + (1 − q) − 1`` and its two-sided interpolation), so
    ties with the reference's threshold fall the same way. Shape: (N, d) -> (N,)."""
    n = values.shape[1]
    index = n * q + (1.0 - q) - 1.0
    below = min(max(math.floor(index), 0), n - 1)
    above = min(below + 1, n - 1)
    t = index - below
    a = values.kthvalue(below + 1, dim=1).values
    b = values.kthvalue(above + 1, dim=1).values
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def sparse_l1_direction(grad: Tensor, x: Tensor, quantile: float) -> Tensor:
    """SLIDE's step direction at ``x``: ``sign(grad)`` on the coordinates whose ``|grad|``
    reaches the ``quantile`` of the example's (after zeroing those that push out of the
    [0, 1] box), divided by its L1 norm. Shape: (N, ...) twice -> (N, ...), ‖·‖₁ ∈ {0, 1}."""
    outward = ((x == 0) & (grad < 0)) | ((x == 1) & (grad > 0))
    grad = torch.where(outward, torch.zeros_like(grad), grad)
    size = grad.abs().flatten(1)
    keep = size >= row_quantile(size, quantile)[:, None]
    e = torch.where(keep, grad.flatten(1).sign(), torch.zeros_like(size))
    return (e / e.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)).reshape(grad.shape)


def pgd_l1(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    quantile: float = 0.99,
    keep: Keep = "first_fooled",
) -> Tensor:
    """SLIDE (module docstring) on the cross-entropy, inside the L1 ball of radius ``eps``
    around ``x`` and the [0, 1] box. ``step_size`` (the L1 length of a step) None means
    ``default_step_size(eps, steps)``. Runs in whatever mode the caller left ``model`` in.
    Shape: inputs (N, C, H, W) in [0, 1], labels (N,) -> (N, C, H, W), same dtype/device,
    ``‖x_adv − x‖₁ <= eps`` per example.
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if keep not in ("first_fooled", "last"):
        raise ValueError(f"keep must be 'first_fooled' or 'last', got {keep!r}")
    x0 = x.detach()
    if eps == 0 or x0.shape[0] == 0:
        return x0.clone()
    alpha = default_step_size(eps, steps) if step_size is None else step_size
    if not alpha > 0:
        raise ValueError(f"step_size must be > 0, got {alpha}")
    y = y.to(x0.device)
    x_k, out = x0.clone(), x0.clone()
    found = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    for _ in range(steps):
        logits, grad = logits_and_gradient(model, x_k, y)
        if keep == "first_fooled":
            newly = (logits.argmax(dim=1) != y) & ~found
            out = torch.where(per_example(newly, x_k), x_k, out)
            found |= newly
        moved = x_k + alpha * sparse_l1_direction(grad, x_k, quantile) - x0
        x_k = (x0 + project_l1_box(x0, moved, eps)).clamp(0.0, 1.0)
    finite = torch.isfinite(x_k).flatten(1).all(dim=1)
    x_k = torch.where(per_example(finite, x_k), x_k, x0)
    out = torch.where(per_example(found, x_k), out, x_k)
    return fit_to_budget(x0, out, "l1", eps)


class PGDL1(AttackBase):
    """PGD in the L1 ball with SLIDE's sparse steps (the top 1 − quantile of the gradient's
    coordinates) and the exact projection onto the L1 ball and the [0, 1] box."""

    norm: Literal["l1"] = "l1"
    name = "pgd_l1"

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=12.0, ge=0, allow_inf_nan=False,
            description="L1 radius in [0, 1] pixel space (AutoAttack's CIFAR-10 budget: 12)",
        )
        steps: int = Field(default=10, ge=1, description="gradient steps")
        step_size: float | None = Field(
            default=None, gt=0, allow_inf_nan=False,
            description="L1 length of a step; null = eps * max(2.5 / steps, 1/4)",
        )
        quantile: float = Field(
            default=0.99, ge=0, le=1, allow_inf_nan=False,
            description="a step moves the coordinates whose |gradient| reaches this "
            "quantile of the example's (0.99: the top 1 %), each by the same amount",
        )
        keep: Keep = Field(
            default="first_fooled", description="first_fooled: per example the first "
            "misclassified iterate; last: the last iterate (foolbox's)",
        )

    params: Params

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.step_size: float = (default_step_size(self.eps, params.steps)
                                 if params.step_size is None else params.step_size)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs."""
        p = self.params
        return pgd_l1(model, x, y, eps=self.eps, steps=p.steps, step_size=self.step_size,
                      quantile=p.quantile, keep=p.keep)
