"""Sparse-RS (Croce, Andriushchenko, Singh, Flammarion and Hein, AAAI 2022), L0: a
score-based black-box attack that changes at most ``k`` pixels.

The budget is ``l0`` (`pagctl.protocols.NORMS`): ``eps = k`` pixel positions, a pixel
counting once whatever its channels. Like Square Attack (`pagctl.attacks.square`) it only
queries the model's logits, under ``torch.no_grad()``, and climbs the margin loss (best
other logit minus the true one) by random search. The paper's Algorithm 1 for L0, untargeted:

- each example keeps a set of ``k`` perturbed pixel positions, drawn uniformly at first,
  each set to a random corner of the colour box (every channel 0 or 1);
- every iteration swaps ``m = max(⌊α(i) k⌋, 1)`` of them for as many positions outside the
  set: the ``m`` leaving pixels return to the clean image, the ``m`` entering ones get
  new random corners. Which slots of the two lists swap is drawn once for the batch (as the
  reference code does; the lists themselves differ per example);
- the candidate is kept when its loss is strictly higher, or when the model misclassifies
  it: the kept loss never decreases;
- ``α(i)`` follows the reference's piecewise-constant L0 schedule (:func:`alpha_schedule`),
  ``p_init`` halved from the first iteration on and down to ``p_init / 20``, its
  breakpoints defined for 10,000 queries and stretched to ``queries``.

Per example, the returned point is the first query the model misclassifies; if none is, the
best-loss point over all restarts. Query accounting as Square's: one clean forward for the
whole call (examples misclassified clean are returned unchanged), then at most ``queries``
forwards per example and restart (the initial point counts as one); an example stops being
queried once misclassified, and later restarts attack only the examples not yet fooled.
With ``k`` at least the number of pixels there is nothing outside the set; an iteration
then redraws the colours of ``m`` perturbed pixels instead.

Written from the paper and the authors' code (github.com/fra31/sparse-rs, ``rs_attacks.py``);
no installed library (torchattacks, ART, foolbox) has Sparse-RS, so its tests check the
algorithm's invariants rather than parity with a reference.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from pagctl.attacks.base import AttackBase
from pagctl.attacks.steps import fit_to_budget, loss_per_example, restarted_search
from pagctl.protocols import PluginParams

__all__ = ["SparseRS", "alpha_schedule", "sparse_rs"]

# (iteration on the 10,000-query scale after which α = p_init / factor), the reference's L0
# schedule; at iteration 0 α = p_init (iterations start at 1, so only a budget above 10,000
# queries meets it).
_SCHEDULE: tuple[tuple[int, int], ...] = (
    (8000, 20), (6000, 15), (4000, 12), (2000, 10), (1000, 8), (500, 6), (200, 5),
    (50, 4), (0, 2),
)


def alpha_schedule(p_init: float, iteration: int, queries: int) -> float:
    """The fraction α of the ``k`` perturbed pixels resampled at ``iteration`` (from 1) of a
    run of ``queries`` forwards: ``p_init`` divided by 2, 4, 5, 6, 8, 10, 12, 15 and 20 after
    iterations 0, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000, rescaled to
    ``queries``."""
    it = int(iteration / queries * 10000)
    for start, factor in _SCHEDULE:
        if it > start:
            return p_init / factor
    return p_init


def _corners(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Uniform draws from {0, 1} of ``shape`` on ``like``'s device and dtype."""
    draw = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return draw.to(device=like.device, dtype=like.dtype)


def _set_pixels(flat: Tensor, positions: Tensor, values: Tensor) -> Tensor:
    """``flat`` (M, C, H·W) with, per example, the pixels at ``positions`` (M, m) set to
    ``values`` (M, C, m) in every channel; a new tensor."""
    index = positions[:, None, :].expand(-1, flat.shape[1], -1)
    return flat.scatter(2, index, values)


def _pixels_at(flat: Tensor, positions: Tensor) -> Tensor:
    """Per example, the channels of ``flat`` (M, C, H·W) at ``positions`` (M, m) -> (M, C, m)."""
    return flat.gather(2, positions[:, None, :].expand(-1, flat.shape[1], -1))


