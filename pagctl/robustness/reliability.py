"""Is a robustness number trustworthy? Probes for gradient masking and a verdict.

A defence can look robust because gradient-based attacks fail on it, not because it is
robust: its gradients vanish or explode (masked, shattered), its forward pass is random,
or its outputs are probabilities whose gradients saturate. Each probe below measures one
symptom on a small subset and names it when it appears:

- **outputs**: the model returns probabilities (rows in [0, 1] summing to 1), not logits;
- **randomness**: identical forwards disagree (a randomised defence needs EoT:
  ``autoattack`` version ``rand``);
- **gradients**: input gradients of the logit margin that are exactly zero or not finite;
- **ε-sweep**: a PGD sweep over growing ε (APGD-CE in L1, where PGD has no step) is not
  monotone or does not reach ≈ 0 at the diameter of the input box, where every image is
  reachable;
- **more effort**: a stronger white-box attack (APGD-CE with restarts, then APGD-T) breaks
  points the evaluated attack left robust;
- **black box**: the gradient-free Square attack breaks points the white-box attack left
  robust.

The verdict is ``reliable: true`` when no probe fired; ``reasons`` lists what did. The
probes that attack (ε-sweep, more effort, black box) attack in `PROBE_NORMS`; under another
budget (``l0``: pixels changed) they are skipped, and the verdict's ``probes`` says so
under ``attack_probes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from pagctl.records import StageRecord

PROBE_NORMS = ("linf", "l2", "l1")
"""The budgets the probes that attack (PGD, APGD, Square) can attack in."""
RANDOM_TOLERANCE = 1e-4
"""Largest allowed difference of L2-normalised outputs between identical forwards."""
SWEEP_STEPS = 20
SWEEP_LARGE_ACCURACY = 0.02
"""Accuracy a sweep must reach at the box diameter (where every image is reachable)."""


def _material(count: int, m: int) -> bool:
    """More than a chance wobble: at least 3 points and more than 3% of the ``m`` probed."""
    return count >= 3 and count > 0.03 * m


@dataclass
class Verdict:
    """The probes' measurements and the reasons (empty when the evaluation looks sound)."""

    measured: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def reliable(self) -> bool:
        return not self.reasons

    def to_record(self) -> dict[str, Any]:
        return {"reliable": self.reliable, "reasons": list(self.reasons),
                "probes": dict(self.measured)}


def diameter(norm: str, shape: tuple[int, ...]) -> float:
    """Largest distance between two images in [0, 1]^d in ``norm``: 1 (L∞), √d (L2) or
    d (L1)."""
    d = math.prod(shape)
    return 1.0 if norm == "linf" else float(d) if norm == "l1" else math.sqrt(d)


def sweep_attack(norm: str) -> str:
    """The attack of the ε-sweep probe in ``norm``: PGD, or APGD-CE in L1."""
    return "APGD-CE" if norm == "l1" else "PGD"


def probe_outputs(model: nn.Module, x: Tensor, verdict: Verdict) -> None:
    """Outputs that look like probabilities: rows in [0, 1] that sum to 1."""
    import torch

    with torch.no_grad():
        out = model(x).double()
    probs = bool(out.min() >= -1e-6 and out.max() <= 1 + 1e-6
                 and ((out.sum(dim=1) - 1).abs() < 1e-4).all())
    verdict.measured["outputs_are_probabilities"] = probs
    if probs:
        verdict.reasons.append("outputs look like probabilities (rows in [0, 1] summing to 1), "
                               "not logits: their gradients saturate; attack the logits")


def probe_randomness(model: nn.Module, x: Tensor, verdict: Verdict, repeats: int = 5) -> bool:
    """True when identical forwards differ (by more than RANDOM_TOLERANCE after normalising
    each output row, or in the predicted class)."""
    import torch

    with torch.no_grad():
        outs = [model(x).double() for _ in range(repeats)]
    unit = [o / o.norm(dim=1, keepdim=True).clamp_min(1e-30) for o in outs]
    spread = max(float((u - unit[0]).norm(dim=1).max()) for u in unit[1:]) if x.shape[0] else 0.0
    flips = any(bool((o.argmax(1) != outs[0].argmax(1)).any()) for o in outs[1:])
    random = spread > RANDOM_TOLERANCE or flips
    verdict.measured["output_spread"] = spread
    if random:
        verdict.reasons.append(
            f"the model is randomised: {repeats} identical forwards differ (normalised "
            f"outputs by up to {spread:.3g}); evaluate with autoattack version=rand (EoT)")
    return random


