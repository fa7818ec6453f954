"""PNG figures: the helpers every figure uses, and the figures of ``pagctl attack`` and
``pagctl align-score``.

`pyplot` (matplotlib, an optional dependency: ``pip install 'pagctl[plots]'``), `save_png`
(written atomically: a reader never sees half a PNG) and `show_image` serve every figure,
including those of compare, score runs and the toy experiment; `robustness_curve`,
`adversarial_grid`, `class_grid` and `gradient_grid` are the attack and alignment figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import SpecError
from pagctl.stats import error_bars

if TYPE_CHECKING:
    from torch import Tensor


def pyplot(option: str) -> Any:
    """matplotlib's pyplot on the Agg backend; SpecError naming ``option`` (the option or
    file that asked for a figure) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpecError(f"{option} needs matplotlib: pip install 'pagctl[plots]'") from None
    return plt


def save_png(fig: Any, path: Path) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically."""
    from pagctl.checkpoint import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def show_image(ax: Any, image: Tensor) -> None:
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
    plt = pyplot(option)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for curve in curves:
        eps, acc = list(curve["eps"]), curve["accuracy"]
        style = {"marker": "o", "capsize": 3, **curve.get("style", {})}
        ax.errorbar(eps, acc, yerr=error_bars(acc, curve["interval"]), label=curve["label"],
                    **style)
    ax.set_xlabel(f"ε ({norm or 'budget'})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_png(fig, path)
    plt.close(fig)


def adversarial_grid(path: Path, clean: Tensor, adversarial: Tensor, labels: Tensor,
                     clean_pred: Tensor, adv_pred: Tensor, *, title: str,
                     option: str = "--save-images") -> None:
    """Rows: points; columns: clean | adversarial | perturbation (scaled to its own range,
    grey = 0). Shape: (k, C, H, W) twice, (k,) three times."""
    plt = pyplot(option)
    k = clean.shape[0]
    fig, axes = plt.subplots(k, 3, figsize=(5, 1.7 * k), squeeze=False)
    for i in range(k):
        delta = adversarial[i] - clean[i]
        scale = float(delta.abs().max()) or 1.0
        show_image(axes[i][0], clean[i])
        show_image(axes[i][1], adversarial[i])
        show_image(axes[i][2], delta / (2 * scale) + 0.5)
        axes[i][0].set_ylabel(f"label {int(labels[i])}", fontsize=8)
        axes[i][0].set_title(f"clean → {int(clean_pred[i])}", fontsize=8)
        axes[i][1].set_title(f"adversarial → {int(adv_pred[i])}", fontsize=8)
        axes[i][2].set_title(f"δ (max |δ| {scale:.3g})", fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)
    plt.close(fig)


def class_grid(path: Path, clean: Tensor, turned: Tensor, labels: Tensor, *, title: str,
               option: str = "--save-images") -> None:
    """Rows: points; columns: the clean image, then the image turned toward each class.
    Shape: (k, C, H, W), (k, K, C, H, W), (k,)."""
    plt = pyplot(option)
    k, classes = turned.shape[:2]
    fig, axes = plt.subplots(k, classes + 1, figsize=(1.2 * (classes + 1), 1.3 * k),
                             squeeze=False)
    for i in range(k):
        show_image(axes[i][0], clean[i])
        axes[i][0].set_title(f"clean ({int(labels[i])})", fontsize=7)
        for c in range(classes):
            show_image(axes[i][c + 1], turned[i, c])
            if i == 0:
                axes[i][c + 1].set_title(f"→ {c}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)
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
    plt = pyplot(option)
    k, classes = grads.shape[:2]
    fig, axes = plt.subplots(2 * k, classes + 1, figsize=(1.15 * (classes + 1), 2.3 * k),
                             squeeze=False)
    for i in range(k):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        show_image(top[0], x[i])
        top[0].set_title(f"input ({int(labels[i])})", fontsize=7)
        bottom[0].axis("off")
        bottom[0].text(0.5, 0.5, f"row 1: model\nrow 2: {source}", ha="center", va="center",
                       fontsize=6, transform=bottom[0].transAxes)
        for c in range(classes):
            show_image(top[c + 1], _signed(grads[i, c]))
            show_image(bottom[c + 1], _signed(targets[i, c]))
            if i == 0:
                top[c + 1].set_title(f"t = {c}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)
    plt.close(fig)
