"""The PAG loss and its pieces: cosine alignment and target-class sampling.

The paper's objective adds, for every image, a sum over target classes t of
``1 − cos(∇ₓ log p(t | x), g(x, t))`` to the cross-entropy. pagctl averages over the K sampled
classes instead of summing, so its weight λ is the real weight on the mean cosine loss:

    loss = CE(f(x), y) + λ · pag_loss(model_grads, target_grads)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cosine_alignment", "pag_loss", "sample_target_classes"]


def cosine_alignment(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity of ``a[i, k]`` and ``b[i, k]``, each flattened to one vector.

    Shape: a (N, K, ...), b (N, K, ...) same shape -> (N, K), values in [−1, 1].

    A pair in which either vector has an L2 norm ≤ ``eps`` has no direction: its cosine is
    0 and it passes a zero gradient to both ``a`` and ``b`` (never NaN or inf). Otherwise the
    value is ``<a, b> / (‖a‖ ‖b‖)`` exactly, with no clamping that would bias small vectors.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"expected (N, K, ...) tensors, got shape {tuple(a.shape)}")
    flat_a = a.flatten(2)
    flat_b = b.flatten(2)
    dot = (flat_a * flat_b).sum(dim=2)
    norm_a = torch.linalg.vector_norm(flat_a, dim=2)
    norm_b = torch.linalg.vector_norm(flat_b, dim=2)
    defined = (norm_a > eps) & (norm_b > eps)
    # The "double where": the denominator of an undefined pair is replaced by 1 before the
    # division, so that neither the forward nor the backward ever divides by zero.
    denom = torch.where(defined, norm_a * norm_b, torch.ones_like(norm_a))
    return torch.where(defined, dot / denom, torch.zeros_like(dot))


def pag_loss(model_grads: Tensor, target_grads: Tensor) -> Tensor:
    """Mean over images and target classes of ``1 − cos(model gradient, target gradient)``.

    Shape: model_grads (N, K, C, H, W), target_grads (N, K, C, H, W) -> () scalar in [0, 2].

    ``λ · pag_loss`` is the paper's PAG term with the per-image sum over classes replaced by
    a mean over the K sampled classes: with K = C (all classes) λ = C · λ_paper. The official
    code's ``pag_coeff`` c multiplies ``10 · (1 − mean cosine)`` over K = 10 classes, so it
    corresponds to λ = 10 · c (ResNet-18: c = 1.5, λ = 15). Targets may have any scale (the
    cosine ignores it); they are not detached here, so pass targets without a graph unless
    the gradient should flow into their source.
    """
    return (1.0 - cosine_alignment(model_grads, target_grads)).mean()


def sample_target_classes(
    labels: Tensor, num_classes: int, k: int, generator: torch.Generator
) -> Tensor:
    """K distinct target classes per image, drawn uniformly without replacement.

    Shape: labels (N,) int64 -> (N, K) int64 in [0, num_classes), on ``labels.device``.

    Each row is the first K entries of a uniformly random permutation of the classes (the
    official code's ``randperm(C)[:K]``), so the true class is included only by chance unless
    K == num_classes, when every row is a permutation of all classes. Randomness comes only
    from ``generator``, which must live on the CPU; the global RNG is never used, so a fixed
    generator seed gives the same classes on every device.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be shaped (N,), got {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, num_classes={num_classes}], got {k}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    # The K largest of C i.i.d. uniforms form a uniformly random ordered K-subset; float64
    # makes ties (which would bias the draw) practically impossible even for many classes.
    keys = torch.rand(labels.shape[0], num_classes, generator=generator, dtype=torch.float64)
    classes = keys.topk(k, dim=1).indices
    return classes.to(labels.device)
