"""Shared attack steps: projections, random starts, gradient normalisation, loss gradients.

Plain functions, no classes, so every built-in attack (and any plugin) composes the same
pieces; what an attack object holds between its build and its calls (params, budget,
generator, the call's boundary) is the shell's, `pagctl.attacks.base.AttackBase`.
Perturbations ``delta`` have the inputs' shape ``(N, C, H, W)``; budgets are per example
(the norm of each ``delta[i]`` over all its pixels).

All functions leave their arguments unmodified and take the device from their tensor
arguments; random draws come from an explicit ``torch.Generator`` (never the global RNG),
are made on the generator's device and moved to the requested one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator
from torch import Tensor, nn

if TYPE_CHECKING:
    from pagctl.protocols import BuildContext

Norm = Literal["linf", "l2"]
"""The threat models every built-in attack handles."""
AnyNorm = Literal["linf", "l2", "l1"]
"""The dense threat models the steps handle; APGD, FAB, Square and AutoAttack also attack in
L1."""
BudgetNorm = Literal["linf", "l2", "l1", "l0"]
"""Every budget the contract checks (`pagctl.protocols.NORMS`) and :func:`fit_to_budget`
fits: the dense norms and ``l0``, the number of pixels changed (a pixel position where any
channel differs counts once), which only sparse attacks (Sparse-RS) take."""
Loss = Literal["ce", "margin"]
TargetChoice = Literal["least_likely", "random", "next"]
"""How a targeted attack picks each example's target class (:func:`choose_targets`)."""


def norm_name(value: object) -> object:
    """A norm's name as pagctl spells it: names are case-insensitive, so the reference
    implementations' ``Linf``, ``L2`` and ``L1`` (fra31/auto-attack, torchattacks) are
    ``linf``, ``l2`` and ``l1``. Anything else passes through unchanged to the field's own
    check (whose message then shows what was written)."""
    if isinstance(value, str) and value.lower() in get_args(AnyNorm):
        return value.lower()
    return value


NormParam = Annotated[Norm, BeforeValidator(norm_name)]
"""The type of an attack's ``norm`` Param: ``linf`` or ``l2``, written in any case."""
AnyNormParam = Annotated[AnyNorm, BeforeValidator(norm_name)]
"""The ``norm`` Param of an attack that also handles L1: ``linf``, ``l2`` or ``l1``, any case."""


