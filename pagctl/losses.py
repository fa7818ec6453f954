"""The training losses: the PAG term and its pieces (cosine alignment, target-class
sampling), and the adversarial-training objectives it adds to.

The paper's objective adds, for every image, a sum over target classes t of
``1 − cos(∇ₓ log p(t | x), g(x, t))`` to the cross-entropy. pagctl averages over the K sampled
classes instead of summing, so its weight λ is the real weight on the mean cosine loss:

    loss = objective(f(x), f(x_adv), y) + λ · pag_loss(model_grads, target_grads)

The objectives (`objective_loss`, from the logits on the clean and the adversarial inputs):

- ``ce``: CE(f(x), y);
- ``pgd_at`` and ``fast_at`` (Madry et al. 2018; Wong et al. 2020): CE(f(x_adv), y);
- ``trades`` (Zhang et al. 2019): CE(f(x), y) + β · KL(p(x) ‖ p(x_adv)), batch mean;
- ``mart`` (Wang et al. 2020): BCE(f(x_adv), y) + β · mean_i KL(p(x_i) ‖ p(x_adv,i)) ·
  (1 − p_y(x_i)), with BCE = CE(f(x_adv), y) − log(1 − max_{k≠y} p_k(x_adv)).

The inner attacks that make ``x_adv`` are registered pagctl attacks (`pagctl.objectives`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OBJECTIVES", "cosine_alignment", "kl_divergence", "mart_loss", "objective_loss",
           "pag_loss", "sample_target_classes", "trades_loss"]

OBJECTIVES = ("ce", "pgd_at", "trades", "mart", "fast_at")
"""The training objectives ``train.objective`` names (module docstring)."""


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


# ---------------------------------------------------------------------------------------
# adversarial-training objectives


def kl_divergence(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """KL(p(x) ‖ p(x_adv)) per example, p = softmax. Gradients flow into both arguments (the
    references do not detach the clean prediction). Shape: (N, K), (N, K) -> (N,)."""
    p_log = F.log_softmax(clean_logits, dim=1)
    q_log = F.log_softmax(adv_logits, dim=1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=1)


def trades_loss(clean_logits: Tensor, adv_logits: Tensor, labels: Tensor, beta: float
                ) -> tuple[Tensor, Tensor]:
    """TRADES (Zhang et al. 2019, yaodongyu/TRADES ``trades_loss``): (loss, robust term) with
    loss = CE(f(x), y) + β · robust and robust = mean_i KL(p(x_i) ‖ p(x_adv,i)) (the
    reference's ``KLDivLoss(size_average=False) / batch_size``). Shape: (N, K), (N, K), (N,)
    -> (), ()."""
    robust = kl_divergence(clean_logits, adv_logits).mean()
    return F.cross_entropy(clean_logits, labels) + beta * robust, robust


def mart_loss(clean_logits: Tensor, adv_logits: Tensor, labels: Tensor, beta: float
              ) -> tuple[Tensor, Tensor]:
    """MART (Wang et al. 2020, YisenWang/MART ``mart_loss``): (loss, robust term).

    loss = CE(f(x_adv), y) − mean_i log(1.0001 − p_{k*}(x_adv,i) + 1e-12) + β · robust, with
    k* the most likely wrong class at x_adv and robust = mean_i KL(p(x_i) ‖ p(x_adv,i)) ·
    (1.0000001 − p_y(x_i)); the small constants are the reference's.
    Shape: (N, K), (N, K), (N,) -> (), ()."""
    adv_probs = F.softmax(adv_logits, dim=1)
    top2 = adv_probs.argsort(dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(adv_logits, labels) + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), wrong)
    clean_probs = F.softmax(clean_logits, dim=1)
    true_probs = clean_probs.gather(1, labels[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), clean_probs, reduction="none").sum(dim=1)
    robust = (kl * (1.0000001 - true_probs)).mean()
    return bce + beta * robust, robust


def objective_loss(objective: str, clean_logits: Tensor | None, adv_logits: Tensor | None,
                   labels: Tensor, beta: float) -> tuple[Tensor, Tensor | None]:
    """(loss, robust term or None) of ``objective`` (module docstring) from the logits it
    needs: ``ce`` the clean ones, ``pgd_at``/``fast_at`` the adversarial ones, ``trades`` and
    ``mart`` both. Shape: (N, K) logits, (N,) labels -> (), () or None."""
    if objective == "ce":
        assert clean_logits is not None
        return F.cross_entropy(clean_logits, labels), None
    if objective in ("pgd_at", "fast_at"):
        assert adv_logits is not None
        return F.cross_entropy(adv_logits, labels), None
    assert clean_logits is not None and adv_logits is not None
    if objective == "trades":
        return trades_loss(clean_logits, adv_logits, labels, beta)
    if objective == "mart":
        return mart_loss(clean_logits, adv_logits, labels, beta)
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