def _single_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    k: int,
    queries: int,
    p_init: float,
    generator: torch.Generator,
    counts: Tensor,
    trace: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Sparse-RS run of at most ``queries`` forwards per example; adds the forwards spent
    on each example to ``counts`` and, with ``trace``, appends the best losses after each
    forward. Returns (points, loss at the points, fooled mask).

    Shape: (N, C, H, W), (N,) -> (N, C, H, W), (N,), (N,) bool; ``1 <= k <= H·W``.
    """
    n, c, h, w = x.shape
    pixels = h * w
    device = x.device
    clean = x.reshape(n, c, pixels)
    # A random order of the pixel positions per example: the first k are perturbed.
    order = torch.rand((n, pixels), generator=generator, device=generator.device).argsort(dim=1)
    order = order.to(device)
    inside, outside = order[:, :k], order[:, k:]
    best = _set_pixels(clean, inside, _corners((n, c, k), generator, x))
    logits = model(best.reshape(x.shape))
    best_loss = loss_per_example(logits, y, "margin")
    fooled = logits.argmax(dim=1) != y
    counts += 1
    if trace is not None:
        trace.append(best_loss.clone())
    for iteration in range(1, queries):
        active = (~fooled).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        m = max(int(alpha_schedule(p_init, iteration, queries) * k), 1)
        m = min(m, k, pixels - k) if pixels > k else min(m, k)
        slots_in = torch.randperm(k, generator=generator)[:m].to(device)
        in_act, out_act, best_act = inside[active], outside[active], best[active]
        leaving = in_act[:, slots_in]
        colours = _corners((active.numel(), c, m), generator, x)
        if pixels > k:
            slots_out = torch.randperm(pixels - k, generator=generator)[:m].to(device)
            entering = out_act[:, slots_out]
            candidate = _set_pixels(best_act, leaving, _pixels_at(clean[active], leaving))
            candidate = _set_pixels(candidate, entering, colours)
        else:  # every pixel is perturbed: recolour some instead
            candidate = _set_pixels(best_act, leaving, colours)
        logits = model(candidate.reshape(-1, c, h, w))
        cand_loss = loss_per_example(logits, y[active], "margin")
        hit = logits.argmax(dim=1) != y[active]
        take = hit | (cand_loss > best_loss[active])
        keep = take[:, None, None]
        best[active] = torch.where(keep, candidate, best_act)
        best_loss[active] = torch.where(take, cand_loss, best_loss[active])
        if pixels > k:  # the accepted swaps: entering positions join the set, leaving leave
            swapped_in, swapped_out = in_act.clone(), out_act.clone()
            swapped_in[:, slots_in] = entering
            swapped_out[:, slots_out] = leaving
            inside[active] = torch.where(take[:, None], swapped_in, in_act)
            outside[active] = torch.where(take[:, None], swapped_out, out_act)
        fooled[active] = fooled[active] | hit
        counts[active] += 1
        if trace is not None:
            trace.append(best_loss.clone())
    return best.reshape(x.shape), best_loss, fooled


def sparse_rs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    k: int,
    queries: int = 10000,
    p_init: float = 0.3,
    restarts: int = 1,
    generator: torch.Generator,
    counts: Tensor | None = None,
    trace: list[Tensor] | None = None,
) -> Tensor:
    """Untargeted L0 Sparse-RS: points differing from ``x`` in at most ``k`` pixels, each
    changed pixel a corner of the colour box, found with the model's outputs only.

    ``counts`` (N,) int64, when given, receives the forwards spent per example (the clean
    pass included); ``trace``, when given, receives each run's best losses after each of its
    forwards (one (M,) tensor per forward, M the examples the run attacks). Runs in
    whatever mode the caller left ``model`` in.
    Shape: inputs (N, C, H, W) in [0, 1], labels (N,) -> (N, C, H, W), same dtype/device.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0 pixels, got {k}")
    if queries < 1 or restarts < 1:
        raise ValueError(f"queries and restarts must be >= 1, got {queries} and {restarts}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    if x.dim() != 4:
        raise ValueError(f"sparse_rs: expected inputs (N, C, H, W), got {tuple(x.shape)}")
    x0 = x.detach()
    n = x0.shape[0]
    if counts is None:
        counts = torch.zeros(n, dtype=torch.int64, device=x0.device)
    k = min(k, x0.shape[2] * x0.shape[3])
    if k == 0 or n == 0:
        return x0.clone()
    y = y.to(x0.device)
    with torch.no_grad():
        runs = restarted_search(model, x0, y, restarts, counts, lambda xs, ys, run_counts:
                                _single_run(model, xs, ys, k=k, queries=queries, p_init=p_init,
                                            generator=generator, counts=run_counts,
                                            trace=trace))
    return fit_to_budget(x0, runs.points, "l0", k)


class SparseRS(AttackBase):
    """Sparse-RS, L0: random search over ``eps`` changed pixels, on the model's scores."""

    norm: Literal["l0"] = "l0"

    class Params(PluginParams):
        eps: int = Field(
            default=24, ge=0,
            description="k: how many pixels may change (a pixel counts once, whatever its "
            "channels); each changed pixel is set to a corner of the colour box",
        )
        queries: int = Field(
            default=10000, ge=1,
            description="model queries per example and restart (the initial point included)",
        )
        p_init: float = Field(
            default=0.3, gt=0, le=1, allow_inf_nan=False,
            description="initial fraction α of the k pixels resampled per iteration; halved "
            "at once and decayed to p_init/20 on the reference's schedule (defined for "
            "10,000 queries, rescaled to `queries`)",
        )
        restarts: int = Field(
            default=1, ge=1, description="independent runs; later runs only attack the "
            "examples not yet misclassified",
        )
        seed: int | None = Field(
            default=None, description="seed of the random pixels and colours; null = the "
            "run's seed",
        )

    params: Params

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,) -> (N, C, H, W) adversarial inputs
        (`pagctl.attacks.base.AttackBase`: successive calls continue one seeded stream)."""
        p = self.params
        return sparse_rs(model, x, y, k=p.eps, queries=p.queries, p_init=p.p_init,
                         restarts=p.restarts, generator=self.generator)

    def passes_per_point(self) -> int:
        """The most forwards one call spends on a point (`pagctl.protocols
        .declared_passes`): ``queries`` per restart, the initial point's included, and the
        clean forward. An upper bound: a point stops being queried once misclassified."""
        return 1 + self.params.restarts * self.params.queries
