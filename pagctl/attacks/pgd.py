"""Projected gradient descent (Madry et al. 2018), untargeted or targeted, L2 and L∞.

One function, :func:`pgd`, does the work; ``PGDL2`` and ``PGDLinf`` are its plugins, and
adversarial training (`pagctl.objectives`) runs them as its inner attack. ``EOTPGD`` is the
same PGD with every gradient averaged over several forward and backward passes (Expectation
over Transformation, Athalye et al. 2018: the attack on a model with randomness in its
forward), and `pagctl.attacks.mifgsm` steps along :func:`pgd`'s momentum option. The loss
ascended is the cross-entropy (``loss="ce"``), for TRADES (Zhang et al. 2019) the
label-free KL(p(x) ‖ p(x')) from the model's prediction on the clean input (``loss="kl"``),
or the Carlini–Wagner margin ``min(max_{j≠y} z_j − z_y, κ)`` on the logits (``loss="cw"``:
the "CW∞" of TRADES, MART and RobustBench is PGD-L∞ on it, `pagctl.attacks.cw_linf`).
Targeted (``target``: the least-likely class of the clean logits, a seeded random other
class, or the next class) the attack descends the cross-entropy with the target instead, as
torchattacks' targeted modes do. The start is
the clean input, a uniform point of the ball, or (``start_std``) the clean input plus a small
Gaussian, TRADES's ``x + 0.001·N(0, I)``. The
official PAG code monitors training with a 7-step PGD-L2 whose random start
is an L∞ box of radius 8/255, outside the ε = 0.5 ball; here the L2 random
start is uniform in the ball and clipped to [0, 1], and a vanishing gradient gives a zero
step instead of a division by zero.

Per example, with ``keep="first_fooled"`` (the default, for evaluation) the returned point is
the first iterate (over all steps and restarts) that the model misclassifies; if none is, the
last iterate of the restart with the highest loss. The check reuses the logits of the gradient
pass, so it costs one extra forward per restart (for the last iterate), and none with a single
run: there the last iterate is returned wherever no earlier one fooled the model, whether it
does or not. With ``keep="last"`` (what adversarial training's references use: Madry et al.,
TRADES, Wong et al.) the point is the last iterate of the restart with the highest loss,
misclassified or not. Targeted, what counts as success is unchanged: ``first_fooled`` keeps
the first iterate classified as anything but the label (the robust accuracy the engine
measures), whether or not it reached the target, and restarts compare the loss the attack
ascends, the negated cross-entropy with the target; ``keep="last"`` returns the last iterate,
as torchattacks does.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.cw import margin_loss
from pagctl.attacks.steps import (
    BestSoFar,
    Norm,
    NormParam,
    TargetChoice,
    choose_targets,
    fit_to_budget,
    logits_and_gradient,
    loss_per_example,
    normalize_l2,
    per_example,
    project_l2,
    project_linf,
    random_start_l2,
    random_start_linf,
)
from pagctl.protocols import BuildContext, Epsilon, PluginParams


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s 2.5·ε/steps, floored at ε/4.

    The random start lies near the sphere of radius ε (uniform in a d-dimensional ball puts
    almost all mass there), so short steps mostly rotate along it: on a digits CNN at
    ε = 0.5 and 50 steps, 2.5·ε/steps left robust accuracy 6 pp too high against ε/4.
    """
    return eps * max(2.5 / steps, 0.25)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """``(N,)`` reshaped to broadcast against ``(N, C, H, W)``."""
    return mask.reshape((-1,) + (1,) * (like.dim() - 1))


Keep = Literal["first_fooled", "last"]
AscentLoss = Literal["ce", "kl", "cw"]


def kl_from_reference(logits: Tensor, reference: Tensor) -> Tensor:
    """KL(p ‖ q) per example, p = softmax(``reference``) (the clean prediction), q =
    softmax(``logits``): TRADES's inner loss (``nn.KLDivLoss(reduction="sum")`` of
    log q against p, per row). Shape: (N, K), (N, K) -> (N,)."""
    p_log = F.log_softmax(reference, dim=1)
    q_log = F.log_softmax(logits, dim=1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=1)


def cw_margin(logits: Tensor, labels: Tensor, confidence: float = 0.0) -> Tensor:
    """The Carlini–Wagner loss to ascend, ``min(max_{j≠y} z_j − z_y, κ)`` (minus the CW
    paper's ``f``, `pagctl.attacks.cw.margin_loss`): positive once misclassified, flat from
    the margin ``κ`` on. Shape: (N, K), (N,) -> (N,)."""
    return -margin_loss(logits, labels, targeted=False, confidence=confidence)


