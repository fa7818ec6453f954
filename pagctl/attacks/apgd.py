"""Auto-PGD (Croce & Hein, ICML 2020): PGD with momentum and a step size that adapts itself.

One function, :func:`apgd`, does the work; ``APGDCE`` (cross-entropy), ``APGDDLR``
(difference-of-logits-ratio) and ``APGDT`` (targeted DLR over the highest non-true classes)
are its plugins. Each run:

- starts from a random point: L∞ uniform in the box ``[-ε, ε]^d``, L2 uniform in the ball
  (as pgd does; the paper's reference starts on the sphere, which in many dimensions is
  almost the same law), both clipped to [0, 1];
- takes a first step of length 2ε (sign of the gradient for L∞, the L2-normalised gradient
  for L2), then steps with momentum 0.75:
  ``z = P(x_k + η·step)``, ``x_{k+1} = P(x_k + 0.75 (z − x_k) + 0.25 (x_k − x_{k−1}))``;
- checks at checkpoints whether to halve η: condition 1, the loss increased at fewer than
  ρ of the steps since the last checkpoint; condition 2, η was not halved at the last
  checkpoint and the best loss has not improved since. A halving example restarts from its
  best-loss point (with no momentum). The checkpoint intervals are the paper's
  ``p_{j+1} − p_j = max(p_j − p_{j−1} − 0.03, 0.06)`` from ``p_1 = 0.22``, in whole steps:
  ``ℓ_1 = max(⌊0.22 N⌋, 1)``, ``ℓ_{j+1} = max(ℓ_j − max(⌊0.03 N⌋, 1), max(⌊0.06 N⌋, 1))``.

L1 (Croce & Hein, ICML 2021, "Mind the box") changes the step and the schedule, as the
reference does:

- the random start is a Gaussian draw projected onto the L1 ball ∩ [0, 1] box
  (:func:`pagctl.attacks.steps.project_l1_box`, the exact projection);
- each step moves only the coordinates whose gradient is among the largest ``k`` in
  magnitude, by ``η · sign(g_i) / k`` each (so one step has L1 length η), then projects;
  there is no momentum; ``k`` starts at 20% of the coordinates;
- every ``max(⌊0.04 N⌋, 1)`` steps the sparsity of the best point so far sets ``k`` (its
  number of changed coordinates / 1.5); if that number fell by more than 5% since the last
  checkpoint, η goes back to ε and the example restarts from its best point, otherwise η is
  divided by 1.5, within [ε/10, ε];
- ``large_eps`` (AutoAttack L1's setting) spends 30% of the steps in the ball of radius 3ε,
  30% at 2ε and the rest at ε, each phase starting from the previous one's highest-loss
  point projected into the smaller ball; only the last phase can fool an example.

Per example, the returned point is the first misclassified point found (over the random
start, the steps, the restarts and, for ``APGDT``, the target classes); if none is, the
highest-loss point of all runs. Examples the model already misclassifies are returned
unchanged. The runs (targets × restarts) can go through the model together, stacked along
the batch (``runs_together``; by default all of them on a GPU, one at a time on the CPU).
Each run's random start is drawn for every example in run order, so grouping the runs
differently runs the same algorithm (the results agree up to the rounding of the model's
arithmetic on batches of other sizes); runs in a later group attack only the examples not
yet misclassified.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.steps import (
    AnyNorm,
    AnyNormParam,
    BestSoFar,
    Norm,
    fit_to_budget,
    group_size,
    normalize_l2,
    per_example,
    project_l1_box,
    project_l2,
    project_linf,
    random_start_l2,
    random_start_linf,
    runs_together_field,
)
from pagctl.protocols import Epsilon, PluginParams

LossFn = Callable[[Tensor, Tensor], Tensor]
"""Per-example loss to ascend: logits (N, K), labels (N,) -> (N,)."""

MOMENTUM = 0.75


def ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per example. Shape: (N, K), (N,) -> (N,)."""
    return F.cross_entropy(logits, labels, reduction="none")


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Untargeted DLR: ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)`` with ``z_π1 ≥ z_π2 ≥
    …`` the sorted logits. Needs K ≥ 3. Shape: (N, K), (N,) -> (N,)."""
    top = logits.topk(3, dim=1).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(targets: Tensor) -> LossFn:
    """Targeted DLR toward ``targets`` (N,): ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)``.
    Needs K ≥ 4. The returned function maps (N, K), (N,) -> (N,)."""

    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        top = logits.topk(4, dim=1).values
        true = logits.gather(1, labels[:, None]).squeeze(1)
        target = logits.gather(1, targets[:, None]).squeeze(1)
        return -(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)

    return loss


def checkpoint_lengths(steps: int) -> list[int]:
    """Steps between consecutive checkpoints, in order, summing to at most ``steps``."""
    length = max(int(0.22 * steps), 1)
    decrease, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    lengths: list[int] = []
    total = 0
    while total + length <= steps:
        lengths.append(length)
        total += length
        length = max(length - decrease, shortest)
    return lengths


def _evaluate(
    model: nn.Module, x: Tensor, labels: Tensor, loss_fn: LossFn, eot_iter: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits, per-example loss and input gradient of the summed loss at ``x``; leaves no
    ``.grad``. With ``eot_iter > 1`` (Expectation over Transformation, for randomised
    models) the loss and gradient are averaged over that many forwards and the logits are
    the last forward's. Shape: (N, C, H, W), (N,) -> (N, K), (N,), (N, C, H, W), detached."""
    loss_sum: Tensor | None = None
    grad_sum: Tensor | None = None
    with torch.enable_grad():
        for _ in range(eot_iter):
            x_var = x.detach().requires_grad_(True)
            logits = model(x_var)
            loss = loss_fn(logits, labels)
            (grad,) = torch.autograd.grad(loss.sum(), x_var)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            grad_sum = grad.detach() if grad_sum is None else grad_sum + grad.detach()
    assert loss_sum is not None and grad_sum is not None
    return logits.detach(), loss_sum / eot_iter, grad_sum / eot_iter


