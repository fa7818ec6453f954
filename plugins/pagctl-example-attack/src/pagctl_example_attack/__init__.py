"""``noise``: the random-noise baseline attack, as a pagctl attack plugin.

Every robustness table should show random noise next to the gradient attacks. If a
"robust" model falls to random noise of the budget's size, or if a gradient attack barely
beats noise, something is off (a broken attack, masked gradients, a wrong budget).

This package is also the template for third-party attacks. A pagctl attack plugin is

- a class registered under the entry-point group ``pagctl.attacks`` (see pyproject.toml),
- with a nested pydantic ``Params`` model (inherit :class:`pagctl.protocols.PluginParams`:
  frozen, unknown keys rejected; the ``Field`` descriptions are the parameter help),
- built once as ``NoiseAttack(params, ctx)`` and then called as
  ``attack(model, inputs, labels)`` on batches of [0, 1] pixels, returning adversarial
  inputs of the same shape, dtype and device, in [0, 1] and inside the budget. It must not
  modify ``inputs``, change the model's train/eval mode, or draw from the global RNG.

The class builds on :class:`pagctl.attacks.base.AttackBase`, the shell pagctl's own attacks
use: it holds the params, the context, the budget (``eps``, ``norm``) and a seeded
``generator``, and its ``__call__`` handles an empty batch or ``eps = 0``, moves the labels to
the inputs' device and fits the result into the budget, so the plugin writes only
``perturb``. Subclassing it is a convenience, not the contract: a class with its own
``__init__(params, ctx)`` and ``__call__`` works as well.

The tests call ``pagctl.testing``'s conformance checks, the ones pagctl runs on its
built-ins (``check_attack`` and the behaviour checks); see tests/test_noise.py.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.steps import (
    Norm,
    NormParam,
    fit_to_budget,
    normalize_l2,
    random_start_l2,
    random_start_linf,
)
from pagctl.protocols import Epsilon, PluginParams

__all__ = ["NoiseAttack"]
__version__ = "0.1.0"


class NoiseAttack(AttackBase):
    """Random noise in the eps-ball or on its sphere: the baseline gradient attacks must beat.

    Each point gets up to ``samples`` independent draws; the first draw the model
    misclassifies is returned, else the last one. Only the points not yet misclassified are
    queried again, so a point costs at most ``samples`` forward passes and no gradient.
    Successive calls continue one random stream, seeded from ``seed`` (or the run's seed).
    """

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="radius of the noise in [0, 1] pixel space, in the chosen norm "
            "(number or fraction string such as \"8/255\")",
        )
        norm: NormParam = Field(
            default="linf", description="'linf' (a box of half-width eps around each pixel) "
            "or 'l2' (a ball of radius eps over the whole image)",
        )
        distribution: Literal["uniform", "sphere"] = Field(
            default="uniform", description="'uniform': uniform in the ball (L2) or box "
            "(linf); 'sphere': on its boundary (L2 norm exactly eps; linf: +-eps per pixel, "
            "random signs). Clipping to [0, 1] can only shorten a draw",
        )
        samples: int = Field(
            default=10, ge=1, description="draws per point; the first misclassified draw is "
            "kept (one forward pass per draw, no gradients)",
        )
        seed: int | None = Field(
            default=None, description="seed of the noise; null = the run's seed",
        )

    params: Params
    norm: Norm

    def _draw(self, like: Tensor) -> Tensor:
        """One perturbation per example, drawn on the CPU (so a seed gives the same noise on
        every device) and moved to ``like``'s device and dtype. Shape: like (N, C, H, W)."""
        shape, eps, g = like.shape, self.eps, self.generator
        if self.params.distribution == "uniform":
            draw = random_start_l2 if self.norm == "l2" else random_start_linf
            return draw(shape, eps, g, device=like.device, dtype=like.dtype)
        if self.norm == "l2":
            delta = normalize_l2(torch.randn(shape, generator=g)) * eps
        else:
            delta = (torch.randint(0, 2, shape, generator=g) * 2 - 1).float() * eps
        return delta.to(device=like.device, dtype=like.dtype)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) noisy inputs, within ``eps``
        of ``x`` in ``norm`` and in [0, 1]. ``AttackBase.__call__`` calls it on a non-empty
        batch with ``eps > 0``, ``x`` detached and ``y`` on its device."""
        out = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.params.samples):
            # Draw for the whole batch every time, so the noise a point gets does not
            # depend on which other points are already misclassified.
            candidate = fit_to_budget(x, x + self._draw(x), self.norm, self.eps)
            active = (~fooled).nonzero().squeeze(1)
            out[active] = candidate[active]
            with torch.no_grad():
                predicted = model(candidate[active]).argmax(dim=1)
            fooled[active] = predicted != y[active]
            if bool(fooled.all()):
                break
        return out