def probe_gradients(model: nn.Module, x: Tensor, y: Tensor, verdict: Verdict) -> None:
    """Input gradients of the logit margin (best other minus true): zero or not finite."""
    import torch

    with torch.enable_grad():
        x_var = x.detach().clone().requires_grad_(True)
        logits = model(x_var)
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        (grad,) = torch.autograd.grad((other - true).sum(), x_var, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    flat = grad.detach().flatten(1)
    m = max(1, x.shape[0])
    nonfinite = int((~torch.isfinite(flat)).any(dim=1).sum())
    zero = int((flat == 0).all(dim=1).sum())
    verdict.measured["zero_gradient_fraction"] = zero / m
    verdict.measured["nonfinite_gradient_fraction"] = nonfinite / m
    if zero:
        verdict.reasons.append(f"{zero} of {m} probe points have an all-zero input gradient: "
                               "gradient-based attacks cannot move them (masked gradients)")
    if nonfinite:
        verdict.reasons.append(f"{nonfinite} of {m} probe points have non-finite input "
                               "gradients (shattered gradients)")


def _sweep_accuracy(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float,
                    seed: int) -> float:
    import torch

    from pagctl.attacks.apgd import apgd
    from pagctl.attacks.pgd import pgd

    generator = torch.Generator().manual_seed(seed)
    if norm == "l1":
        adv = apgd(model, x, y, loss="ce", norm="l1", eps=eps, steps=SWEEP_STEPS, restarts=1,
                   rho=0.75, generator=generator)
    else:
        adv = pgd(model, x, y, norm=norm, eps=eps, steps=SWEEP_STEPS, step_size=None,  # type: ignore[arg-type]
                  restarts=1, random_start=True, generator=generator)
    with torch.no_grad():
        return float((model(adv).argmax(1) == y).float().mean())


def probe_sweep(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float, seed: int,
                verdict: Verdict) -> None:
    """PGD (APGD-CE in L1) accuracy at ε, 2ε, 4ε and the box diameter: must not rise,
    must reach ≈ 0."""
    big = diameter(norm, tuple(x.shape[1:]))
    levels = sorted({min(e, big) for e in (eps, 2 * eps, 4 * eps)} | {big})
    levels = [e for e in levels if e > 0]
    accs = [_sweep_accuracy(model, x, y, norm, e, seed) for e in levels]
    who = sweep_attack(norm)
    verdict.measured["sweep"] = {"eps": levels, "accuracy": accs, "steps": SWEEP_STEPS}
    m = max(1, x.shape[0])
    rises = [(a, b, e) for a, b, e in zip(accs, accs[1:], levels[1:], strict=False)
             if _material(round((b - a) * m), m)]
    if rises:
        a, b, e = rises[0]
        verdict.reasons.append(f"{who} accuracy rises with ε ({a:.3f} → {b:.3f} at ε = {e:.4g}): "
                               "larger budgets should never help the model")
    if accs and accs[-1] > SWEEP_LARGE_ACCURACY:
        verdict.reasons.append(
            f"{who} leaves accuracy {accs[-1]:.3f} at ε = {big:.4g} (the box diameter, where "
            "every image is reachable): the gradients do not lead the attack")


def _broken(model: nn.Module, adv: Tensor, y: Tensor) -> Tensor:
    import torch

    with torch.no_grad():
        fooled: Tensor = model(adv).argmax(1) != y
    return fooled


def probe_more_effort(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float,
                      seed: int, verdict: Verdict, probed: int) -> None:
    """``x``: the points (of ``probed``) the evaluated attack left robust. A stronger
    white-box attack (APGD-CE with 2 restarts, then APGD-T over 3 targets; in L1 both on
    the 3ε → 2ε → ε schedule) should break almost none."""
    import torch

    from pagctl.attacks.apgd import apgd

    m = x.shape[0]
    verdict.measured["more_effort"] = {"attacked": m, "broke": 0}
    if m == 0:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    large_eps = norm == "l1"
    adv = apgd(model, x, y, loss="ce", norm=norm, eps=eps, steps=100,  # type: ignore[arg-type]
               restarts=2, rho=0.75, generator=gen, large_eps=large_eps)
    broken = _broken(model, adv, y)
    if model(x[:1]).shape[1] >= 4:
        keep = (~broken).nonzero().squeeze(1)
        if keep.numel():
            adv_t = apgd(model, x[keep], y[keep], loss="dlr-targeted", norm=norm,  # type: ignore[arg-type]
                         eps=eps, steps=100, restarts=1, rho=0.75, generator=gen,
                         n_target_classes=3, large_eps=large_eps)
            broken[keep] = _broken(model, adv_t, y[keep])
    k = int(broken.sum())
    verdict.measured["more_effort"]["broke"] = k
    if _material(k, probed):
        verdict.reasons.append(
            f"a stronger white-box attack (APGD-CE ×2 restarts, APGD-T) broke {k} of the {m} "
            "probe points the attack left robust: the robust accuracy is overestimated (too "
            "few steps or restarts, or a weak attack)")


def probe_black_box(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float,
                    seed: int, verdict: Verdict, probed: int, *, queries: int = 1000) -> None:
    """``x``: the points (of ``probed``) the white-box attack left robust; Square should
    break almost none of them."""
    import torch

    from pagctl.attacks.square import square_attack

    m = x.shape[0]
    verdict.measured["black_box"] = {"attacked": m, "broke": 0, "queries": queries}
    if m == 0:
        return
    adv = square_attack(model, x, y, norm=norm, eps=eps, queries=queries, p_init=0.8,  # type: ignore[arg-type]
                        restarts=1, loss="margin",
                        generator=torch.Generator().manual_seed(seed + 2))
    k = int(_broken(model, adv, y).sum())
    verdict.measured["black_box"]["broke"] = k
    if _material(k, probed):
        verdict.reasons.append(f"the black-box Square attack broke {k} of the {m} probe "
                               "points the attack left robust: it is weaker than a "
                               "gradient-free search (for a gradient attack, the gradients "
                               "mislead it)")


def square_stage_check(stages: list[StageRecord], n: int, verdict: Verdict) -> None:
    """In an ensemble, Square (run after the white-box stages) should break almost nothing."""
    earlier = False
    for stage in stages:
        if stage.name == "square" and earlier and stage.broke >= 2 and stage.broke > 0.002 * n:
            verdict.reasons.append(
                f"the black-box Square stage broke {stage.broke} of {n} points the "
                "white-box stages left robust: gradients are misleading")
        earlier = earlier or stage.name != "square"


def sweep_check(eps: list[float], accuracy: list[float], n: int, verdict: Verdict) -> None:
    """A user's ε-sweep of the real attack must not rise with ε."""
    order = sorted(range(len(eps)), key=lambda i: eps[i])
    for a, b in zip(order, order[1:], strict=False):
        if _material(round((accuracy[b] - accuracy[a]) * n), n):
            verdict.reasons.append(
                f"robust accuracy rises with ε ({accuracy[a]:.3f} at ε = {eps[a]:.4g} → "
                f"{accuracy[b]:.3f} at ε = {eps[b]:.4g})")
            return


def quick_probes(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Verdict, bool]:
    """Cheap probes that run before the attack: outputs, randomness, gradients.
    Returns the verdict so far and whether the model is randomised."""
    from pagctl.models import eval_mode

    verdict = Verdict()
    with eval_mode(model):
        probe_outputs(model, x, verdict)
        random = probe_randomness(model, x, verdict)
        probe_gradients(model, x, y, verdict)
    return verdict, random


def attack_probes(model: nn.Module, x: Tensor, y: Tensor, survived: Tensor, *,
                  norm: str, eps: float, seed: int, white_box_only: bool,
                  verdict: Verdict, device: torch.device | str = "cpu") -> None:
    """Probes that attack: ε-sweep on the correctly classified probe points, then more
    effort and (when the evaluated attack had no black-box stage) Square on the points the
    evaluated attack left robust (``survived``, (m,) bool). Skipped, with one line in
    ``verdict.measured["attack_probes"]``, for a budget outside `PROBE_NORMS`."""
    import torch

    from pagctl.models import eval_mode

    if norm not in PROBE_NORMS:
        verdict.measured["attack_probes"] = (
            f"skipped: the sweep, more-effort and black-box probes attack in "
            f"{', '.join(PROBE_NORMS)}, not {norm}")
        return

    x, y, survived = x.to(device), y.to(device), survived.to(device)
    with eval_mode(model):
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        if bool(correct.any()):
            probe_sweep(model, x[correct], y[correct], norm, eps, seed, verdict)
        robust = survived & correct
        m = x.shape[0]
        probe_more_effort(model, x[robust], y[robust], norm, eps, seed, verdict, m)
        if white_box_only:
            probe_black_box(model, x[robust], y[robust], norm, eps, seed, verdict, m)
