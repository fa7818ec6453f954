"""What the toy experiment measures besides attacks, on the 2-D toy (`pagctl.toy`).

`grid_min_distance` gives each point's exact minimal adversarial perturbation by evaluating
the model on a fine grid (`predict_grid`); `bayes_classifier` is the reference classifier;
`score_alignment` compares a model's input gradients with the exact posterior score. Used
by the toy experiment (`pagctl.toy_experiment`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["GRID_RESOLUTION", "bayes_classifier", "grid_min_distance", "predict_grid",
           "score_alignment"]

GRID_RESOLUTION = 0.001


# ---------------------------------------------------------------------------------------
# exact robustness in two dimensions


def _window(points: Tensor, margin: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The points' bounding box grown by ``margin`` and clipped to [0, 1]²:
    ((x1 low, x1 high), (x2 low, x2 high))."""
    lo = (points.min(dim=0).values - margin).clamp(0, 1).tolist()
    hi = (points.max(dim=0).values + margin).clamp(0, 1).tolist()
    return (lo[0], hi[0]), (lo[1], hi[1])


def predict_grid(model: Callable[[Tensor], Tensor],
                 window: tuple[tuple[float, float], tuple[float, float]],
                 resolution: float) -> tuple[Tensor, Tensor, Tensor]:
    """The model's class at every point of a regular grid over ``window``.

    Shape: -> x1 values (A,), x2 values (B,), classes (A, B) int64 (``[i, j]`` at
    (x1[i], x2[j])).
    """
    import torch

    (a0, a1), (b0, b1) = window
    x1 = torch.arange(a0, a1 + resolution / 2, resolution, dtype=torch.float64).float()
    x2 = torch.arange(b0, b1 + resolution / 2, resolution, dtype=torch.float64).float()
    grid = torch.stack(torch.meshgrid(x1, x2, indexing="ij"), dim=-1).reshape(-1, 2)
    classes = []
    with torch.no_grad():
        for lo in range(0, grid.shape[0], 65536):
            classes.append(model(grid[lo: lo + 65536].reshape(-1, 2, 1, 1)).argmax(dim=1))
    return x1, x2, torch.cat(classes).cpu().reshape(len(x1), len(x2))


def grid_min_distance(model: Callable[[Tensor], Tensor], points: Tensor, labels: Tensor, *,
                      max_eps: float = 0.1, resolution: float = GRID_RESOLUTION) -> Tensor:
    """Each point's L2 distance to the nearest grid point the model assigns to another class:
    its minimal adversarial perturbation inside [0, 1]², to the grid's resolution.

    The grid covers the points' bounding box grown by ``max_eps`` + 0.02 (clipped to
    [0, 1]²); a point with no other class in reach of the grid gets ``inf``. A point the
    model already misclassifies gets 0. A robust-accuracy verdict "not robust at ε" (distance
    ≤ ε) is certain: the grid point is an adversarial example. "Robust" can only be wrong
    for an adversarial region thinner than the grid spacing.
    Shape: points (N, 2) or (N, 2, 1, 1) CPU, labels (N,) -> (N,) float32.
    """
    import torch

    pts = points.detach().reshape(-1, 2).float().cpu()
    y = labels.detach().cpu()
    x1, x2, grid = predict_grid(model, _window(pts, max_eps + 0.02), resolution)
    # Cells with a 4-neighbour of another class: the nearest cell of another class to a point
    # outside it is always one of these.
    edge = torch.zeros_like(grid, dtype=torch.bool)
    vertical = grid[1:] != grid[:-1]
    horizontal = grid[:, 1:] != grid[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    cells = torch.stack(torch.meshgrid(x1, x2, indexing="ij"), dim=-1)[edge]
    cell_class = grid[edge]
    with torch.no_grad():
        clean = model(pts.reshape(-1, 2, 1, 1)).argmax(dim=1).cpu()
    dist = torch.full((pts.shape[0],), float("inf"))
    for c in torch.unique(cell_class).tolist():
        mine = cells[cell_class == c]
        rows = torch.nonzero(y != c).squeeze(1)
        for lo in range(0, rows.numel(), 1024):
            r = rows[lo: lo + 1024]
            dist[r] = torch.minimum(dist[r], torch.cdist(pts[r], mine).min(dim=1).values)
    dist[clean != y] = 0.0
    return dist


def bayes_classifier() -> nn.Module:
    """The toy's Bayes classifier as a module: logits log p(x | t) (the classes are
    balanced). Shape: (N, 2, 1, 1) -> (N, 2)."""
    import torch
    from torch import nn

    from pagctl.data.toy import toy_log_density

    class Bayes(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.stack([toy_log_density(x, t) for t in (0, 1)], dim=1)

    return Bayes()


def score_alignment(model: nn.Module, images: Tensor, labels: Tensor,
                    noise: float | None = None) -> tuple[float, float]:
    """Mean cosine between the model's ∇ₓ log p(t|x) and the exact posterior score
    (``toy_score``, both classes of every point), and the mean of its absolute value.

    The absolute value measures orientation only: in two classes both gradients lie on one
    line, and the exact target is parallel to the line of modes everywhere, flipping sign at
    each middle mode's centre (where p(t|x) peaks), so the signed mean also counts where a
    model puts that ridge. Shape: images (N, 2, 1, 1), labels (N,).
    """
    import torch

    from pagctl.gradients import logits_and_input_gradients
    from pagctl.losses import cosine_alignment
    from pagctl.protocols import BuildContext
    from pagctl.target_gradients.toy_score import ToyScore

    ctx = BuildContext(num_classes=2, input_shape=(2, 1, 1), device=images.device, seed=0)
    params = ToyScore.Params() if noise is None else ToyScore.Params(noise=noise)
    classes = torch.stack([labels, 1 - labels], dim=1)
    _, grads = logits_and_input_gradients(model, images, classes)
    cos = cosine_alignment(grads, ToyScore(params, ctx)(images, labels, classes))
    return float(cos.mean()), float(cos.abs().mean())
