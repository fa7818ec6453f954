"""Square Attack (Andriushchenko et al., ECCV 2020): a score-based black-box attack, L∞, L2
and L1.

The attack only queries the model's logits, under ``torch.no_grad()``; it never asks for a
gradient, so gradient masking does not stop it. Each iteration proposes a change confined
to one random square window (shared by the batch, as in the paper; the signs are drawn per
example and channel) and keeps it for the examples whose loss improves.

L1 (Croce et al., "Mind the box", ICML 2021) follows the reference code's L1 branch: the
L2 construction with L1 pieces. The patterns' rings weigh ``1/(k+1)⁴`` (not ``1/(k+1)²``)
and have unit L1 norm; masses are L1 norms; and instead of rescaling, every point is the
exact projection onto the L1 ball of radius ``ε (1 − 1e-6)`` intersected with the [0, 1]
box (:func:`pagctl.attacks.steps.project_l1_box`).

Per example, the returned point is the first query the model misclassifies; if none is, the
best-loss point over all restarts. Query accounting: one clean forward pass for the whole
call (examples misclassified clean are returned unchanged), then at most ``queries``
forwards per example and restart (the initial point counts as one); examples stop being
queried once misclassified, and later restarts only attack the examples not yet fooled.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.steps import (
    AnyNorm,
    AnyNormParam,
    Loss,
    fit_to_budget,
    l1_norms,
    loss_per_example,
    project_l1_box,
    restarted_search,
)
from pagctl.protocols import Epsilon, PluginParams

# (fraction of the 10,000-query reference budget after which p is divided by the factor).
_SCHEDULE: tuple[tuple[int, int], ...] = (
    (8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32),
    (500, 16), (200, 8), (50, 4), (10, 2),
)


def p_schedule(p_init: float, iteration: int, queries: int, rescale: bool = True) -> float:
    """The paper's piecewise-constant fraction of pixels changed at ``iteration``.

    The breakpoints are defined for a budget of 10,000 queries; ``rescale`` stretches them
    to ``queries`` (AutoAttack keeps them as they are).
    """
    it = int(iteration / queries * 10000) if rescale else iteration
    for start, factor in _SCHEDULE:
        if it > start:
            return p_init / factor
    return p_init


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[0, high)`` from ``generator``."""
    return int(torch.randint(high, (1,), generator=generator).item())