def per_example(values: Tensor, like: Tensor) -> Tensor:
    """Reshape ``(N,)`` to ``(N, 1, 1, ...)`` so it broadcasts against ``like``."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def l2_norms(delta: Tensor) -> Tensor:
    """Per-example L2 norm. Shape: (N, ...) -> (N,)."""
    norms: Tensor = torch.linalg.vector_norm(delta.flatten(1), ord=2, dim=1)
    return norms


def linf_norms(delta: Tensor) -> Tensor:
    """Per-example L-infinity norm. Shape: (N, ...) -> (N,)."""
    return delta.flatten(1).abs().amax(dim=1)


def l1_norms(delta: Tensor) -> Tensor:
    """Per-example L1 norm. Shape: (N, ...) -> (N,)."""
    return delta.flatten(1).abs().sum(dim=1)


def l0_norms(delta: Tensor) -> Tensor:
    """Per-example number of pixels changed (all channels of a pixel count once), in
    ``delta``'s dtype: the contract's own count (`pagctl.protocols.perturbation_norms`).
    Shape: (N, C, H, W) -> (N,)."""
    from pagctl.protocols import perturbation_norms

    return perturbation_norms(delta, "l0")


def norms_of(delta: Tensor, norm: BudgetNorm) -> Tensor:
    """Per-example size of ``delta`` in ``norm`` (``l0``: pixels changed, ``delta`` (N, C, H,
    W)). Shape: (N, ...) -> (N,)."""
    if norm == "l0":
        return l0_norms(delta)
    if norm == "l2":
        return l2_norms(delta)
    return l1_norms(delta) if norm == "l1" else linf_norms(delta)


def project_l2(delta: Tensor, eps: float) -> Tensor:
    """Scale each example's ``delta`` onto the L2 ball of radius ``eps`` (if outside it).

    Examples already inside the ball are returned unchanged; the direction is kept.
    Shape: (N, ...) -> (N, ...).
    """
    norms = l2_norms(delta)
    tiny = torch.finfo(delta.dtype).tiny
    factor = torch.clamp(eps / norms.clamp_min(tiny), max=1.0)
    return delta * per_example(factor, delta)


def project_linf(delta: Tensor, eps: float) -> Tensor:
    """Clip every coordinate to ``[-eps, eps]``. Shape: (N, ...) -> (N, ...)."""
    return delta.clamp(-eps, eps)


def project_l1_box(x: Tensor, delta: Tensor, eps: float | Tensor) -> Tensor:
    """The Euclidean projection of ``x + delta`` onto the L1 ball of radius ``eps`` around
    ``x`` intersected with the [0, 1] box, returned as a perturbation of ``x``.

    Scaling ``delta`` down is not the projection here (it ignores the box and spreads the
    budget over every pixel); the projection soft-thresholds instead. The set is the box
    ``-room_i <= d_i <= room_i'`` intersected with ``‖d‖₁ <= eps``, so by the KKT conditions
    ``d_i = sign(delta_i) · clip(|delta_i| − λ, 0, u_i)`` with ``u_i`` the room toward the
    face ``delta_i`` points at (``1 − x_i`` or ``x_i``) and ``λ >= 0`` the smallest level
    with ``‖d‖₁ <= eps``. ``g(λ) = Σ clip(|delta_i| − λ, 0, u_i)`` is piecewise linear and
    non-increasing with kinks at ``|delta_i| − u_i`` (the coordinate leaves its face) and
    ``|delta_i|`` (it reaches zero); sorting the kinks gives ``g`` at every kink, the kink
    interval where ``g`` crosses ``eps`` and ``λ`` by linear interpolation there: exact, no
    iteration. ``x`` must lie in [0, 1]; ``eps`` is a number or a per-example (N,) tensor.

    Shape: (N, ...) twice -> (N, ...), in the dtype of ``delta``.
    """
    n = delta.shape[0]
    flat, base = delta.reshape(n, -1), x.reshape(n, -1).to(delta.dtype)
    size = flat.abs()
    room = torch.where(flat > 0, 1.0 - base, base).clamp_min(0.0)
    clipped = torch.minimum(size, room)
    budget = torch.as_tensor(eps, dtype=delta.dtype, device=delta.device).expand(n)
    over = clipped.sum(dim=1) > budget
    if not bool(over.any()):
        return (flat.sign() * clipped).reshape(delta.shape)
    # Kinks: a coordinate starts shrinking at |δ| − u (from 0 if that is negative) and is
    # zero from |δ| on; `active` after a kink counts the coordinates shrinking past it.
    kinks = torch.cat(((size - room).clamp_min(0.0), size), dim=1)
    change = torch.cat((torch.ones_like(size), -torch.ones_like(size)), dim=1)
    kinks, order = kinks.sort(dim=1)
    active = change.gather(1, order).cumsum(dim=1)
    drop = active[:, :-1] * kinks.diff(dim=1)
    g_at = clipped.sum(dim=1, keepdim=True) - torch.cat(
        (torch.zeros_like(drop[:, :1]), drop.cumsum(dim=1)), dim=1)
    # First kink where g <= eps (the last kink has g = 0); λ lies just before it.
    j = (g_at > budget[:, None]).sum(dim=1).clamp(1, kinks.shape[1] - 1)[:, None] - 1
    slope = active.gather(1, j).squeeze(1).clamp_min(1.0)
    level = kinks.gather(1, j).squeeze(1) + (g_at.gather(1, j).squeeze(1) - budget) / slope
    level = torch.where(over, level.clamp_min(0.0), torch.zeros_like(level))
    shrunk = torch.minimum((size - level[:, None]).clamp_min(0.0), room)
    # The level's rounding (float32, large |δ|) can leave the sum a hair over ε: scale back.
    total = shrunk.sum(dim=1)
    shrunk = shrunk * torch.where(total > budget, budget / total.clamp_min(1e-30),
                                  torch.ones_like(total))[:, None]
    return (flat.sign() * shrunk).reshape(delta.shape)


def random_start_l2(
    shape: tuple[int, ...] | torch.Size,
    eps: float,
    generator: torch.Generator,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Points drawn uniformly from the L2 ball of radius ``eps`` in ``d = prod(shape[1:])``
    dimensions, one per example: a Gaussian direction normalised to unit length, times the
    radius ``eps * U ** (1/d)`` with ``U ~ Uniform[0, 1)`` (the radius law of the uniform
    distribution on a ball, whose mean is ``d / (d + 1) * eps``).

    Shape: ``shape`` = (N, ...) -> (N, ...), on ``device`` (default: the generator's).
    """
    n = shape[0]
    d = 1
    for size in shape[1:]:
        d *= size
    gen_device = generator.device
    direction = torch.randn(tuple(shape), generator=generator, device=gen_device)
    direction = normalize_l2(direction)
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
    radius = (eps * u.pow(1.0 / d)).to(torch.float32)
    out = direction * per_example(radius, direction)
    # Rounding of the unit direction may push a point a hair outside the ball.
    out = project_l2(out, eps)
    return out.to(device=device if device is not None else gen_device, dtype=dtype)


