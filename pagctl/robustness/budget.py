"""Implausible budgets: an ε that holds the whole [0, 1] pixel box.

Pixels are in [0, 1], so an L∞ ball of radius 1 around any image holds every image of its
shape, as does an L2 ball of radius √d or an L1 ball of radius d (d = C·H·W, the box's
diameter in each norm), or an L0 budget of H·W pixels (every pixel may change). At such an
ε nothing can be robust, and the number recorded measures nothing: almost always an ε
meant on the 0-255 scale (``eps=8`` for 8/255). It is
warned about, not refused (a sweep may reach it on purpose); ``pagctl attack --strict``
refuses it. The attack evaluation (`pagctl.robustness.evaluate.evaluate_attack`, which the
CLI and `pagctl.api.attack` both call) and adversarial training's inner attack
(`pagctl.objectives.InnerAttack`) check it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from pagctl.errors import FieldError, PagctlWarning

__all__ = ["box_radius", "check_budget", "implausible_budget"]


def box_radius(norm: str, input_shape: Sequence[int]) -> float | None:
    """The radius, in ``norm``, of a ball around any image that holds every image of
    ``input_shape`` ((C, H, W), pixels in [0, 1]): 1 for L∞, √d for L2, d for L1, H·W
    pixels for L0; None for a norm it does not know."""
    d = math.prod(input_shape)
    pixels = float(math.prod(input_shape[1:]))
    return {"linf": 1.0, "l2": math.sqrt(d), "l1": float(d), "l0": pixels}.get(norm)


def implausible_budget(norm: str | None, eps: float | None,
                       input_shape: Sequence[int]) -> str | None:
    """Why ``eps`` in ``norm`` measures nothing on images of ``input_shape`` (its ball holds
    the whole pixel box), with the likely intended value; None for a plausible one (or
    when the norm or eps is not known)."""
    if norm is None or eps is None:
        return None
    radius = box_radius(norm, input_shape)
    if radius is None or eps < radius:
        return None
    if norm == "l0":
        return (f"{eps:g} pixels (L0) >= the image's {radius:g} pixels: every pixel may "
                "change, so nothing can be robust")
    label = {"linf": "L∞", "l2": "L2", "l1": "L1"}[norm]
    bound = "1" if norm == "linf" else f"{radius:.4g} (the box's {label} diameter)"
    return (f"{eps:g} is an {label} radius >= {bound} on [0, 1] pixels: its ball holds "
            f"every image, so nothing can be robust; for the 0-255 scale's {eps:g} give "
            f"e.g. eps={eps:g}/255")


def check_budget(field: str, norm: str | None, eps: float | None,
                 input_shape: Sequence[int], *, refuse: bool = False,
                 stacklevel: int = 3) -> str | None:
    """`implausible_budget` of ``field`` (``params.eps``): a `FieldError` with ``refuse``,
    else a `PagctlWarning` (``field: why``), whose text it returns; None when plausible."""
    why = implausible_budget(norm, eps, input_shape)
    if why is None:
        return None
    if refuse:
        raise FieldError(field, why)
    text = f"{field}: {why}"
    warnings.warn(text, PagctlWarning, stacklevel=stacklevel)
    return text
