"""FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020), L∞, L2 and L1.

FAB looks for the *smallest* perturbation that changes the prediction. Each iteration, at the
current point ``x_k`` (the first run of a call starts at the clean input ``x``):

1. Linearise the decision boundary: for each competing class ``k`` the logit difference
   ``f_k = z_k − z_y`` and its input gradient ``w_k`` give the hyperplane
   ``{z : f_k + w_k·(z − x_k) = 0}``. The class whose hyperplane is nearest in the attack's
   norm, ``|f_k| / ‖w_k‖_*`` with ``‖·‖_*`` the dual norm (L1 for L∞, L2 for L2, L∞ for
   L1), is chosen.
   ``FABT`` has a single competing class, the target.
2. Project both ``x_k`` and ``x`` onto that hyperplane intersected with the [0, 1] box
   (:func:`boundary_projection`), giving steps ``d_k`` and ``d_0``.
3. Move to a convex combination of the two projections, each extrapolated by ``η``:
   ``x_{k+1} = clip((1 − α)(x_k + η d_k) + α (x + η d_0))`` with
   ``α = min(‖d_k‖ / (‖d_k‖ + ‖d_0‖), α_max)``, so the iterate is pulled toward the clean
   input in proportion to how far it still is from the boundary.
4. If ``x_{k+1}`` is misclassified, remember it when it is the closest adversarial point so
   far, then step back toward the clean input: ``x_{k+1} = x + β (x_{k+1} − x)``.

Runs: the untargeted attack makes ``restarts`` runs, the first from ``x`` and the others from
a random point at distance ``ε/2`` (L∞: ``x + ε/2 · u / ‖u‖_∞`` with ``u`` uniform in
``[−1, 1]^d``; L2: ``x + ε/2 · g / ‖g‖₂`` and L1: ``x + ε/2 · g / ‖g‖₁`` with ``g``
standard normal; clipped to [0, 1]).
The targeted attack makes ``restarts`` such runs for each of the ``n_target_classes``
highest non-true classes of the clean logits. The runs can go through the model together,
stacked along the batch (``runs_together``; by default all of them on a GPU, one at a time
on the CPU); an example takes the first run, in target-then-restart order, that broke it,
so every grouping runs the same algorithm (the results agree up to the rounding of the
model's arithmetic on batches of other sizes).

Budget: a run breaks an example when its smallest adversarial perturbation has norm
``<= eps``; that point is returned. Examples with no adversarial point within ``eps`` (none
found, or only larger ones) are returned unchanged, as are the examples the model already
misclassifies.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.steps import (
    AnyNorm,
    AnyNormParam,
    fit_to_budget,
    group_size,
    l1_norms,
    l2_norms,
    linf_norms,
    norms_of,
    per_example,
    runs_together_field,
)
from pagctl.protocols import Epsilon, PluginParams

L2_TINY_WEIGHT = 1e-8
"""In the L2 projection, hyperplane coefficients below this in magnitude count as zero."""
L1_TINY_WEIGHT = 1e-8
"""In the L1 projection, hyperplane coefficients up to this in magnitude count as zero."""
_NORMS = ("linf", "l2", "l1")


def _water_level(weight: Tensor, cap: Tensor, target: Tensor) -> Tensor:
    """Per row, the smallest ``λ >= 0`` with ``Σ_i weight_i · min(λ, cap_i) = target``.

    The left side is continuous, piecewise linear and non-decreasing in ``λ``, with kinks at
    the caps; sorting the caps gives its value at every kink, the kink interval holding the
    target, and ``λ`` by linear interpolation there. Rows whose target exceeds the largest
    reachable value ``Σ_i weight_i · cap_i`` get ``λ = inf``. ``weight``, ``cap`` >= 0,
    ``target`` >= 0. Shape: (M, D), (M, D), (M,) -> (M,).
    """
    caps, order = cap.sort(dim=1)
    weights = weight.gather(1, order)
    area = weights * caps
    below = area.cumsum(dim=1) - area  # Σ_{i<j} weight_i cap_i (caps sorted ascending)
    above = weights.flip(1).cumsum(dim=1).flip(1)  # Σ_{i>=j} weight_i
    at_kinks = below + caps * above  # the left side evaluated at λ = caps_j
    count = (at_kinks < target[:, None]).sum(dim=1)
    reachable = count < caps.shape[1]
    j = count.clamp(max=caps.shape[1] - 1)[:, None]
    slope = above.gather(1, j).squeeze(1)
    tiny = torch.finfo(slope.dtype).tiny
    level = (target - below.gather(1, j).squeeze(1)) / slope.clamp_min(tiny)
    level = torch.where(slope > 0, level, torch.zeros_like(level))
    # λ lies in [caps_{j-1}, caps_j]; clamping guards against rounding in the sums.
    level = torch.minimum(level.clamp_min(0.0), caps.gather(1, j).squeeze(1))
    return torch.where(reachable, level, torch.full_like(level, float("inf")))


def _greedy_steps(weight: Tensor, room: Tensor, gap: Tensor) -> Tensor:
    """Per row, the amounts ``a_i`` in ``[0, room_i]`` of least ``Σ a_i`` with
    ``Σ_i weight_i · a_i = gap``: fill the coordinates in order of decreasing weight, each up
    to its room, until the gap is closed (the last one partially). Coordinate ``j`` (in that
    order) gets ``clip((gap − Σ_{i<j} weight_i room_i) / weight_j, 0, room_j)``; rows whose
    gap exceeds ``Σ_i weight_i room_i`` get every coordinate of positive weight at its room.
    Zero weights get 0. ``weight``, ``room``, ``gap`` >= 0. Shape: (M, D), (M, D), (M,) ->
    (M, D).
    """
    weights, order = weight.sort(dim=1, descending=True)
    rooms = room.gather(1, order)
    area = weights * rooms  # how much of the gap each coordinate can close
    before = area.cumsum(dim=1) - area  # Σ_{i<j} weight_i room_i
    tiny = torch.finfo(weights.dtype).tiny
    amount = ((gap[:, None] - before) / weights.clamp_min(tiny)).clamp_min(0.0)
    amount = torch.where(weights > 0, torch.minimum(amount, rooms), torch.zeros_like(amount))
    return torch.zeros_like(amount).scatter(1, order, amount)


def boundary_projection(points: Tensor, w: Tensor, b: Tensor, norm: AnyNorm) -> Tensor:
    """Smallest step onto a hyperplane inside the [0, 1] box.

    Per row, returns the ``d`` of least ``norm`` with ``w·(points + d) + b = 0`` and
    ``points + d`` in [0, 1]. When the box does not reach the hyperplane, ``d`` goes to the
    box corner nearest to it (the one extremising ``w·z`` toward the hyperplane). ``points``
    must lie in the box.

    All norms share one form. With the sign of ``(w, b)`` chosen so that
    ``c = w·points + b >= 0``, every coordinate moves against the sign of ``w_i``, by at most
    its room ``r_i`` (the distance to the face ``w_i`` points away from). For L∞ and L2,
    ``λ`` is the smallest level that closes the gap ``c`` (:func:`_water_level`):

    - L∞: ``d_i = −sign(w_i) · min(λ, r_i)`` with weights ``|w_i|``; ``λ`` is ``‖d‖_∞``;
    - L2: ``d_i = −sign(w_i) · min(λ |w_i|, r_i)``, the KKT solution ``clip(−λ w)`` (caps
      ``r_i / |w_i|``, weights ``w_i²``); coefficients with ``|w_i| < 1e-8`` are left at 0;
    - L1: a linear program whose solution is greedy (:func:`_greedy_steps`): a unit of L1
      length spent on coordinate ``i`` closes ``|w_i|`` of the gap, so the coordinates with
      the largest ``|w_i|`` move first, each by its full room, the last one partially;
      coefficients with ``|w_i| <= 1e-8`` are left at 0 (as in the reference code).

    Shape: (M, D), (M, D), (M,) -> (M, D), in the dtype of ``points``.
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'linf', 'l2' or 'l1', got {norm!r}")
    gap = (w * points).sum(dim=1) + b
    side = torch.where(gap >= 0, 1.0, -1.0).to(points.dtype)
    w = w * side[:, None]
    gap = gap * side
    # Distance to the face w points away from (how far d_i may go against w_i's sign).
    room = torch.where(w > 0, points, 1.0 - points).clamp_min(0.0)
    size = w.abs()
    if norm == "linf":
        used = w != 0
        level = _water_level(size, room, gap)
        step = torch.minimum(level[:, None], room)
    elif norm == "l1":
        used = size > L1_TINY_WEIGHT
        step = _greedy_steps(torch.where(used, size, torch.zeros_like(size)), room, gap)
    else:
        used = size >= L2_TINY_WEIGHT
        size = torch.where(used, size, torch.zeros_like(size))
        cap = torch.where(used, room / size.clamp_min(L2_TINY_WEIGHT), torch.zeros_like(room))
        level = _water_level(size * size, cap, gap)
        # min(λ, cap_i)·|w_i|, written so that a coordinate at its cap lands on the face.
        finite = level.clamp(max=torch.finfo(level.dtype).max)  # out of reach: no inf · 0
        step = torch.minimum(finite[:, None] * size, room)
    d = -w.sign() * step
    return torch.where(used, d, torch.zeros_like(d))


