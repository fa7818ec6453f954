"""Carlini–Wagner L2 attack (Carlini & Wagner, IEEE S&P 2017): a minimum-norm attack.

One function, :func:`cw_l2`, does the work; ``CWL2`` is its plugin. Per example, it
minimises over ``w``

    ``‖x_adv − x‖²₂ + c · f(x_adv)``,  ``x_adv = (tanh(w) + 1) / 2``

(the change of variables keeps ``x_adv`` in [0, 1] without clipping), with the paper's
margin loss ``f = max(z_y − max_{i≠y} z_i, −κ)`` (untargeted) or
``f = max(max_{i≠t} z_i − z_t, −κ)`` (targeted at class ``t``) on the logits ``z``:

- ``w`` starts at ``atanh(2x − 1)`` with ``2x − 1`` clamped to ``[−1 + 1e-6, 1 − 1e-6]``, so
  pixels on the box faces start within 5e-7 of ``x`` (and, as in the paper, move slowly:
  ``tanh`` is flat there);
- Adam (β = 0.9, 0.999, ε = 1e-8, the ``torch.optim.Adam`` update) on ``w``, ``steps``
  iterations, its state and ``w`` reset at every value of ``c``. The learning rate is
  constant (the paper) or, by default, annealed along a half cosine to 1/100 of itself;
- binary search over ``c``, per example: start at ``initial_const``; after a run that
  succeeded, ``c`` becomes the midpoint between the largest failing and the smallest
  succeeding ``c``; after a failing run, the midpoint if a succeeding ``c`` is known, else
  ``10 c``. With 10 or more search steps the last one reruns at the smallest succeeding
  ``c`` (the paper's code);
- optional early abort, per example: every ``max(steps // 10, 1)`` iterations, an example
  whose objective has not decreased by 0.01 % since the last check stops for that ``c``;
- a point is adversarial when the argmax of its logits, with the true logit raised by ``κ``,
  is not ``y`` (untargeted; at ``κ = 0`` exactly ``argmax ≠ y``), or when the argmax with the
  target logit lowered by ``κ`` is ``t`` (targeted; the paper's check). Every iterate is
  checked (the point before each Adam update, and the final one), and each example keeps
  the smallest-L2 adversarial point over all iterations and all ``c``.

Two changes to the paper make short runs accurate. (1) A run counts as a success for the
search only if it found an adversarial point in its last 20 % of iterations (or at the
point where an early abort stopped it). Early iterates, before Adam settles, overshoot the
boundary even at a ``c`` too small for the optimum to cross it; counting them (as the paper
does) stops the search below the ``c`` at which the optimisation converges onto the
boundary. On linear models, where the minimal distance is known, this took the median
found/minimal norm ratio over 40 points from 1.13 to 1.002 in 3 × 32 × 32 dimensions, and
the worst over 24 points from 1.06 to 1.001 in 16; on the digits models below it made no
difference. (2) The defaults: the paper runs 9 search steps of up to 10,000 iterations
from ``c = 1e-3`` at a constant learning rate of 0.01; here 6 search steps of 100
iterations (600 gradient evaluations per example) from ``c = 0.1``, learning rate 0.1,
cosine-annealed, no early abort. Adam moves each coordinate of ``w`` by
about the learning rate per step, so at 0.01 a pixel on a box face (``w ≈ ±7.25``) cannot
leave it within 100 steps (on scikit-learn digits, 100 steps at 0.01 left robust accuracy
at ε = 1 about 20 pp too high); the annealing recovers the precision a large constant rate
loses near the boundary. On a digits MLP and CNN (scikit-learn's 8 × 8 digits) the
defaults match the paper's settings at 1000 iterations (9 × 1000, 15 to 20 times slower)
to within 1.5 % in median norm and 1 pp in robust accuracy at ε = 0.3, 0.5 and 1. Early
abort saved little time there and left robust accuracy up to 3 pp higher.

The margin loss follows the best *other* logit, so on a multi-class model the attack heads
for the runner-up class; when another class's boundary is nearer, it can settle on the
runner-up's (a local minimum of the objective: 13 % above the minimum on one of 24 points
of a 10-class linear model, whatever the settings).

Compared with torchattacks' ``CW`` this adds the search over ``c``, a finite start on the
box faces (``atanh(±1)`` is infinite there), per-example (not whole-batch) early abort, the
check of the last iterate, and takes the best *other* logit over the other classes only
(masking the true class with 0 picks 0 when all other logits are negative).

pagctl reports robust accuracy at a budget: the returned point is the smallest adversarial
found when its L2 norm is at most ``eps``, else the clean input. Examples the model already
misclassifies are returned unchanged and not attacked.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.steps import choose_targets, fit_to_budget, l2_norms
from pagctl.protocols import Epsilon, PluginParams

TargetRule = Literal["least_likely", "random"]
Schedule = Literal["constant", "cosine"]

BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
BOX_MARGIN = 1e-6
"""``2x − 1`` is clamped to ``[−1 + BOX_MARGIN, 1 − BOX_MARGIN]`` before ``atanh``."""
LARGEST_CONST = 1e10
ABORT_TOLERANCE = 1e-4
LATE_FRACTION = 0.8
"""Only adversarial points found from this fraction of the iterations on steer the search."""


def to_tanh_space(x: Tensor) -> Tensor:
    """``w`` with ``(tanh(w) + 1) / 2 ≈ x`` (within 5e-7 for float32 and wider dtypes; the
    box faces 0 and 1 map to finite values). Shape: (N, ...) -> (N, ...)."""
    return torch.atanh((2.0 * x - 1.0).clamp(-1.0 + BOX_MARGIN, 1.0 - BOX_MARGIN))


def from_tanh_space(w: Tensor) -> Tensor:
    """``(tanh(w) + 1) / 2``, in [0, 1]. Shape: (N, ...) -> (N, ...)."""
    return (torch.tanh(w) + 1.0) / 2.0


def cosine_rate(lr: float, i: int, steps: int) -> float:
    """Learning rate of step ``i`` (0-based) of ``steps``: ``lr`` annealed along a half
    cosine to ``lr / 100`` at the last step."""
    final = lr / 100.0
    progress = i / max(steps - 1, 1)
    return final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def margin_loss(logits: Tensor, goal: Tensor, *, targeted: bool, confidence: float) -> Tensor:
    """The paper's ``f``: untargeted (``goal`` = true labels) ``max(z_y − max_{i≠y} z_i, −κ)``,
    targeted (``goal`` = target classes) ``max(max_{i≠t} z_i − z_t, −κ)``.

    Shape: (N, K), (N,) -> (N,).
    """
    own = logits.gather(1, goal[:, None]).squeeze(1)
    other = logits.scatter(1, goal[:, None], float("-inf")).amax(dim=1)
    gap = other - own if targeted else own - other
    return gap.clamp_min(-confidence)


def is_adversarial(logits: Tensor, goal: Tensor, *, targeted: bool, confidence: float) -> Tensor:
    """Whether each point succeeds with margin ``κ`` (the paper's check): untargeted, the
    argmax of the logits with ``z_y`` raised by ``κ`` is not ``y``; targeted, the argmax with
    ``z_t`` lowered by ``κ`` is ``t``. At ``κ = 0``: ``argmax ≠ y`` / ``argmax = t``.

    Shape: (N, K), (N,) -> (N,) bool.
    """
    shift = -confidence if targeted else confidence
    adjusted = logits.scatter_add(
        1, goal[:, None], torch.full_like(logits[:, :1], shift),
    ) if confidence else logits
    pred = adjusted.argmax(dim=1)
    return pred == goal if targeted else pred != goal


def _search(
    model: nn.Module,
    x: Tensor,
    goal: Tensor,
    *,
    targeted: bool,
    steps: int,
    binary_search_steps: int,
    initial_const: float,
    confidence: float,
    lr: float,
    schedule: Schedule,
    abort_early: bool,
) -> tuple[Tensor, Tensor]:
    """The CW optimisation with the binary search over ``c``, on every example of ``x``.

    Returns (smallest adversarial points found, in ``x``'s dtype; a boolean mask of the
    examples where one was found); examples without one keep ``x``.
    Shape: (N, C, H, W), (N,) -> (N, C, H, W), (N,) bool.
    """
    n = x.shape[0]
    work = torch.promote_types(x.dtype, torch.float32)  # atanh of 1 − 1e-6 needs float32
    xw = x.to(work)
    w0 = to_tanh_space(xw)
    lower = torch.zeros(n, dtype=work, device=x.device)
    upper = torch.full((n,), math.inf, dtype=work, device=x.device)
    const = torch.full((n,), initial_const, dtype=work, device=x.device)
    best_l2sq = torch.full((n,), math.inf, dtype=work, device=x.device)
    best = x.clone()
    check_every = max(steps // 10, 1)
    late = int(LATE_FRACTION * steps)
    for outer in range(binary_search_steps):
        if binary_search_steps >= 10 and outer == binary_search_steps - 1:
            const = upper.clamp(max=LARGEST_CONST)
        w = w0.clone()
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
        last_ok = torch.zeros(n, dtype=torch.bool, device=x.device)
        prev = torch.full((n,), math.inf, dtype=work, device=x.device)
        active = torch.arange(n, device=x.device)
        for i in range(steps + 1):
            last = i == steps
            with torch.enable_grad():
                w_var = w[active].requires_grad_(not last)
                adv = from_tanh_space(w_var)
                logits = model(adv.to(x.dtype))
                l2sq = (adv - xw[active]).pow(2).flatten(1).sum(dim=1)
                f = margin_loss(logits.to(work), goal[active], targeted=targeted,
                                confidence=confidence)
                loss = l2sq + const[active] * f
                grad = None if last else torch.autograd.grad(loss.sum(), w_var)[0]
            logits, l2sq, loss, adv = logits.detach(), l2sq.detach(), loss.detach(), adv.detach()

            ok = is_adversarial(logits, goal[active], targeted=targeted, confidence=confidence)
            if i >= late:
                succeeded[active[ok]] = True
            last_ok[active] = ok
            better = ok & (l2sq < best_l2sq[active])
            where = active[better]
            best_l2sq[where] = l2sq[better]
            best[where] = adv[better].to(x.dtype)
            if grad is None:
                break

            # Adam on the active rows; all of them have taken i steps since the reset.
            t = i + 1
            m_a = BETA1 * m[active] + (1.0 - BETA1) * grad
            v_a = BETA2 * v[active] + (1.0 - BETA2) * grad * grad
            m[active], v[active] = m_a, v_a
            denom = (v_a / (1.0 - BETA2**t)).sqrt() + ADAM_EPS
            rate = lr if schedule == "constant" else cosine_rate(lr, i, steps)
            w[active] = w[active] - rate / (1.0 - BETA1**t) * m_a / denom

            if abort_early and i % check_every == 0:
                p = prev[active]
                stalled = torch.isfinite(p) & (loss > p - ABORT_TOLERANCE * p.abs())
                prev[active] = loss
                active = active[~stalled]
                if active.numel() == 0:
                    break

        succeeded |= last_ok  # the point where an early abort stopped the run
        upper = torch.where(succeeded, torch.minimum(upper, const), upper)
        lower = torch.where(succeeded, lower, torch.maximum(lower, const))
        const = torch.where(torch.isfinite(upper), (lower + upper) / 2.0, const * 10.0)
    return best, torch.isfinite(best_l2sq)


def cw_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = math.inf,
    steps: int = 100,
    binary_search_steps: int = 6,
    initial_const: float = 0.1,
    confidence: float = 0.0,
    lr: float = 0.1,
    schedule: Schedule = "cosine",
    targets: Tensor | None = None,
    abort_early: bool = False,
) -> Tensor:
    """Carlini–Wagner L2: per example, the smallest adversarial point found if its L2 norm is
    at most ``eps``, else ``x`` (``eps = inf`` returns every adversarial point found).

    ``targets`` (N,) makes the attack targeted (success = classified as the target, never
    ``y``). Examples the model misclassifies at ``x`` are returned unchanged. Runs in
    whatever mode the caller left ``model`` in. Shape: inputs (N, C, H, W) in [0, 1], labels
    (N,) -> (N, C, H, W), same dtype/device, in [0, 1], ``‖x_adv − x‖₂ <= eps`` per example.
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1 or binary_search_steps < 1:
        raise ValueError("steps and binary_search_steps must be >= 1, got "
                         f"{steps} and {binary_search_steps}")
    if not (initial_const > 0 and math.isfinite(initial_const)):
        raise ValueError(f"initial_const must be finite and > 0, got {initial_const}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if not (confidence >= 0 and math.isfinite(confidence)):
        raise ValueError(f"confidence must be finite and >= 0, got {confidence}")
    x0 = x.detach()
    if eps == 0 or x0.shape[0] == 0:
        return x0.clone()
    y = y.to(x0.device)
    targeted = targets is not None
    goal = y if targets is None else targets.to(x0.device)
    if targeted and bool((goal == y).any()):
        raise ValueError("a target class equals the label")
    with torch.no_grad():
        clean = model(x0).detach()
    attack = (clean.argmax(dim=1) == y).nonzero().squeeze(1)
    out = x0.clone()
    if attack.numel():
        points, found = _search(
            model, x0[attack], goal[attack], targeted=targeted, steps=steps,
            binary_search_steps=binary_search_steps, initial_const=initial_const,
            confidence=confidence, lr=lr, schedule=schedule, abort_early=abort_early,
        )
        found &= l2_norms(points - x0[attack]) <= eps
        out[attack[found]] = points[found]
    return fit_to_budget(x0, out, "l2", eps)


class CWL2(AttackBase):
    """Carlini–Wagner L2: minimum-norm adversarial points by Adam in tanh space with a
    binary search over the trade-off constant; robust where the smallest found exceeds eps."""

    norm: Literal["l2"] = "l2"
    min_classes = 2
    name = "cw_l2"

    class Params(PluginParams):
        eps: Epsilon = Field(
            default=0.5, ge=0, allow_inf_nan=False,
            description="L2 budget in [0, 1] pixel space (number or fraction string): points "
            "whose smallest adversarial found has L2 norm > eps count as robust and are "
            "returned unchanged",
        )
        steps: int = Field(
            default=100, ge=1, description="Adam iterations per value of c (the paper: up "
            "to 10000)",
        )
        binary_search_steps: int = Field(
            default=6, ge=1, description="values of c tried per example (the paper: 9); "
            "with 10 or more, the last reruns at the smallest succeeding c",
        )
        initial_const: float = Field(
            default=0.1, gt=0, allow_inf_nan=False,
            description="first c of the search (the paper: 1e-3); multiplied by 10 after "
            "each failure until one succeeds, then bisected",
        )
        confidence: float = Field(
            default=0.0, ge=0, allow_inf_nan=False,
            description="kappa: the logit margin a point needs to count as adversarial",
        )
        lr: float = Field(
            default=0.1, gt=0, allow_inf_nan=False,
            description="Adam learning rate on the tanh-space variable (the paper: 0.01 "
            "with up to 10000 iterations)",
        )
        schedule: Schedule = Field(
            default="cosine", description="'cosine' = the learning rate annealed along a "
            "half cosine to lr/100 over each run; 'constant' = the paper's",
        )
        target: TargetRule | None = Field(
            default=None, description="null = untargeted; 'least_likely' = targeted at the "
            "lowest-scoring class of the clean logits; 'random' = targeted at a uniformly "
            "drawn other class (seeded). Targeted success means reaching the target",
        )
        abort_early: bool = Field(
            default=False, description="stop an example's run for the current c once its "
            "objective stops decreasing by 0.01 % (checked every steps/10 iterations); "
            "faster, less accurate",
        )
        seed: int | None = Field(
            default=None, description="seed of the 'random' target draws; null = the "
            "run's seed",
        )

    params: Params

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs.

        With ``target="random"``, successive calls continue one seeded random stream.
        """
        p = self.params
        targets = None
        if p.target is not None:
            with torch.no_grad():
                clean = model(x).detach()
            targets = choose_targets(p.target, y.to(clean.device), clean.shape[1],
                                     self.generator, clean)
        return cw_l2(
            model, x, y, eps=self.eps, steps=p.steps,
            binary_search_steps=p.binary_search_steps, initial_const=p.initial_const,
            confidence=p.confidence, lr=p.lr, schedule=p.schedule, targets=targets,
            abort_early=p.abort_early,
        )