def _ascent_step(model: nn.Module, x: Tensor, goal: Tensor, loss: AscentLoss,
                 reference: Tensor | None, targeted: bool, eot_iter: int,
                 confidence: float) -> tuple[Tensor, Tensor]:
    """Logits at ``x`` (detached, the last forward's) and the input gradient of the summed
    loss, averaged over ``eot_iter`` forward and backward passes (one pass: that pass's
    gradient exactly). Targeted: the gradient of the negated cross-entropy with ``goal``."""
    total: Tensor | None = None
    for _ in range(eot_iter):
        if loss == "ce":
            logits, grad = logits_and_gradient(model, x, goal, "ce", targeted)
        else:
            with torch.enable_grad():
                x_var = x.detach().requires_grad_(True)
                logits = model(x_var)
                ascended = _loss_at(logits, goal, loss, reference, targeted, confidence)
                (grad,) = torch.autograd.grad(ascended.sum(), x_var)
            logits, grad = logits.detach(), grad.detach()
        total = grad if total is None else total + grad
    assert total is not None
    return logits, total if eot_iter == 1 else total / eot_iter


def _loss_at(logits: Tensor, goal: Tensor, loss: AscentLoss, reference: Tensor | None,
             targeted: bool, confidence: float) -> Tensor:
    """The loss the attack ascends, per example, with its graph (detach for a record): the
    cross-entropy with the label, its negation with the target class, the CW margin, or the
    KL from the clean prediction. Shape: (N, K) -> (N,)."""
    if loss == "ce":
        ce = loss_per_example(logits, goal, "ce")
        return -ce if targeted else ce
    if loss == "cw":
        return cw_margin(logits, goal, confidence)
    assert reference is not None
    return kl_from_reference(logits, reference)