def _dual_norms(w: Tensor, norm: AnyNorm) -> Tensor:
    """Per-example dual norm of ``norm`` (L1 for L∞, L2 for L2, L∞ for L1), in which the
    distance to a hyperplane ``w·z + b = 0`` is ``|w·x + b| / ‖w‖_*``. Shape: (M, D) -> (M,).
    """
    if norm == "linf":
        return l1_norms(w)
    return l2_norms(w) if norm == "l2" else linf_norms(w)


def _nearest_boundary(
    model: nn.Module, x: Tensor, y: Tensor, rivals: list[Tensor], norm: AnyNorm,
) -> tuple[Tensor, Tensor]:
    """Linearise ``z_k − z_y`` at ``x`` for each rival class and keep, per example, the one
    whose hyperplane is nearest in ``norm``: ``|f| / (‖∇f‖_* + 1e-12)``.

    ``rivals`` holds one (M,) tensor of class indices per backward pass. Works inside
    ``torch.no_grad()`` and leaves no ``.grad``. Shape: (M, C, H, W), (M,) -> the logit
    difference (M,) and its gradient (M, C, H, W) of the chosen class, detached.
    """
    n = x.shape[0]
    best_dist = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    best_f = torch.zeros(n, dtype=x.dtype, device=x.device)
    best_w = torch.zeros_like(x)
    with torch.enable_grad():
        x_var = x.detach().requires_grad_(True)
        logits = model(x_var)
        true = logits.gather(1, y[:, None]).squeeze(1)
        for i, rival in enumerate(rivals):
            diff = logits.gather(1, rival[:, None]).squeeze(1) - true
            (grad,) = torch.autograd.grad(diff.sum(), x_var, retain_graph=i < len(rivals) - 1)
            grad = grad.detach()
            flat = grad.flatten(1)
            dual = _dual_norms(flat, norm)
            f = diff.detach()
            dist = f.abs() / (dual + 1e-12)
            closer = dist < best_dist
            best_dist = torch.where(closer, dist, best_dist)
            best_f = torch.where(closer, f, best_f)
            best_w = torch.where(per_example(closer, grad), grad, best_w)
    return best_f, best_w