def random_start_linf(
    shape: tuple[int, ...] | torch.Size,
    eps: float,
    generator: torch.Generator,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Points drawn uniformly from the cube ``[-eps, eps]^d``, one per example.

    Shape: ``shape`` = (N, ...) -> (N, ...), on ``device`` (default: the generator's).
    """
    u = torch.rand(tuple(shape), generator=generator, device=generator.device)
    out = project_linf((2.0 * u - 1.0) * eps, eps)
    return out.to(device=device if device is not None else generator.device, dtype=dtype)


def normalize_l2(grad: Tensor) -> Tensor:
    """Each example divided by its L2 norm; an all-zero example stays zero (never NaN).

    The example is first divided by its largest absolute entry, so the norm neither
    underflows for vanishing gradients nor overflows; no epsilon biases the step length.
    Shape: (N, ...) -> (N, ...), unit L2 norm per non-zero example.
    """
    tiny = torch.finfo(grad.dtype).tiny
    peak = linf_norms(grad).clamp_min(tiny)
    scaled = grad / per_example(peak, grad)
    norms = l2_norms(scaled).clamp_min(tiny)
    return scaled / per_example(norms, scaled)


def loss_per_example(logits: Tensor, labels: Tensor, loss: Loss) -> Tensor:
    """The loss to ascend for an untargeted attack. Shape: (N, K), (N,) -> (N,)."""
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if loss == "margin":
        true = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return others.amax(dim=1) - true
    raise ValueError(f"loss must be 'ce' or 'margin', got {loss!r}")


def choose_targets(
    rule: TargetChoice,
    labels: Tensor,
    num_classes: int,
    generator: torch.Generator,
    clean_logits: Tensor | None = None,
) -> Tensor:
    """Target classes, never the label: ``"least_likely"`` the lowest-scoring other class of
    ``clean_logits`` (required for this rule), ``"random"`` uniform among the other
    ``num_classes − 1`` classes (one draw per example from ``generator``), ``"next"``
    ``(label + 1) mod num_classes``. Shape: (N,) [, (N, K)] -> (N,) int64, on the labels'
    device."""
    if num_classes < 2:
        raise ValueError(f"a target class needs at least 2 classes, got {num_classes}")
    if rule == "least_likely":
        if clean_logits is None:
            raise ValueError("target 'least_likely' needs the clean logits")
        others = clean_logits.to(labels.device).scatter(1, labels[:, None], float("inf"))
        return others.argmin(dim=1)
    if rule == "random":
        shift = torch.randint(1, num_classes, (labels.shape[0],), generator=generator,
                              device=generator.device)
        return (labels + shift.to(labels.device)) % num_classes
    if rule == "next":
        return (labels + 1) % num_classes
    raise ValueError(f"target must be 'least_likely', 'random' or 'next', got {rule!r}")


def logits_and_gradient(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    loss: Loss = "ce",
    targeted: bool = False,
) -> tuple[Tensor, Tensor]:
    """One forward and one backward pass: the logits at ``x`` and the input gradient of the
    summed loss (see :func:`loss_gradient`). Works inside ``torch.no_grad()``; leaves no
    ``.grad`` on ``x`` or the model's parameters.

    Shape: (N, C, H, W), (N,) -> logits (N, num_classes) detached, gradient (N, C, H, W).
    """
    with torch.enable_grad():
        x_var = x.detach().requires_grad_(True)
        logits = model(x_var)
        per_example = loss_per_example(logits, labels, loss)
        total = -per_example.sum() if targeted else per_example.sum()
        (grad,) = torch.autograd.grad(total, x_var)
    return logits.detach(), grad.detach()


def loss_gradient(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    loss: Loss = "ce",
    targeted: bool = False,
) -> Tensor:
    """∇ₓ of the loss summed over the batch, so each row is its own example's gradient.

    ``loss``: "ce" (cross-entropy) or "margin" (best other logit minus the true one).
    Untargeted: the gradient of the loss w.r.t. ``labels`` (ascend it). Targeted: ``labels``
    are the target classes and the gradient of the *negated* loss is returned, so ascending
    the result always moves toward the attack's goal. Shape: (N, C, H, W), (N,) -> (N, C, H, W).
    """
    return logits_and_gradient(model, x, labels, loss, targeted)[1]


def keep_largest_pixels(x: Tensor, x_adv: Tensor, k: int) -> Tensor:
    """``x_adv`` with at most ``k`` pixels changed from ``x``: each example keeps the ``k``
    pixel positions whose change has the largest L2 norm over the channels (ties: the first
    in row-major order) and takes ``x`` elsewhere. That is the Euclidean projection onto the
    set of points differing from ``x`` in at most ``k`` pixels; examples already inside are
    returned unchanged. Shape: (N, C, H, W) twice -> (N, C, H, W)."""
    n, _, h, w = x_adv.shape
    delta = x_adv - x
    over = l0_norms(delta) > k
    if not bool(over.any()):
        return x_adv
    size = delta.pow(2).sum(dim=1).flatten(1)  # (N, H·W)
    order = size.sort(dim=1, descending=True, stable=True).indices[:, :k]
    keep = torch.zeros_like(size, dtype=torch.bool).scatter(1, order, True)
    keep = keep | ~over[:, None]
    return torch.where(keep.reshape(n, 1, h, w), x_adv, x)


def fit_to_budget(x: Tensor, x_adv: Tensor, norm: BudgetNorm, eps: float) -> Tensor:
    """Make ``x_adv`` satisfy ``‖x_adv - x‖ <= eps`` as the difference is computed in the
    inputs' dtype, and stay in [0, 1].

    ``x + delta - x`` need not equal ``delta`` in floating point; at small ε (8/255) the
    rounding of a pixel near 1 is a relative error of ~2e-6, enough to fail a strict budget
    check. Coordinates (L∞) or examples (L2, L1) that are over are nudged toward ``x``. In
    ``l0`` (``eps`` pixels, rounded down) an example that changes more pixels keeps its
    ``⌊eps⌋`` largest changes (:func:`keep_largest_pixels`) and takes ``x`` at the others.
    Shape: (N, C, H, W) twice -> (N, C, H, W).
    """
    x_adv = x_adv.clamp(0.0, 1.0)
    if norm == "l0":
        return keep_largest_pixels(x, x_adv, math.floor(eps + 1e-9))
    for attempt in range(16):
        delta = x_adv - x
        if norm == "linf":
            over = delta.abs() > eps
            if not bool(over.any()):
                return x_adv
            fitted = (x + project_linf(delta, eps)).clamp(0.0, 1.0)
            # Where clipping alone does not help (rounding), step one ulp toward x.
            fitted = torch.where((fitted - x).abs() > eps, torch.nextafter(fitted, x), fitted)
            x_adv = torch.where(over, fitted, x_adv)
        else:
            norms = l2_norms(delta) if norm == "l2" else l1_norms(delta)
            over = norms > eps
            if not bool(over.any()):
                return x_adv
            # Rounding re-randomises on each try, so the safety margin grows geometrically.
            margin = 1.0 - 1e-6 * 4.0**attempt
            shrink = eps / norms.clamp_min(torch.finfo(norms.dtype).tiny) * margin
            fitted = (x + delta * per_example(shrink, delta)).clamp(0.0, 1.0)
            x_adv = torch.where(per_example(over, x_adv), fitted, x_adv)
    raise RuntimeError("could not fit the adversarial inputs into the budget")  # pragma: no cover


def seeded_generator(seed: int | None, ctx: BuildContext) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with the run's seed when it is None."""
    return torch.Generator(device="cpu").manual_seed(ctx.seed if seed is None else seed)


def runs_together_field(runs: str) -> Any:
    """The ``runs_together`` parameter of an attack whose ``runs`` (e.g. "restarts, and
    target classes for apgd_t") can be stacked along the batch (`group_size`)."""
    from pydantic import Field

    return Field(
        default=None, ge=0, description=f"how many runs ({runs}) go through the model "
        "together, stacked along the batch: 0 = all of them, 1 = one after another as the "
        "reference; null = all on a CUDA device, one at a time elsewhere. Memory grows with "
        "the number. The same algorithm whatever the number (results agree up to "
        "floating-point rounding)")


def group_size(runs_together: int | None, runs: int, device: torch.device) -> int:
    """How many of an attack's ``runs`` (restarts, target classes) go through the model
    together: ``runs_together`` when given (0: all of them); by default (None) all of them on
    a CUDA device, where one call of the stacked batch costs about what one run's call does,
    and one at a time elsewhere: on the CPU the arithmetic, not the per-call overhead, is the
    cost, and stacking measured 1.15–1.4× slower (the digits CNN, 40 robust points)."""
    if runs_together is None:
        return runs if device.type == "cuda" else 1
    if runs_together < 0:
        raise ValueError(f"runs_together must be >= 0 (0: all runs together), got "
                         f"{runs_together}")
    return runs if runs_together == 0 else runs_together


class BestSoFar:
    """The per-example worst case over several runs (restarts, targets).

    Each example keeps the first misclassified point any run found, else the point of highest
    loss; later runs attack only the examples in ``active()``.
    Shape: points (N, C, H, W), loss (N,), fooled (N,) bool.
    """

    def __init__(self, x0: Tensor, fooled: Tensor | None = None) -> None:
        n = x0.shape[0]
        self.points = x0.clone()
        self.loss = torch.full((n,), float("-inf"), dtype=x0.dtype, device=x0.device)
        self.fooled = (fooled.clone() if fooled is not None
                       else torch.zeros(n, dtype=torch.bool, device=x0.device))

    def active(self) -> Tensor:
        """Positions of the examples not yet misclassified. Shape: (M,) int64."""
        return (~self.fooled).nonzero().squeeze(1)

    def update(self, active: Tensor, points: Tensor, loss: Tensor, found: Tensor) -> None:
        """Merge one run over ``active``: its points, their loss, and which are fooled. An
        example an earlier run fooled keeps that run's point (runs batched together may
        cover it too)."""
        take = ~self.fooled[active] & (found | (loss.to(self.loss.dtype) > self.loss[active]))
        self.points[active[take]] = points[take]
        self.loss[active[take]] = loss[take].to(self.loss.dtype)
        self.fooled[active[found]] = True


def restarted_search(model: nn.Module, x0: Tensor, y: Tensor, restarts: int, counts: Tensor,
                     run: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
                     ) -> BestSoFar:
    """A score-based search (Square, Sparse-RS) restarted ``restarts`` times: the clean
    forward first (one query per example, added to ``counts``; examples it misclassifies are
    never attacked), then each run ``run(x, y, run_counts)`` on the examples no earlier run
    fooled, returning (points, loss, fooled) and adding its queries per example to
    ``run_counts``. Call it under ``torch.no_grad()``. Shape: x0 (N, C, H, W), y (N,),
    counts (N,) int64."""
    runs = BestSoFar(x0, fooled=model(x0).argmax(dim=1) != y)
    counts += 1
    for _ in range(restarts):
        active = runs.active()
        if active.numel() == 0:
            break
        run_counts = torch.zeros(active.numel(), dtype=torch.int64, device=x0.device)
        runs.update(active, *run(x0[active], y[active], run_counts))
        counts[active] += run_counts
    return runs