def _momentum_direction(grad: Tensor, momentum: Tensor | None, decay: float) -> Tensor:
    """MI-FGSM's accumulated gradient: ``decay · momentum + grad / mean|grad|`` (the mean per
    example over all its pixels; an all-zero gradient adds nothing). Shape: (N, C, H, W)."""
    scale = grad.abs().flatten(1).mean(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
    scaled = grad / per_example(scale, grad)
    return scaled if momentum is None else scaled + momentum * decay


def _single_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool,
    generator: torch.Generator,
    check_last: bool = True,
    loss: AscentLoss = "ce",
    start_std: float | None = None,
    keep: Keep = "first_fooled",
    targets: Tensor | None = None,
    eot_iter: int = 1,
    decay: float | None = None,
    confidence: float = 0.0,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One PGD run. Returns (points, loss at the points, fooled mask).

    ``check_last`` False skips the forward pass on the last iterate: the loss is then None
    and the mask covers only the iterates before it (enough when this is the only run).
    With ``keep="last"`` the points are the last iterate and the mask is all False.
    Shape: (N, C, H, W), (N,) -> (N, C, H, W), (N,), (N,) bool.
    """
    reference = None
    targeted = targets is not None
    goal = y if targets is None else targets
    if loss == "kl":
        with torch.no_grad():
            reference = model(x).detach()
    if random_start and start_std is not None:
        noise = torch.randn(x.shape, generator=generator, device=generator.device)
        delta = project_l2(start_std * noise, eps) if norm == "l2" else \
            project_linf(start_std * noise, eps)
        x_k = (x + delta.to(device=x.device, dtype=x.dtype)).clamp(0.0, 1.0)
    elif random_start:
        draw = random_start_l2 if norm == "l2" else random_start_linf
        delta = draw(x.shape, eps, generator, device=x.device, dtype=x.dtype)
        x_k = (x + delta).clamp(0.0, 1.0)
    else:
        x_k = x.clone()
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    out = x_k.clone()
    momentum: Tensor | None = None
    for _ in range(steps):
        logits, grad = _ascent_step(model, x_k, goal, loss, reference, targeted, eot_iter,
                                    confidence)
        if keep == "first_fooled":
            newly = (logits.argmax(dim=1) != y) & ~found
            # torch.where, not out[newly] = ...: boolean indexing waits for the device (it
            # must count the rows) and would stall a GPU once per step.
            out = torch.where(_rows(newly, x_k), x_k, out)
            found |= newly
        if decay is not None:
            grad = momentum = _momentum_direction(grad, momentum, decay)
        step = normalize_l2(grad) if norm == "l2" else grad.sign()
        delta = x_k + step_size * step - x
        delta = project_l2(delta, eps) if norm == "l2" else project_linf(delta, eps)
        x_k = (x + delta).clamp(0.0, 1.0)
    if keep == "last":
        finite = torch.isfinite(x_k).flatten(1).all(dim=1)
        x_k = torch.where(_rows(finite, x_k), x_k, x)
        if not check_last:
            return x_k, None, found
        with torch.no_grad():
            last_loss = _loss_at(model(x_k), goal, loss, reference, targeted,
                                 confidence).detach()
        return x_k, last_loss, found
    if not check_last:
        # No iterate fooled the model: the last one, or the clean input where the steps went
        # non-finite (what comparing losses across runs would keep).
        finite = torch.isfinite(x_k).flatten(1).all(dim=1)
        out[~found] = torch.where(_rows(finite[~found], x_k), x_k[~found], x[~found])
        return out, None, found
    with torch.no_grad():
        logits = model(x_k)
    last_loss = _loss_at(logits, goal, loss, reference, targeted, confidence).detach()
    newly = (logits.argmax(dim=1) != y) & ~found
    found |= newly
    out[~found | newly] = x_k[~found | newly]
    return out, last_loss, found


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm,
    eps: float,
    steps: int,
    step_size: float | None,
    random_start: bool,
    restarts: int,
    generator: torch.Generator,
    loss: AscentLoss = "ce",
    start_std: float | None = None,
    keep: Keep = "first_fooled",
    targets: Tensor | None = None,
    eot_iter: int = 1,
    decay: float | None = None,
    confidence: float = 0.0,
) -> Tensor:
    """PGD on ``loss`` (cross-entropy, KL from the clean prediction, or the CW margin capped
    at ``confidence``), inside the ``norm`` ball of radius ``eps`` around ``x`` and the
    [0, 1] box; untargeted, or with ``targets`` (N,) descending the cross-entropy with those
    classes.

    ``step_size`` None means ``default_step_size(eps, steps)``. ``start_std`` (with
    ``random_start``) starts from ``x + start_std·N(0, I)`` projected on the ball instead of
    a uniform point of it. ``keep`` chooses the returned iterate (module docstring). With
    ``keep="first_fooled"`` restarts after the first run attack only the examples not yet
    misclassified; with ``"last"`` every restart attacks every example and the one of highest
    loss (the loss ascended: with ``targets``, the negated cross-entropy with the target) is
    kept. ``eot_iter`` averages each gradient over that many passes (EOT, for randomised
    models); ``decay`` steps along MI-FGSM's momentum of L1-scaled gradients instead of the
    gradient. Runs in whatever mode the caller left ``model`` in.
    Shape: inputs (N, C, H, W) in [0, 1], labels (N,) [, targets (N,)] -> (N, C, H, W),
    same dtype/device, ``‖x_adv - x‖ <= eps`` per example.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if loss not in ("ce", "kl", "cw"):
        raise ValueError(f"loss must be 'ce', 'kl' or 'cw', got {loss!r}")
    if not confidence >= 0:
        raise ValueError(f"confidence must be >= 0, got {confidence}")
    if keep not in ("first_fooled", "last"):
        raise ValueError(f"keep must be 'first_fooled' or 'last', got {keep!r}")
    if start_std is not None and not start_std > 0:
        raise ValueError(f"start_std must be > 0, got {start_std}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
    if eot_iter < 1:
        raise ValueError(f"eot_iter must be >= 1, got {eot_iter}")
    if decay is not None and not decay >= 0:
        raise ValueError(f"decay must be >= 0, got {decay}")
    if targets is not None and loss != "ce":
        raise ValueError(f"targets need loss='ce' (targeted PGD descends the cross-entropy "
                         f"with the target), got {loss!r}")
    if targets is not None and targets.shape != y.shape:
        raise ValueError(f"targets must have the labels' shape {tuple(y.shape)}, got "
                         f"{tuple(targets.shape)}")
    x0 = x.detach()
    if eps == 0 or x0.shape[0] == 0:
        return x0.clone()
    alpha = default_step_size(eps, steps) if step_size is None else step_size
    if not alpha > 0:
        raise ValueError(f"step_size must be > 0, got {alpha}")
    y = y.to(x0.device)
    goal = None if targets is None else targets.to(x0.device)
    # Without a random start every run is the same deterministic path: one is enough.
    n_runs = restarts if random_start else 1
    options: dict[str, Any] = {"norm": norm, "eps": eps, "steps": steps, "step_size": alpha,
                               "random_start": random_start, "generator": generator,
                               "loss": loss, "start_std": start_std, "keep": keep,
                               "eot_iter": eot_iter, "decay": decay,
                               "confidence": confidence}
    if n_runs == 1:
        points = _single_run(model, x0, y, check_last=False, targets=goal, **options)[0]
        return fit_to_budget(x0, points, norm, eps)
    runs = BestSoFar(x0)
    for _ in range(n_runs):
        active = runs.active()
        if active.numel() == 0:
            break
        points, run_loss, found = _single_run(
            model, x0[active], y[active], targets=None if goal is None else goal[active],
            **options)
        assert run_loss is not None
        runs.update(active, points, run_loss, found)
    return fit_to_budget(x0, runs.points, norm, eps)


class _PGDParams(PluginParams):
    steps: int = Field(default=10, ge=1, description="gradient steps per restart")
    step_size: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="step length in the attack's norm; null = eps * max(2.5 / steps, 1/4)",
    )
    random_start: bool = Field(
        default=True, description="start from a uniform random point of the ball (clipped to "
        "[0, 1]) instead of the clean input",
    )
    restarts: int = Field(
        default=1, ge=1, description="independent random starts; later runs only attack "
        "the examples not yet misclassified (one run without random_start)",
    )
    seed: int | None = Field(
        default=None, description="seed of the random starts; null = the run's seed",
    )
    loss: AscentLoss = Field(
        default="ce", description="ce: cross-entropy with the label; kl: KL(p(x) || p(x')) "
        "from the model's clean prediction, label-free (TRADES's inner maximisation); cw: "
        "the Carlini-Wagner margin min(max_{j != y} z_j - z_y, 0) on the logits",
    )
    start_std: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="with random_start: start from x + start_std * N(0, I) projected on the "
        "ball (TRADES: 0.001); null = a uniform point of the ball",
    )
    keep: Keep = Field(
        default="first_fooled", description="first_fooled: per example the first "
        "misclassified iterate (evaluation); last: the last iterate of the best restart, "
        "as adversarial training's references use",
    )
    target: TargetChoice | None = Field(
        default=None, description="null = untargeted; otherwise descend the cross-entropy "
        "with a target class: 'least_likely' (lowest clean logit), 'random' (uniform among "
        "the other classes, seeded), 'next' ((label + 1) mod K). keep=first_fooled still "
        "keeps the first misclassified iterate, target reached or not; needs loss=ce",
    )