def _start_offsets(
    x: Tensor, norm: AnyNorm, eps: float, generator: torch.Generator,
) -> Tensor:
    """One restart's offsets of norm ``eps / 2`` for every example of the call (uniform cube
    direction for L∞, Gaussian direction for L2 and L1), drawn for all examples so that an
    example's start does not depend on which others a run attacks. Shape: (N, C, H, W) ->
    (N, C, H, W)."""
    if norm == "linf":
        u = 2.0 * torch.rand(x.shape, generator=generator, device=generator.device) - 1.0
    else:
        u = torch.randn(x.shape, generator=generator, device=generator.device)
    size = norms_of(u, norm)
    u = u / per_example(size.clamp_min(torch.finfo(u.dtype).tiny), u)
    return 0.5 * eps * u.to(device=x.device, dtype=x.dtype)


def _single_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    rivals: list[Tensor],
    start: Tensor,
    *,
    norm: AnyNorm,
    steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """One FAB run from ``start``. Returns the closest misclassified point found per example
    and its distance to ``x`` (``inf`` and ``x`` itself where none was found).

    Shape: (M, C, H, W), (M,), (M, C, H, W) -> (M, C, H, W), (M,).
    """
    m = x.shape[0]
    x_flat = x.flatten(1)
    x_k = start.clone()
    best = x.clone()
    best_dist = torch.full((m,), float("inf"), dtype=x.dtype, device=x.device)
    for _ in range(steps):
        f, w = _nearest_boundary(model, x_k, y, rivals, norm)
        w_flat = w.flatten(1)
        b = f - (w_flat * x_k.flatten(1)).sum(dim=1)  # hyperplane w·z + b = 0
        both = boundary_projection(
            torch.cat((x_k.flatten(1), x_flat)), torch.cat((w_flat, w_flat)),
            torch.cat((b, b)), norm,
        )
        d_k, d_0 = both[:m].reshape(x.shape), both[m:].reshape(x.shape)
        size = norms_of(both, norm).clamp_min(1e-8)
        size_k, size_0 = size[:m], size[m:]
        alpha = (size_k / (size_k + size_0)).clamp(0.0, alpha_max)
        alpha = per_example(alpha, x)
        x_k = ((1.0 - alpha) * (x_k + eta * d_k) + alpha * (x + eta * d_0)).clamp(0.0, 1.0)

        with torch.no_grad():
            fooled = model(x_k).argmax(dim=1) != y
        dist = norms_of(x_k - x, norm)
        closer = fooled & (dist < best_dist)
        best = torch.where(per_example(closer, x), x_k, best)
        best_dist = torch.where(closer, dist, best_dist)
        # Step back toward the clean input from every misclassified iterate.
        x_k = torch.where(per_example(fooled, x), x + beta * (x_k - x), x_k)
    return best, best_dist


