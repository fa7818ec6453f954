"""PNG figures of attacks: robustness-vs-ε curves and adversarial image grids.

matplotlib is an optional dependency (``pip install 'pagctl[plots]'``); every figure is
written atomically (a reader never sees half a PNG).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import SpecError

if TYPE_CHECKING:
    from torch import Tensor, nn


def _pyplot(option: str) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpecError(f"{option} needs matplotlib: pip install 'pagctl[plots]'") from None
    return plt


def _save(fig: Any, path: Path) -> None:
    from pagctl.checkpoint import _atomic_path

    with _atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _show(ax: Any, image: Tensor) -> None:
    """Draw a (C, H, W) image in [0, 1]; one channel in grey."""
    pixels = image.detach().float().cpu().clamp(0, 1)
    if pixels.shape[0] == 1:
        ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(pixels.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def robustness_curve(path: Path, curves: list[dict[str, Any]], *, norm: str | None,
                     title: str, option: str = "--plot") -> None:
    """Robust accuracy vs ε with 95% intervals, one line per curve.

    ``curves``: dicts with ``label``, ``eps`` (list), ``accuracy`` (list), ``interval``
    (list of (low, high)) and optional ``style`` (matplotlib keyword arguments).
    """
    plt = _pyplot(option)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for curve in curves:
        eps, acc = list(curve["eps"]), curve["accuracy"]
        low = [a - lo for a, (lo, _) in zip(acc, curve["interval"], strict=True)]
        high = [hi - a for a, (_, hi) in zip(acc, curve["interval"], strict=True)]
        style = {"marker": "o", "capsize": 3, **curve.get("style", {})}
        ax.errorbar(eps, acc, yerr=[low, high], label=curve["label"], **style)
    ax.set_xlabel(f"ε ({norm or 'budget'})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def adversarial_grid(path: Path, clean: Tensor, adversarial: Tensor, labels: Tensor,
                     clean_pred: Tensor, adv_pred: Tensor, *, title: str,
                     option: str = "--save-images") -> None:
    """Rows: points; columns: clean | adversarial | perturbation (scaled to its own range,
    grey = 0). Shape: (k, C, H, W) twice, (k,) three times."""
    plt = _pyplot(option)
    k = clean.shape[0]
    fig, axes = plt.subplots(k, 3, figsize=(5, 1.7 * k), squeeze=False)
    for i in range(k):
        delta = adversarial[i] - clean[i]
        scale = float(delta.abs().max()) or 1.0
        _show(axes[i][0], clean[i])
        _show(axes[i][1], adversarial[i])
        _show(axes[i][2], delta / (2 * scale) + 0.5)
        axes[i][0].set_ylabel(f"label {int(labels[i])}", fontsize=8)
        axes[i][0].set_title(f"clean → {int(clean_pred[i])}", fontsize=8)
        axes[i][1].set_title(f"adversarial → {int(adv_pred[i])}", fontsize=8)
        axes[i][2].set_title(f"δ (max |δ| {scale:.3g})", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def turn_toward_classes(model: nn.Module, x: Tensor, *, num_classes: int, norm: str,
                        eps: float, steps: int = 60) -> Tensor:
    """Targeted PGD on the cross-entropy toward every class, inside the ``norm`` ball of
    radius ``eps`` (a large ε shows what the model's gradients "think" each class looks
    like: the paper's qualitative figure). Shape: (k, C, H, W) -> (k, num_classes, C, H, W).
    """
    import torch

    from pagctl.attack import eval_mode
    from pagctl.attacks.steps import (
        fit_to_budget,
        loss_gradient,
        normalize_l2,
        project_l2,
        project_linf,
    )

    k = x.shape[0]
    xs = x.repeat_interleave(num_classes, dim=0)
    targets = torch.arange(num_classes, device=x.device).repeat(k)
    step = eps * max(2.5 / steps, 0.05)
    x_k = xs.clone()
    with eval_mode(model):
        for _ in range(steps):
            grad = loss_gradient(model, x_k, targets, "ce", targeted=True)
            move = normalize_l2(grad) if norm == "l2" else grad.sign()
            delta = x_k + step * move - xs
            delta = project_l2(delta, eps) if norm == "l2" else project_linf(delta, eps)
            x_k = (xs + delta).clamp(0.0, 1.0)
    out = fit_to_budget(xs, x_k, "l2" if norm == "l2" else "linf", eps)
    return out.reshape(k, num_classes, *x.shape[1:])


def class_grid(path: Path, clean: Tensor, turned: Tensor, labels: Tensor, *, title: str,
               option: str = "--save-images") -> None:
    """Rows: points; columns: the clean image, then the image turned toward each class.
    Shape: (k, C, H, W), (k, K, C, H, W), (k,)."""
    plt = _pyplot(option)
    k, classes = turned.shape[:2]
    fig, axes = plt.subplots(k, classes + 1, figsize=(1.2 * (classes + 1), 1.3 * k),
                             squeeze=False)
    for i in range(k):
        _show(axes[i][0], clean[i])
        axes[i][0].set_title(f"clean ({int(labels[i])})", fontsize=7)
        for c in range(classes):
            _show(axes[i][c + 1], turned[i, c])
            if i == 0:
                axes[i][c + 1].set_title(f"→ {c}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)


def _signed(image: Tensor) -> Tensor:
    """A signed map shown in [0, 1] with grey = 0, scaled by its own largest magnitude."""
    scale = float(image.abs().max()) or 1.0
    return image / (2 * scale) + 0.5


def gradient_grid(path: Path, x: Tensor, labels: Tensor, grads: Tensor, targets: Tensor, *,
                  title: str, source: str, option: str = "--save-images") -> None:
    """For each image, two rows: the model's ∇ₓ log p(t|x) and the source's g(x, t) for
    every class t, next to the input. Each map is scaled by its own largest magnitude (grey
    = 0), so only directions are compared, as the cosine does.
    Shape: (k, C, H, W), (k,), (k, K, C, H, W) twice."""
    plt = _pyplot(option)
    k, classes = grads.shape[:2]
    fig, axes = plt.subplots(2 * k, classes + 1, figsize=(1.15 * (classes + 1), 2.3 * k),
                             squeeze=False)
    for i in range(k):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        _show(top[0], x[i])
        top[0].set_title(f"input ({int(labels[i])})", fontsize=7)
        bottom[0].axis("off")
        bottom[0].text(0.5, 0.5, f"row 1: model\nrow 2: {source}", ha="center", va="center",
                       fontsize=6, transform=bottom[0].transAxes)
        for c in range(classes):
            _show(top[c + 1], _signed(grads[i, c]))
            _show(bottom[c + 1], _signed(targets[i, c]))
            if i == 0:
                top[c + 1].set_title(f"t = {c}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)