class _RunBest:
    """What one run keeps per example over its iterates: whether one was misclassified, the
    first that was, and the highest-loss iterate with its loss and gradient.
    Shape: points (N, C, H, W), loss (N,), fooled (N,) bool."""

    def __init__(self, x_k: Tensor, y: Tensor, logits: Tensor, loss: Tensor,
                 grad: Tensor) -> None:
        self.fooled = logits.argmax(dim=1) != y
        self.first_fooled = x_k.clone()
        self.x, self.loss, self.grad = x_k.clone(), loss.clone(), grad.clone()

    def update(self, x_k: Tensor, y: Tensor, logits: Tensor, loss: Tensor,
               grad: Tensor) -> None:
        """Take in the iterate ``x_k`` with its logits, loss and gradient. ``torch.where``,
        not boolean-mask assignment, which waits for the device (it must count the rows)
        and would stall a GPU once per step."""
        newly = (logits.argmax(dim=1) != y) & ~self.fooled
        self.first_fooled = torch.where(per_example(newly, x_k), x_k, self.first_fooled)
        self.fooled = self.fooled | newly
        better = loss > self.loss
        self.x = torch.where(per_example(better, x_k), x_k, self.x)
        self.loss = torch.where(better, loss, self.loss)
        self.grad = torch.where(per_example(better, grad), grad, self.grad)

    def result(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(points, loss at the best points, fooled): the first misclassified iterate where
        fooled, else the highest-loss one."""
        return torch.where(per_example(self.fooled, x), self.first_fooled, self.x), \
            self.loss, self.fooled


def _project(x: Tensor, point: Tensor, norm: Norm, eps: float) -> Tensor:
    """Nearest point of the ``norm`` ball around ``x`` (then clipped to [0, 1])."""
    delta = point - x
    delta = project_l2(delta, eps) if norm == "l2" else project_linf(delta, eps)
    return (x + delta).clamp(0.0, 1.0)


def _single_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    norm: Norm,
    eps: float,
    steps: int,
    rho: float,
    start: Tensor,
    eot_iter: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """One APGD run from ``start`` (inside the budget). Returns (points, loss at the points,
    fooled mask): the first misclassified point where ``fooled``, else the highest-loss
    point.

    Shape: (N, C, H, W), (N,), (N, C, H, W) -> (N, C, H, W), (N,), (N,) bool.
    """
    x_k = start
    logits, loss, grad = _evaluate(model, x_k, y, loss_fn, eot_iter)
    best = _RunBest(x_k, y, logits, loss, grad)
    x_prev = x_k
    prev_loss = loss
    eta = torch.full((x.shape[0],), 2.0 * eps, dtype=x.dtype, device=x.device)
    lengths = iter(checkpoint_lengths(steps))
    length = next(lengths, 0)
    since = 0
    increases = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    best_at_check = best.loss.clone()
    halved_at_check = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for i in range(steps):
        direction = normalize_l2(grad) if norm == "l2" else grad.sign()
        z = _project(x, x_k + per_example(eta, x_k) * direction, norm, eps)
        a = MOMENTUM if i > 0 else 1.0
        x_next = _project(x, x_k + a * (z - x_k) + (1.0 - a) * (x_k - x_prev), norm, eps)
        x_prev, x_k = x_k, x_next
        logits, loss, grad = _evaluate(model, x_k, y, loss_fn, eot_iter)
        best.update(x_k, y, logits, loss, grad)
        increases += (loss > prev_loss).long()
        prev_loss = loss

        since += 1
        if since == length:
            oscillating = increases.to(x.dtype) < rho * length
            stalled = ~halved_at_check & (best.loss <= best_at_check)
            halve = oscillating | stalled
            eta = torch.where(halve, eta / 2.0, eta)
            # Restart the halving examples from their best point, with no momentum.
            x_k = torch.where(per_example(halve, x_k), best.x, x_k)
            x_prev = x_k
            grad = torch.where(per_example(halve, grad), best.grad, grad)
            prev_loss = torch.where(halve, best.loss, prev_loss)
            halved_at_check = halve
            best_at_check = best.loss.clone()
            increases.zero_()
            since = 0
            length = next(lengths, 0)
    return best.result(x)


L1_CHECK_FRACTION = 0.04
"""L1: steps between checkpoints, as a fraction of the run's steps (at least 1)."""
L1_TOPK_START = 0.2
"""L1: fraction of coordinates moved by the first step of a run from a random start."""
L1_SHRINK = 1.5
"""L1: divides η at a checkpoint where the sparsity held, and the sparsity for the next k."""


def _sparse_sign_step(grad: Tensor, topk: Tensor) -> Tensor:
    """The L1 step direction: ``sign(g_i) / k`` on the coordinates whose ``|g_i|`` reaches
    the ``(1 − topk)`` quantile of the example's gradient, zero elsewhere; unit L1 norm
    (zero where the gradient is). Shape: (N, ...), (N,) fraction -> (N, ...)."""
    n = grad.shape[0]
    flat = grad.reshape(n, -1)
    features = flat.shape[1]
    ranked = flat.abs().sort(dim=1).values
    position = ((1.0 - topk) * features).clamp(0, features - 1).long()
    threshold = ranked.gather(1, position[:, None])
    signs = flat.sign() * (flat.abs() >= threshold).to(flat.dtype)
    count = signs.abs().sum(dim=1, keepdim=True)
    return (signs / (count + 1e-10)).reshape(grad.shape)


def _changed(points: Tensor, x: Tensor) -> Tensor:
    """Per example, how many coordinates differ from ``x``. Shape: (N, ...) twice -> (N,)."""
    return (points - x).flatten(1).ne(0).sum(dim=1).to(x.dtype)


def _single_run_l1(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    eps: float,
    steps: int,
    start: Tensor,
    from_random: bool,
    eot_iter: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One L1 APGD run from ``start`` (inside the budget): sparse steps, adaptive sparsity
    and step size (see the module docstring). ``from_random`` says whether ``start`` is a
    fresh random point (then ``k`` starts at 20% of the coordinates) or a previous phase's
    best point (then at its sparsity / 1.5). Returns (points, loss at the best points,
    fooled mask, highest-loss points): the first misclassified point where ``fooled``, else
    the highest-loss one.

    Shape: (N, C, H, W), (N,), (N, C, H, W) -> (N, C, H, W), (N,), (N,) bool, (N, C, H, W).
    """
    n = x.shape[0]
    features = x[0].numel()
    x_k = start.clone()
    logits, loss, grad = _evaluate(model, x_k, y, loss_fn, eot_iter)
    best = _RunBest(x_k, y, logits, loss, grad)
    eta = torch.full((n,), eps, dtype=x.dtype, device=x.device)
    if from_random:
        topk = torch.full((n,), L1_TOPK_START, dtype=x.dtype, device=x.device)
        sparsity = torch.full((n,), float(features), dtype=x.dtype, device=x.device)
    else:
        sparsity = _changed(x_k, x)
        topk = sparsity / features / L1_SHRINK
    check_every = max(int(L1_CHECK_FRACTION * steps), 1)
    for i in range(steps):
        moved = x_k + per_example(eta, x_k) * _sparse_sign_step(grad, topk)
        x_k = (x + project_l1_box(x, moved - x, eps)).clamp(0.0, 1.0)
        logits, loss, grad = _evaluate(model, x_k, y, loss_fn, eot_iter)
        best.update(x_k, y, logits, loss, grad)

        if (i + 1) % check_every == 0:
            now = _changed(best.x, x)
            sparser = now < 0.95 * sparsity
            topk = now / features / L1_SHRINK
            eta = torch.where(sparser, torch.full_like(eta, eps), eta / L1_SHRINK)
            eta = eta.clamp(eps / 10.0, eps)
            sparsity = now
            # Where the best point became sparser, continue from it with a full step.
            x_k = torch.where(per_example(sparser, x_k), best.x, x_k)
            grad = torch.where(per_example(sparser, grad), best.grad, grad)
    return (*best.result(x), best.x)


def large_eps_phases(eps: float, steps: int) -> list[tuple[float, int]]:
    """AutoAttack L1's schedule: (radius, steps) for 3ε, 2ε and ε, with ⌈0.3 N⌉, ⌈0.3 N⌉
    and the remaining steps. Under 3 steps there is no room for a phase at ε after the
    larger ones (the reference would then end at 2ε), so all steps run at ε."""
    first = math.ceil(0.3 * steps)
    if steps - 2 * first < 1:
        return [(eps, steps)]
    return [(3.0 * eps, first), (2.0 * eps, first), (eps, steps - 2 * first)]


def _l1_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    eps: float,
    steps: int,
    large_eps: bool,
    noise: Tensor,
    eot_iter: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """One L1 run from the Gaussian ``noise`` projected into the budget (into 3ε with
    ``large_eps``, whose phases then shrink it to ε). Shape: as :func:`_single_run`."""
    phases = large_eps_phases(eps, steps) if large_eps else [(eps, steps)]
    start = (x + project_l1_box(x, noise, phases[0][0])).clamp(0.0, 1.0)
    # As the reference: a schedule's first phase too sizes k from its start's sparsity.
    from_random = not large_eps
    result: tuple[Tensor, Tensor, Tensor] | None = None
    for radius, count in phases:
        start = (x + project_l1_box(x, start - x, radius)).clamp(0.0, 1.0)
        out, loss, fooled, start = _single_run_l1(
            model, x, y, loss_fn, eps=radius, steps=count, start=start,
            from_random=from_random, eot_iter=eot_iter)
        from_random = False
        result = (out, loss, fooled)
    assert result is not None
    return result


def start_offsets(norm: AnyNorm, shape: torch.Size, eps: float,
                  generator: torch.Generator, like: Tensor) -> Tensor:
    """One run's random draw for every example of a call, on ``like``'s device and dtype:
    L∞ uniform in the cube of radius ``eps``, L2 uniform in the ball, L1 standard Gaussian
    noise (projected into the budget by the run). Drawn for all examples, attacked or not, so
    that an example's start depends on its position and the run, not on which other
    examples a run attacks. Shape: ``shape`` = (N, C, H, W) -> (N, C, H, W)."""
    if norm == "l1":
        noise = torch.randn(shape, generator=generator, device=generator.device)
        return noise.to(device=like.device, dtype=like.dtype)
    draw = random_start_l2 if norm == "l2" else random_start_linf
    return draw(shape, eps, generator, device=like.device, dtype=like.dtype)


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: Literal["ce", "dlr", "dlr-targeted"],
    norm: AnyNorm,
    eps: float,
    steps: int,
    restarts: int,
    rho: float,
    generator: torch.Generator,
    n_target_classes: int = 9,
    eot_iter: int = 1,
    large_eps: bool = False,
    runs_together: int | None = None,
) -> Tensor:
    """Auto-PGD inside the ``norm`` ball of radius ``eps`` around ``x`` and the [0, 1] box.

    ``loss="dlr-targeted"`` runs ``restarts`` runs for each of the ``n_target_classes``
    highest non-true classes of the clean logits (at most K − 1). ``large_eps`` (L1 only)
    runs each run on the 3ε → 2ε → ε schedule; ``rho`` does not apply to L1. Runs in
    whatever mode the caller left ``model`` in. Shape: inputs (N, C, H, W) in [0, 1],
    labels (N,) -> (N, C, H, W), same dtype/device, ``‖x_adv − x‖ <= eps`` per example.

    **Runs together.** The runs (target × restart, in that order) go through the model in
    groups of ``runs_together`` (0: all in one group; None: all on a CUDA device, one at a
    time elsewhere, :func:`pagctl.attacks.steps.group_size`), stacked along the batch: one
    loop of ``steps`` iterations over ``runs_together ×`` the examples instead of one loop
    per run.
    A group attacks the examples no earlier group fooled. Every run's random start is drawn
    for every example in run order whatever the grouping, each example's run depends on
    that example alone (in eval mode), and the runs are merged in run order (an example
    keeps the first run's misclassified point, else the highest-loss point), so every
    grouping runs the same algorithm. Their results agree up to rounding: the model's
    arithmetic on a batch of another size may round differently (BLAS picks its path by
    shape), which the sign steps can carry to about 1e-4 in a pixel. Larger groups make
    fewer, larger model calls and spend forwards on examples an earlier run of the same
    group has already fooled.
    """
    if norm not in ("l2", "linf", "l1"):
        raise ValueError(f"norm must be 'l2', 'linf' or 'l1', got {norm!r}")
    if large_eps and norm != "l1":
        raise ValueError(f"large_eps is an L1 schedule, the norm is {norm!r}")
    if loss not in ("ce", "dlr", "dlr-targeted"):
        raise ValueError(f"loss must be 'ce', 'dlr' or 'dlr-targeted', got {loss!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1 or restarts < 1 or n_target_classes < 1 or eot_iter < 1:
        raise ValueError("steps, restarts, n_target_classes and eot_iter must be >= 1, got "
                         f"{steps}, {restarts}, {n_target_classes} and {eot_iter}")
    x0 = x.detach()
    if eps == 0 or x0.shape[0] == 0:
        return x0.clone()
    y = y.to(x0.device)
    with torch.no_grad():
        clean_logits = model(x0).detach()
    classes = clean_logits.shape[1]
    if classes < {"ce": 2, "dlr": 3, "dlr-targeted": 4}[loss]:
        raise ValueError(f"loss {loss!r} needs more classes than the model's {classes}")
    runs = BestSoFar(x0, fooled=clean_logits.argmax(dim=1) != y)
    if loss == "dlr-targeted":
        others = clean_logits.scatter(1, y[:, None], float("-inf"))
        ranked = others.argsort(dim=1, descending=True)[:, : min(n_target_classes, classes - 1)]
        targets: list[Tensor | None] = list(ranked.T)
    else:
        targets = [None]
    plan = [target for target in targets for _ in range(restarts)]
    size = group_size(runs_together, len(plan), x0.device)
    for lo in range(0, len(plan), size):
        group = plan[lo: lo + size]
        # Drawn whether or not anything is left to attack: the stream does not depend on
        # the grouping (the plugin's next call continues it).
        offsets = [start_offsets(norm, x0.shape, eps, generator, x0) for _ in group]
        active = runs.active()
        if active.numel() == 0:
            continue
        m = active.numel()
        xs, ys = x0[active].repeat(len(group), 1, 1, 1), y[active].repeat(len(group))
        loss_fn: LossFn = (
            ce_loss if loss == "ce"
            else dlr_loss if loss == "dlr"
            else targeted_dlr_loss(torch.cat([t[active] for t in group if t is not None]))
        )
        if norm == "l1":
            found = _l1_run(model, xs, ys, loss_fn, eps=eps, steps=steps,
                            large_eps=large_eps, eot_iter=eot_iter,
                            noise=torch.cat([offset[active] for offset in offsets]))
        else:
            start = (xs + torch.cat([offset[active] for offset in offsets])).clamp(0.0, 1.0)
            found = _single_run(model, xs, ys, loss_fn, norm=norm, eps=eps, steps=steps,
                                rho=rho, start=start, eot_iter=eot_iter)
        for j in range(len(group)):
            rows = slice(j * m, (j + 1) * m)
            runs.update(active, *(part[rows] for part in found))
    return fit_to_budget(x0, runs.points, norm, eps)


class _APGDParams(PluginParams):
    eps: Epsilon = Field(
        default=8 / 255, ge=0, allow_inf_nan=False,
        description="radius of the ball in [0, 1] pixel space, in the attack's norm "
        "(number or fraction string such as \"8/255\")",
    )
    norm: AnyNormParam = Field(default="linf", description="'linf', 'l2' or 'l1' (any case)")
    steps: int = Field(default=100, ge=1, description="gradient steps per run")
    restarts: int = Field(
        default=1, ge=1, description="random restarts; later runs only attack the examples "
        "not yet misclassified",
    )
    seed: int | None = Field(
        default=None, description="seed of the random starts; null = the run's seed",
    )
    rho: float = Field(
        default=0.75, gt=0, le=1, allow_inf_nan=False,
        description="halve the step at a checkpoint when the loss rose at fewer than this "
        "fraction of the steps since the last one",
    )
    eot_iter: int = Field(
        default=1, ge=1, description="forwards averaged per gradient (Expectation over "
        "Transformation); > 1 only for randomised models",
    )
    runs_together: int | None = runs_together_field(
        "restarts, and target classes for apgd_t")
    large_eps: bool = Field(
        default=False, description="L1 only: spend 30% of the steps at 3·eps and 30% at "
        "2·eps before eps, each phase starting from the last one's best point (AutoAttack "
        "L1's setting)",
    )

    @model_validator(mode="after")
    def _large_eps_is_l1(self) -> _APGDParams:
        if self.large_eps and self.norm != "l1":
            raise ValueError(f"large_eps needs norm 'l1' (got {self.norm!r}); drop it or "
                             "attack in l1")
        return self


class _APGD(AttackBase):
    """Shared body of the three APGD plugins (the loss is the difference)."""

    loss: Literal["ce", "dlr", "dlr-targeted"]
    min_classes = 2
    name = "apgd"
    params: _APGDParams
    norm: AnyNorm  # its Params take no l0

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs
        (`pagctl.attacks.base.AttackBase`: successive calls continue one seeded stream)."""
        return apgd(
            model, x, y, loss=self.loss, norm=self.norm, eps=self.eps,
            steps=self.params.steps, restarts=self.params.restarts, rho=self.params.rho,
            generator=self.generator,
            n_target_classes=getattr(self.params, "n_target_classes", 9),
            eot_iter=self.params.eot_iter, large_eps=self.params.large_eps,
            runs_together=self.params.runs_together,
        )

    def passes_per_point(self) -> int:
        """The most model passes one call spends on a point (`pagctl.protocols
        .declared_passes`): the clean forward, then for each run (targets × restarts) a
        forward and a backward per EoT draw at the start of each phase and after each step.
        Every run of a group attacks every point the group was given, so this is what a
        point costs when no earlier group broke it."""
        p = self.params
        targets = (min(getattr(p, "n_target_classes", 9), self.ctx.num_classes - 1)
                   if self.loss == "dlr-targeted" else 1)
        phases = len(large_eps_phases(self.eps, p.steps)) if p.large_eps else 1
        return 1 + targets * p.restarts * (p.steps + phases) * p.eot_iter * 2


class APGDCE(_APGD):
    """Untargeted APGD on the cross-entropy loss."""

    loss: Literal["ce", "dlr", "dlr-targeted"] = "ce"
    name = "apgd_ce"

    class Params(_APGDParams):
        pass


class APGDDLR(_APGD):
    """Untargeted APGD on the DLR loss (invariant to shifting and scaling the logits)."""

    loss: Literal["ce", "dlr", "dlr-targeted"] = "dlr"
    min_classes = 3
    name = "apgd_dlr"

    class Params(_APGDParams):
        pass


class APGDT(_APGD):
    """Targeted APGD on the DLR loss, one target after another among the highest-scoring
    non-true classes; succeeds on an example as soon as it is misclassified as anything."""

    loss: Literal["ce", "dlr", "dlr-targeted"] = "dlr-targeted"
    min_classes = 4
    name = "apgd_t"

    class Params(_APGDParams):
        n_target_classes: int = Field(
            default=9, ge=1, description="how many of the highest non-true classes of the "
            "clean logits to target in turn (at most the number of classes − 1)",
        )
