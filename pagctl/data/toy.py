"""The 2-D toy data: two classes, six Gaussian modes on the line x2 = 2 x1.

Its class-conditional density and score are known in closed form (`toy_log_density`,
`toy_score`), so target gradients can be checked exactly. `pagctl.data.load_data` loads
the dataset as ``dataset: toy`` (`toy_sample`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "TOY_MEANS",
    "TOY_MODE_CLASSES",
    "TOY_STD",
    "toy_log_density",
    "toy_sample",
    "toy_score",
]

TOY_STD = 0.02
"""Isotropic standard deviation of every mode."""
TOY_MEANS: tuple[tuple[float, float], ...] = tuple(
    (x1, 2 * x1) for x1 in (0.10, 0.16, 0.22, 0.28, 0.34, 0.40)
)
"""Mode centres, equally spaced on x2 = 2·x1 (0.134 apart, 6.7 σ), symmetric about
(0.25, 0.5) and >= 5 σ inside [0, 1]², so clamping to [0, 1] practically never acts."""
TOY_MODE_CLASSES: tuple[int, ...] = (0, 1, 0, 1, 0, 1)
"""Class of each mode: alternating, so each class is three equally weighted modes."""


def _toy_points(x: Tensor) -> Tensor:
    if x.dim() == 4 and x.shape[1:] == (2, 1, 1):
        return x.reshape(-1, 2)
    if x.dim() == 2 and x.shape[1] == 2:
        return x
    raise ValueError(f"toy points must be (N, 2) or (N, 2, 1, 1), got {tuple(x.shape)}")


def _variance(noise: float) -> float:
    """Per-coordinate variance of a mode after adding N(0, noise²I): σ² + noise²."""
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    return TOY_STD**2 + noise**2


def _toy_masked_log_likelihoods(x: Tensor, cls: int | Tensor | None,
                                noise: float = 0.0) -> Tensor:
    """Shape: (N, 2) -> (N, 6): log N(x; mode, (σ² + noise²)I) for the modes of ``cls``
    (every mode when ``cls`` is None), -inf elsewhere."""
    means = torch.tensor(TOY_MEANS, dtype=x.dtype, device=x.device)
    var = _variance(noise)
    sq = ((x[:, None, :] - means[None]) ** 2).sum(dim=-1)
    log_norm = -math.log(2 * math.pi * var)
    ll = -sq / (2 * var) + log_norm
    if cls is None:
        return ll
    mode_classes = torch.tensor(TOY_MODE_CLASSES, device=x.device)
    labels = torch.as_tensor(cls, device=x.device).reshape(-1).expand(x.shape[0])
    if bool(((labels < 0) | (labels > 1)).any()):
        raise ValueError("toy classes must be 0 or 1")
    mask = mode_classes[None, :] == labels[:, None]
    return ll.masked_fill(~mask, float("-inf"))


def toy_log_density(x: Tensor, cls: int | Tensor | None, noise: float = 0.0) -> Tensor:
    """log p(x | cls) of the (unclamped) toy mixture; ``cls`` None gives the marginal p(x)
    (every mode equally likely, as the classes are balanced). ``noise`` > 0 gives the
    density of x + noise·ε, ε ~ N(0, I): each mode's variance becomes σ² + noise².

    Shape: x (N, 2) or (N, 2, 1, 1); cls an int or (N,) -> (N,). Follows x's dtype/device.
    """
    ll = _toy_masked_log_likelihoods(_toy_points(x), cls, noise)
    modes_of_class = torch.isfinite(ll).sum(dim=1).to(ll.dtype)  # equal mode weights
    return torch.logsumexp(ll, dim=1) - modes_of_class.log()


def toy_score(x: Tensor, cls: int | Tensor | None, noise: float = 0.0) -> Tensor:
    """∇ₓ log p(x | cls) in closed form: Σ_m w_m(x) (μ_m − x) / (σ² + noise²), w = posterior
    over the class's modes (all modes when ``cls`` is None: the marginal's score).

    Shape: x (N, 2) or (N, 2, 1, 1); cls an int or (N,) -> same shape as x.
    """
    points = _toy_points(x)
    weights = torch.softmax(_toy_masked_log_likelihoods(points, cls, noise), dim=1)
    means = torch.tensor(TOY_MEANS, dtype=x.dtype, device=x.device)
    score = ((weights[:, :, None] * (means[None] - points[:, None, :])).sum(dim=1)
             / _variance(noise))
    return score.reshape(x.shape)


def toy_sample(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n points, classes balanced (floor/ceil of n/2), modes of a class used in turn,
    shuffled and clamped to [0, 1].

    Shape: -> images (n, 2, 1, 1) float32, labels (n,) int64.
    """
    gen = torch.Generator().manual_seed(seed)
    modes = []
    for cls, count in ((0, n // 2), (1, n - n // 2)):
        own = [m for m, c in enumerate(TOY_MODE_CLASSES) if c == cls]
        modes += [own[j % len(own)] for j in range(count)]
    mode_idx = torch.tensor(modes)
    means = torch.tensor(TOY_MEANS, dtype=torch.float64)
    points = means[mode_idx] + TOY_STD * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    order = torch.randperm(n, generator=gen)
    images = points[order].clamp(0, 1).float().reshape(n, 2, 1, 1)
    labels = torch.tensor(TOY_MODE_CLASSES)[mode_idx][order]
    return images, labels