def _signs(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Uniform ±1 of ``shape`` on ``like``'s device and dtype."""
    draw = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (2 * draw - 1).to(device=like.device, dtype=like.dtype)


def _pattern_size(pattern: Tensor, norm: AnyNorm) -> Tensor:
    """The L2 (``norm="l2"``) or L1 (``norm="l1"``) norm of a whole pattern.

    The reference code's L1 branch writes ``delta.abs().sum(dim=(), keepdim=True)``; in the
    installed torch (2.x) an empty ``dim`` tuple reduces over *all* dimensions, so that is
    the L1 norm of the whole 2-D pattern, not the identity. We compute that deliberately.
    Shape: (rows, cols) -> ().
    """
    size: Tensor = torch.linalg.vector_norm(pattern, ord=1 if norm == "l1" else 2)
    return size


def _rectangle_pattern(rows: int, cols: int, norm: AnyNorm = "l2") -> Tensor:
    """Concentric rectangles centred in a ``rows × cols`` patch: weight 1/(k+1)² for ring k
    and unit L2 norm (``norm="l2"``), or 1/(k+1)⁴ and unit L1 norm (``norm="l1"``); all
    zeros for an empty patch. Shape: -> (rows, cols) float64."""
    out = torch.zeros(rows, cols, dtype=torch.float64)
    if rows == 0 or cols == 0:
        return out
    power = 4 if norm == "l1" else 2
    r0, c0 = rows // 2, cols // 2
    for k in range(max(r0, c0) + 1):
        out[max(r0 - k, 0): min(r0 + k + 1, rows), max(c0 - k, 0): min(c0 + k + 1, cols)] += (
            1.0 / (k + 1) ** power
        )
    return out / _pattern_size(out, norm)


def _meta_pattern(s: int, generator: torch.Generator, norm: AnyNorm = "l2") -> Tensor:
    """The paper's square pattern: two halves of opposite sign, each a stack of concentric
    rectangles (:func:`_rectangle_pattern` in ``norm``), unit norm in ``norm`` (L2 or L1),
    transposed with probability 1/2.

    Shape: -> (s, s) float64.
    """
    out = torch.zeros(s, s, dtype=torch.float64)
    half = s // 2
    out[:half] = _rectangle_pattern(half, s, norm)
    out[half:] = -_rectangle_pattern(s - half, s, norm)
    out = out / _pattern_size(out, norm)
    if _randint(2, generator) == 1:
        out = out.t().contiguous()
    return out


def _init_linf(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """Vertical stripes: each column of each channel shifted by ±eps. Shape: like ``x``."""
    n, c, _, w = x.shape
    return (x + eps * _signs((n, c, 1, w), generator, x)).clamp(0.0, 1.0)


def _tiles(x: Tensor, generator: torch.Generator, norm: AnyNorm) -> Tensor:
    """A grid of ``s × s`` meta-pattern tiles in ``norm`` (L2 or L1), ``s = min(H, W) // 5``,
    each with a random sign per example and channel; the grid starts where five tiles would
    be centred and is cut at the border. Shape: like ``x`` (a perturbation)."""
    n, c, h, w = x.shape
    s = max(min(h, w) // 5, 1)
    delta = torch.zeros_like(x)
    top = (h - 5 * s) // 2 if h >= 5 * s else 0
    for _ in range(h // s):
        left = (w - 5 * s) // 2 if w >= 5 * s else 0
        for _ in range(w // s):
            tile = _meta_pattern(s, generator, norm).to(device=x.device, dtype=x.dtype)
            rows, cols = min(s, h - top), min(s, w - left)
            if rows > 0 and cols > 0:
                delta[:, :, top: top + rows, left: left + cols] += (
                    tile[:rows, :cols] * _signs((n, c, 1, 1), generator, x)
                )
            left += s
        top += s
    return delta


def _init_l2(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """L2 meta-pattern tiles (:func:`_tiles`) scaled to L2 norm ``eps``, then clipped to
    [0, 1]. Shape: like ``x``."""
    return (x + _scale_to(_tiles(x, generator, "l2"), eps)).clamp(0.0, 1.0)


L1_RADIUS_FACTOR = 1.0 - 1e-6
"""L1 points are projected onto the ball of radius ``eps · L1_RADIUS_FACTOR`` (as the reference)."""


def _onto_l1_ball(x: Tensor, delta: Tensor, eps: float) -> Tensor:
    """``x`` plus the projection of ``delta`` onto the L1 ball of radius ``eps (1 − 1e-6)``
    ∩ the [0, 1] box. The clamp only removes rounding (it moves toward ``x``).
    Shape: like ``x``."""
    return (x + project_l1_box(x, delta, eps * L1_RADIUS_FACTOR)).clamp(0.0, 1.0)


def _init_l1(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """L1 meta-pattern tiles (:func:`_tiles`, unit L1 norm each, not rescaled) projected
    onto the L1 ball ∩ box, as the reference does. Shape: like ``x``."""
    return _onto_l1_ball(x, _tiles(x, generator, "l1"), eps)


def _l2(delta: Tensor) -> Tensor:
    """Per-example L2 norm, broadcastable. Shape: (N, C, H, W) -> (N, 1, 1, 1)."""
    norms: Tensor = torch.linalg.vector_norm(delta.flatten(1), dim=1)
    return norms.reshape(-1, 1, 1, 1)


def _scale_to(delta: Tensor, eps: float) -> Tensor:
    """Each example rescaled to L2 norm ``eps`` (zero stays zero). Shape: like ``delta``."""
    return delta * (eps / _l2(delta).clamp_min(torch.finfo(delta.dtype).tiny))


_SIGN_TRIES = 11  # one draw and up to ten redraws, as the original Square code allows


def _propose_linf(
    x: Tensor, best: Tensor, eps: float, p: float, generator: torch.Generator
) -> Tensor:
    """Set one random square (shared by the batch) to ±eps per example and channel.

    Examples whose square would not change after clipping take their next sign draw (up to
    ten more): all eleven draws are made at once and each example keeps its first that
    changes the square (its last if none does), so the device is never asked in between.
    Shape: (N, C, H, W) twice -> (N, C, H, W).
    """
    n, c, h, w = x.shape
    side = min(max(int(round(math.sqrt(p * h * w))), 1), max(min(h, w) - 1, 1))
    top, left = _randint(h - side + 1, generator), _randint(w - side + 1, generator)
    window = (slice(None), slice(None), slice(top, top + side), slice(left, left + side))
    x_win, best_win = x[window], best[window]
    # A channel's square is unchanged by sign +1 (or -1) when every clipped pixel equals
    # ``best``'s; a draw leaves the example unchanged when that holds for all its channels.
    unchanged = torch.stack([
        ((x_win + sign * eps).clamp(0.0, 1.0) - best_win).abs().lt(1e-7).flatten(2).all(dim=2)
        for sign in (-1.0, 1.0)])  # (2, N, C): [0] for -1, [1] for +1
    signs = _signs((_SIGN_TRIES * n, c, 1, 1), generator, x).reshape(_SIGN_TRIES, n, c)
    plus = signs > 0
    same = torch.where(plus, unchanged[1], unchanged[0]).all(dim=2)  # (T, N)
    changes = ~same
    changes[-1] = True  # the last draw is kept where none changes the square
    first = changes.to(torch.int8).argmax(dim=0)  # the first draw that changes it
    chosen = signs[first, torch.arange(n, device=signs.device)].reshape(n, c, 1, 1)
    values = (x_win + eps * chosen).clamp(0.0, 1.0)
    out = best.clone()
    out[window] = values
    return out


Window = tuple[slice, slice, slice, slice]


def _two_windows(
    x: Tensor, p: float, generator: torch.Generator,
) -> tuple[int, Window, Window, Tensor]:
    """The L2/L1 proposal's two random windows of odd side ``≈ sqrt(p H W)`` (at least 3, at
    most ``min(H, W)``), shared by the batch: the side, both windows as index tuples, and
    the (1, 1, H, W) mask of their union. Draws window 1's then window 2's position."""
    _, _, h, w = x.shape
    side = max(int(round(math.sqrt(p * h * w))), 3)
    if side % 2 == 0:
        side += 1
    side = min(side, h, w)
    top1, left1 = _randint(h - side + 1, generator), _randint(w - side + 1, generator)
    top2, left2 = _randint(h - side + 1, generator), _randint(w - side + 1, generator)
    win1 = (slice(None), slice(None), slice(top1, top1 + side), slice(left1, left1 + side))
    win2 = (slice(None), slice(None), slice(top2, top2 + side), slice(left2, left2 + side))
    mask = torch.zeros((1, 1, h, w), dtype=x.dtype, device=x.device)
    mask[win1] = 1.0
    mask[win2] = 1.0
    return side, win1, win2, mask


def _propose_l2(
    x: Tensor, best: Tensor, eps: float, p: float, generator: torch.Generator
) -> Tensor:
    """The paper's L2 step: a new meta-pattern in square 1 (added to its old, normalised
    content), square 2 emptied, the mass of both squares plus the unused budget moved into
    square 1, and the whole perturbation rescaled to norm ``eps`` (then clipped to [0, 1]).

    Shape: (N, C, H, W) twice -> (N, C, H, W).
    """
    n, c, _, _ = x.shape
    delta = best - x
    side, win1, win2, mask = _two_windows(x, p, generator)
    norm_win1 = delta[win1].pow(2).sum(dim=(2, 3), keepdim=True).sqrt()  # (N, C, 1, 1)
    norm_both = (delta * mask).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()  # (N, C, 1, 1)
    norm_image = _l2(delta)  # (N, 1, 1, 1)
    pattern = _meta_pattern(side, generator).to(device=x.device, dtype=x.dtype)
    new = pattern.expand(n, c, side, side) * _signs((n, c, 1, 1), generator, x)
    new = new + delta[win1] / (norm_win1 + 1e-10)
    room = ((eps**2 - norm_image.pow(2)).clamp_min(0.0) / c + norm_both.pow(2)).sqrt()
    new = new / new.pow(2).sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-30) * room
    delta = delta.clone()
    delta[win2] = 0.0
    delta[win1] = new
    return (x + _scale_to(delta, eps)).clamp(0.0, 1.0)


def _propose_l1(
    x: Tensor, best: Tensor, eps: float, p: float, generator: torch.Generator
) -> Tensor:
    """The reference's L1 step: the L2 step with L1 norms. A new L1 meta-pattern in square 1
    (added to its old content normalised to unit L1 norm per example and channel), square
    2 emptied, square 1 rescaled to hold the mass of both squares plus the unused budget,
    and the whole perturbation projected onto the L1 ball ∩ box (radius ``eps (1 − 1e-6)``).

    Per channel the reference gives square 1 the mass ``(unused / C + both) · C``, where
    ``both`` is that channel's L1 mass in the two squares: ``unused + both`` for one channel,
    more for several (the projection then trims the excess). Kept as written there.
    Shape: (N, C, H, W) twice -> (N, C, H, W).
    """
    n, c, _, _ = x.shape
    delta = best - x
    side, win1, win2, mask = _two_windows(x, p, generator)
    mass_win1 = delta[win1].abs().sum(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
    mass_both = (delta * mask).abs().sum(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
    unused = (eps - l1_norms(delta)).clamp_min(0.0).reshape(n, 1, 1, 1)
    pattern = _meta_pattern(side, generator, "l1").to(device=x.device, dtype=x.dtype)
    new = pattern.expand(n, c, side, side) * _signs((n, c, 1, 1), generator, x)
    new = new + delta[win1] / (mass_win1 + 1e-12)
    mass = (unused / c + mass_both) * c
    new = new / (new.abs().sum(dim=(2, 3), keepdim=True) + 1e-12) * mass
    delta = delta.clone()
    delta[win2] = 0.0
    delta[win1] = new
    return _onto_l1_ball(x, delta, eps)


_INIT = {"linf": _init_linf, "l2": _init_l2, "l1": _init_l1}
_PROPOSE = {"linf": _propose_linf, "l2": _propose_l2, "l1": _propose_l1}


def _single_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: AnyNorm,
    eps: float,
    queries: int,
    p_init: float,
    loss: Loss,
    generator: torch.Generator,
    counts: Tensor,
    rescale: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Square Attack run of at most ``queries`` forwards per example; adds the forwards
    spent on each example to ``counts``. Returns (points, loss at the points, fooled mask).

    Shape: (N, C, H, W), (N,) -> (N, C, H, W), (N,), (N,) bool.
    """
    propose, init = _PROPOSE[norm], _INIT[norm]
    best = init(x, eps, generator)
    logits = model(best)
    best_loss = loss_per_example(logits, y, loss)
    fooled = logits.argmax(dim=1) != y
    counts += 1
    for iteration in range(queries - 1):
        active = (~fooled).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        p = p_schedule(p_init, iteration, queries, rescale)
        x_act, y_act, x_best_act = x[active], y[active], best[active]
        candidate = propose(x_act, x_best_act, eps, p, generator)
        logits = model(candidate)
        cand_loss = loss_per_example(logits, y_act, loss)
        hit = logits.argmax(dim=1) != y_act
        take = hit | (cand_loss > best_loss[active])
        # Written back through the integer index ``active`` with torch.where, not through
        # boolean masks: a mask index waits for the device to count its rows, four waits per
        # query on a GPU; the one left is ``nonzero`` above.
        best[active] = torch.where(take.reshape(-1, 1, 1, 1), candidate, x_best_act)
        best_loss[active] = torch.where(take, cand_loss, best_loss[active])
        fooled[active] = fooled[active] | hit
        counts[active] += 1
    return best, best_loss, fooled


def square_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: AnyNorm,
    eps: float,
    queries: int,
    p_init: float,
    restarts: int,
    loss: Loss,
    generator: torch.Generator,
    counts: Tensor | None = None,
    rescale_schedule: bool = True,
) -> Tensor:
    """Untargeted Square Attack inside the ``norm`` ball of radius ``eps`` around ``x`` and the
    [0, 1] box, using only the model's outputs (no gradients).

    ``counts`` (N,) int64, when given, receives the number of forwards spent per example
    (the clean pass included). Runs in whatever mode the caller left ``model`` in.
    Shape: inputs (N, C, H, W) in [0, 1], labels (N,) -> (N, C, H, W), same dtype/device.
    """
    if norm not in _INIT:
        raise ValueError(f"norm must be 'linf', 'l2' or 'l1', got {norm!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if queries < 1 or restarts < 1:
        raise ValueError(f"queries and restarts must be >= 1, got {queries} and {restarts}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    if x.dim() != 4:
        raise ValueError(f"square: expected inputs (N, C, H, W), got {tuple(x.shape)}")
    x0 = x.detach()
    n = x0.shape[0]
    if counts is None:
        counts = torch.zeros(n, dtype=torch.int64, device=x0.device)
    if eps == 0 or n == 0:
        return x0.clone()
    y = y.to(x0.device)
    with torch.no_grad():
        runs = restarted_search(model, x0, y, restarts, counts, lambda xs, ys, run_counts:
                                _single_run(model, xs, ys, norm=norm, eps=eps, queries=queries,
                                            p_init=p_init, loss=loss, generator=generator,
                                            counts=run_counts, rescale=rescale_schedule))
    return fit_to_budget(x0, runs.points, norm, eps)


class Square(AttackBase):
    """Square Attack: random-search black-box attack on the model's scores, L∞, L2 or L1."""

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="radius in [0, 1] pixel space, in the chosen norm (number or fraction "
            "string such as \"8/255\")",
        )
        norm: AnyNormParam = Field(
            default="linf", description="threat model: 'linf', 'l2' or 'l1' (any case)",
        )
        queries: int = Field(
            default=5000, ge=1,
            description="model queries per example and restart (the initial point included)",
        )
        p_init: float = Field(
            default=0.8, gt=0, le=1, allow_inf_nan=False,
            description="initial fraction of pixels in the square; decays on the paper's "
            "schedule (defined for 10,000 queries, rescaled to `queries`)",
        )
        restarts: int = Field(
            default=1, ge=1, description="independent runs; later runs only attack the "
            "examples not yet misclassified",
        )
        seed: int | None = Field(
            default=None, description="seed of the random squares; null = the run's seed",
        )
        loss: Literal["margin", "ce"] = Field(
            default="margin", description="score to increase: 'margin' (best other logit "
            "minus the true one) or 'ce' (cross-entropy)",
        )
        rescale_schedule: bool = Field(
            default=True, description="stretch the p schedule (defined for 10,000 queries) "
            "to `queries`; AutoAttack runs 5,000 queries without stretching",
        )

    params: Params
    norm: AnyNorm  # its Params take no l0

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs
        (`pagctl.attacks.base.AttackBase`: successive calls continue one seeded stream)."""
        p = self.params
        return square_attack(
            model, x, y, norm=self.norm, eps=self.eps, queries=p.queries,
            p_init=p.p_init, restarts=p.restarts, loss=p.loss, generator=self.generator,
            rescale_schedule=p.rescale_schedule,
        )

    def passes_per_point(self) -> int:
        """The most forwards one call spends on a point (`pagctl.protocols
        .declared_passes`): the clean forward and ``queries`` per restart. An upper bound:
        a point stops being queried once misclassified."""
        return 1 + self.params.restarts * self.params.queries