class _PGD(AttackBase):
    """Shared body of the PGD plugins (the norm and EOT's passes are the only differences)."""

    norm: Norm
    params: _PGDParams
    eot_iter: int = 1

    def __init__(self, params: _PGDParams, ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        if params.target is not None and params.loss != "ce":
            raise ValueError(f"target {params.target!r} needs loss 'ce' (targeted PGD descends "
                             "the cross-entropy with the target): set target to null or loss "
                             "to ce")
        if params.target is not None and ctx.num_classes < 2:
            raise ValueError("a target class needs at least 2 classes")
        self.step_size: float = (
            default_step_size(self.eps, params.steps)
            if params.step_size is None
            else params.step_size
        )

    def targets(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor | None:
        """The target classes of the ``target`` rule (None when untargeted); least-likely
        costs one forward on the clean inputs, random draws one class per example from the
        attack's generator. Shape: (N, C, H, W), (N,) -> (N,) int64."""
        rule = self.params.target
        if rule is None:
            return None
        clean = None
        if rule == "least_likely":
            with torch.no_grad():
                clean = model(x).detach()
        return choose_targets(rule, y, self.ctx.num_classes, self.generator, clean)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs
        (`pagctl.attacks.base.AttackBase`: successive calls continue one seeded stream)."""
        return pgd(
            model, x, y, norm=self.norm, eps=self.eps, steps=self.params.steps,
            step_size=self.step_size, random_start=self.params.random_start,
            restarts=self.params.restarts, generator=self.generator,
            loss=self.params.loss, start_std=self.params.start_std, keep=self.params.keep,
            targets=self.targets(model, x, y), eot_iter=self.eot_iter,
        )


class PGDL2(_PGD):
    """PGD in the L2 ball: steps along the L2-normalised gradient, projected on the ball."""

    norm: Norm = "l2"

    class Params(_PGDParams):
        eps: Epsilon = Field(
            default=0.5, ge=0, allow_inf_nan=False,
            description="L2 radius in [0, 1] pixel space (number or fraction string)",
        )


class PGDLinf(_PGD):
    """PGD in the L∞ ball: signed-gradient steps, clipped to [-eps, eps] per pixel."""

    norm: Norm = "linf"

    class Params(_PGDParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="L-infinity radius in [0, 1] pixel space, e.g. \"8/255\"",
        )


class EOTPGD(_PGD):
    """PGD whose every gradient is the mean over ``eot_iter`` forward and backward passes
    (Expectation over Transformation), for models with randomness in their forward."""

    class Params(_PGDParams):
        eps: Epsilon = Field(
            default=8 / 255, ge=0, allow_inf_nan=False,
            description="radius in [0, 1] pixel space (number or fraction string)",
        )
        norm: NormParam = Field(
            default="linf", description="linf: signed steps, clipped per pixel; l2: "
            "L2-normalised steps, projected on the ball (any case)",
        )
        eot_iter: int = Field(
            default=20, ge=1, description="forward and backward passes averaged per "
            "gradient (AutoAttack's rand version: 20; torchattacks' EOTPGD: 2)",
        )

    params: Params

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        super().__init__(params, ctx)
        self.eot_iter = params.eot_iter
