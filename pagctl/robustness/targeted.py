"""Targeted PGD toward every class: what a model's gradients "think" each class looks like.

Inside a large ε-ball the image is pushed toward each class in turn; for a model with
perceptually aligned gradients the result looks like that class (the paper's qualitative
figure). ``pagctl attack --save-images`` draws it (`pagctl.figures.class_grid`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor, nn


def turn_toward_classes(model: nn.Module, x: Tensor, *, num_classes: int, norm: str,
                        eps: float, steps: int = 60) -> Tensor:
    """Targeted PGD on the cross-entropy toward every class, inside the ``norm`` ball of
    radius ``eps``, in eval mode (restored afterwards).
    Shape: (k, C, H, W) in [0, 1] -> (k, num_classes, C, H, W) in [0, 1].
    """
    import torch

    from pagctl.attacks.steps import (
        fit_to_budget,
        loss_gradient,
        normalize_l2,
        project_l2,
        project_linf,
    )
    from pagctl.models import eval_mode

    k = x.shape[0]
    xs = x.repeat_interleave(num_classes, dim=0)
    targets = torch.arange(num_classes, device=x.device).repeat(k)
    step = eps * max(2.5 / steps, 0.05)
    x_k = xs.clone()
    with eval_mode(model):
        for _ in range(steps):
            grad = loss_gradient(model, x_k, targets, "ce", targeted=True)
            move = normalize_l2(grad) if norm == "l2" else grad.sign()
            delta = x_k + step * move - xs
            delta = project_l2(delta, eps) if norm == "l2" else project_linf(delta, eps)
            x_k = (xs + delta).clamp(0.0, 1.0)
    out = fit_to_budget(xs, x_k, "l2" if norm == "l2" else "linf", eps)
    return out.reshape(k, num_classes, *x.shape[1:])
