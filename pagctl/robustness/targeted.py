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
    """Targeted PGD on the cross-entropy toward every class (`pagctl.attacks.pgd.pgd` with
    ``targets``, from the image itself, the last iterate), inside the ``norm`` ball of
    radius ``eps``, in eval mode (restored afterwards).
    Shape: (k, C, H, W) in [0, 1] -> (k, num_classes, C, H, W) in [0, 1].
    """
    import torch

    from pagctl.attacks.pgd import pgd
    from pagctl.models import eval_mode

    k = x.shape[0]
    xs = x.repeat_interleave(num_classes, dim=0)
    targets = torch.arange(num_classes, device=x.device).repeat(k)
    with eval_mode(model):
        # the labels only decide which iterate is kept, and keep="last" keeps the last
        out = pgd(model, xs, targets, norm="l2" if norm == "l2" else "linf", eps=eps,
                  steps=steps, step_size=eps * max(2.5 / steps, 0.05), random_start=False,
                  restarts=1, generator=torch.Generator(), keep="last", targets=targets)
    return out.reshape(k, num_classes, *x.shape[1:])