def fab(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: AnyNorm,
    eps: float,
    steps: int,
    restarts: int,
    n_target_classes: int,
    targeted: bool,
    alpha_max: float,
    eta: float,
    beta: float,
    generator: torch.Generator,
    runs_together: int | None = None,
) -> Tensor:
    """FAB (``targeted=False``) or FAB-T (``targeted=True``) with budget ``eps`` in ``norm``.

    ``targeted`` runs ``restarts`` runs for each of the ``n_target_classes`` highest non-true
    classes of the clean logits (at most K − 1); otherwise ``restarts`` runs against all
    classes at once. The first run of each target (or of the untargeted attack) starts at the
    inputs, the others at random points drawn from ``generator``. Runs in whatever mode the
    caller left ``model`` in. Shape: inputs (N, C, H, W) in [0, 1], labels (N,) ->
    (N, C, H, W), same dtype/device, ``‖x_adv − x‖ <= eps`` per example; examples not broken
    within ``eps`` are returned unchanged.

    **Runs together.** The runs (target × restart, in that order) go through the model in
    groups of ``runs_together`` (0: all in one group; None: all on a CUDA device, one at a
    time elsewhere, :func:`pagctl.attacks.steps.group_size`), stacked along the batch; a group
    attacks the examples no earlier group broke, every random start is drawn for every
    example in run order whatever the grouping, and an example takes the first run (in run
    order) that broke it, so every grouping runs the same algorithm (in eval mode); the
    results agree up to the rounding of the model's arithmetic on batches of other sizes.
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'linf', 'l2' or 'l1', got {norm!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1 or restarts < 1 or n_target_classes < 1:
        raise ValueError("steps, restarts and n_target_classes must be >= 1, got "
                         f"{steps}, {restarts} and {n_target_classes}")
    x0 = x.detach()
    if eps == 0 or x0.shape[0] == 0:
        return x0.clone()
    y = y.to(x0.device)
    with torch.no_grad():
        clean_logits = model(x0).detach()
    classes = clean_logits.shape[1]
    if classes < 2:
        raise ValueError(f"FAB needs at least 2 classes, the model has {classes}")
    out = x0.clone()
    done = clean_logits.argmax(dim=1) != y
    if targeted:
        others = clean_logits.scatter(1, y[:, None], float("-inf"))
        ranked = others.argsort(dim=1, descending=True)[:, : min(n_target_classes, classes - 1)]
        rival_sets: list[Tensor] = [ranked[:, i: i + 1] for i in range(ranked.shape[1])]
    else:
        shifts = torch.arange(1, classes, device=y.device)
        rival_sets = [(y[:, None] + shifts[None, :]) % classes]
    plan = [(rivals, restart) for rivals in rival_sets for restart in range(restarts)]
    size = group_size(runs_together, len(plan), x0.device)
    for lo in range(0, len(plan), size):
        group = plan[lo: lo + size]
        # Drawn whether or not anything is left to attack: the stream does not depend on
        # the grouping (the plugin's next call continues it).
        offsets = [None if restart == 0 else _start_offsets(x0, norm, eps, generator)
                   for _, restart in group]
        active = (~done).nonzero().squeeze(1)
        if active.numel() == 0:
            continue
        m = active.numel()
        xa = x0[active]
        start = torch.cat([xa if offset is None else (xa + offset[active]).clamp(0.0, 1.0)
                           for offset in offsets])
        rivals = torch.cat([rival_set[active] for rival_set, _ in group])
        xs = xa.repeat(len(group), 1, 1, 1)
        points, dist = _single_run(
            model, xs, y[active].repeat(len(group)), list(rivals.T), start, norm=norm,
            steps=steps, alpha_max=alpha_max, eta=eta, beta=beta,
        )
        for j in range(len(group)):
            rows = slice(j * m, (j + 1) * m)
            within = (dist[rows] <= eps) & ~done[active]
            out[active[within]] = points[rows][within]
            done[active[within]] = True
    return fit_to_budget(x0, out, norm, eps)


class _FABParams(PluginParams):
    eps: Epsilon = Field(
        default=8 / 255, ge=0, allow_inf_nan=False,
        description="budget in [0, 1] pixel space, in the attack's norm (number or fraction "
        "string such as \"8/255\"); examples broken only by larger perturbations are "
        "returned unchanged",
    )
    norm: AnyNormParam = Field(default="linf", description="'linf', 'l2' or 'l1' (any case)")
    steps: int = Field(default=100, ge=1, description="iterations per run")
    restarts: int = Field(
        default=1, ge=1, description="runs (per target for fab_t): the first starts at the "
        "input, the others at random points at distance eps/2; later runs only attack the "
        "examples not yet broken",
    )
    seed: int | None = Field(
        default=None, description="seed of the random starts; null = the run's seed",
    )
    alpha_max: float = Field(
        default=0.1, ge=0, le=1, allow_inf_nan=False,
        description="largest weight of the projection of the clean input in each step",
    )
    eta: float = Field(
        default=1.05, ge=1, allow_inf_nan=False,
        description="extrapolation factor of the projections (overshoot past the boundary)",
    )
    beta: float = Field(
        default=0.9, gt=0, le=1, allow_inf_nan=False,
        description="after a misclassified iterate, shrink its perturbation by this factor",
    )
    runs_together: int | None = runs_together_field(
        "restarts, and target classes for fab_t")


class _FAB(AttackBase):
    """Shared body of the two FAB plugins (the choice of rival classes is the difference)."""

    targeted: bool = False
    min_classes = 2
    name = "fab"
    params: _FABParams
    norm: AnyNorm  # its Params take no l0

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs
        (`pagctl.attacks.base.AttackBase`: successive calls continue one seeded stream)."""
        p = self.params
        return fab(
            model, x, y, norm=self.norm, eps=self.eps, steps=p.steps,
            restarts=p.restarts, n_target_classes=getattr(p, "n_target_classes", 9),
            targeted=self.targeted, alpha_max=p.alpha_max, eta=p.eta, beta=p.beta,
            generator=self.generator, runs_together=p.runs_together,
        )

    def passes_per_point(self) -> int:
        """The most model passes one call spends on a point (`pagctl.protocols
        .declared_passes`): the clean forward, then for each run (targets × restarts) and
        step one forward with a backward per rival class (one, the target, for fab_t; every
        other class for fab) and one forward to test the new iterate."""
        p = self.params
        classes = self.ctx.num_classes
        runs = p.restarts * (min(getattr(p, "n_target_classes", 9), classes - 1)
                             if self.targeted else 1)
        rivals = 1 if self.targeted else classes - 1
        return 1 + runs * p.steps * (2 + rivals)


class FAB(_FAB):
    """Untargeted FAB: the smallest perturbation toward the nearest linearised boundary of any
    class, returned if it fits the budget."""

    targeted = False
    name = "fab"

    class Params(_FABParams):
        pass


class FABT(_FAB):
    """Targeted FAB, one target after another among the highest-scoring non-true classes;
    an example counts as broken as soon as it is misclassified as anything within budget."""

    targeted = True
    name = "fab_t"

    class Params(_FABParams):
        n_target_classes: int = Field(
            default=9, ge=1, description="how many of the highest non-true classes of the "
            "clean logits to target in turn (at most the number of classes − 1)",
        )
