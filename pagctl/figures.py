"""Figures: the helpers every figure uses, and the figures of ``pagctl attack`` and
``pagctl align-score``.

`pyplot` (matplotlib, an optional dependency: ``pip install 'pagctl[plots]'``),
`figure_format` (PNG, PDF or SVG, chosen by the file's suffix), `save_figure` (written
atomically, so a reader never sees half a file, at `DEFAULT_DPI` unless told otherwise) and
`show_image` serve every figure, including those of compare, score runs, the study and the
toy experiment; `robustness_curve`, `adversarial_grid`, `class_grid` and `gradient_grid` are
the attack and alignment figures.
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


FIGURE_FORMATS = ("png", "pdf", "svg")
"""What a figure can be written as; the file's suffix says which."""
DEFAULT_DPI = 200
"""Dots per inch of a PNG (and of the raster parts, such as images, of a PDF or SVG): sharp
in print at the figure's natural size."""


def figure_format(option: str, path: Path, formats: tuple[str, ...] = FIGURE_FORMATS) -> str:
    """The format ``path``'s suffix names (``png``, ``pdf`` or ``svg``, case ignored); a
    SpecError naming ``option`` when it is not one of ``formats``."""
    suffix = path.suffix.lower().removeprefix(".")
    if suffix in formats:
        return suffix
    if formats == ("png",):
        raise SpecError(f"{option}: writes a PNG; give a file name ending in .png")
    names = [f".{f}" for f in formats]
    allowed = ", ".join(names[:-1]) + f" or {names[-1]}"
    got = f"'{path.suffix}'" if path.suffix else "no suffix"
    raise SpecError(f"{option}: the suffix picks the format, and {got} is none of them; give "
                    f"a file name ending in {allowed}")


def save_figure(fig: Any, path: Path, *, dpi: int = DEFAULT_DPI) -> None:
    """Write ``fig`` to ``path``, atomically, in the format of its suffix (`figure_format`)
    at ``dpi``, cropped to what is drawn (``bbox_inches="tight"``: nothing drawn is cut
    off)."""
    from pagctl.checkpoint import atomic_path

    fmt = figure_format(str(path), path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.04)


def show_image(ax: Any, image: Tensor) -> None:
    """Draw a (C, H, W) image in [0, 1]; one channel in grey."""
    pixels = image.detach().float().cpu().clamp(0, 1)
    if pixels.shape[0] == 1:
        ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(pixels.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
"""Markers told apart in print, in the order given out (one per attack in a panel)."""


def distinct_colours(count: int) -> list[str]:
    """``count`` colours, all different: matplotlib's tab10 up to 10, tab20 up to 20, then
    evenly spaced along viridis (close, but never the same)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if count <= 10:
        return [f"C{i}" for i in range(count)]
    if count <= 20:
        cmap = colormaps["tab20"]
        return [to_hex(cmap(i)) for i in range(count)]
    cmap = colormaps["viridis"]
    return [to_hex(cmap(i / (count - 1))) for i in range(count)]


def padded_range(low: float, high: float, *, min_span: float,
                 bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """An axis range showing [low, high] with room around it: 8% of the span each side, and
    at least ``min_span`` wide (centred on the data), so a few close values are not spread
    over the whole axis as if they differed much. Kept inside ``bounds`` (the range the
    quantity can take, with the same margin) where given."""
    span = max(high - low, min_span / 1.16)
    mid = (low + high) / 2
    lo, hi = mid - 0.58 * span, mid + 0.58 * span
    if bounds is not None:
        margin = 0.02 * (bounds[1] - bounds[0])
        floor, ceiling = bounds[0] - margin, bounds[1] + margin
        if lo < floor:
            lo, hi = floor, min(ceiling, hi + (floor - lo))
        if hi > ceiling:
            lo, hi = max(floor, lo - (hi - ceiling)), ceiling
    return lo, hi


ACCURACY_RANGE = (-0.02, 1.02)
"""The y range of an accuracy axis: all of [0, 1], so two figures compare at a glance."""


def eps_window(eps: list[float]) -> tuple[float, float] | None:
    """The x range of a robust accuracy vs ε axis drawn at a single ε: from 0 to twice it
    (0 is the clean model's budget), instead of a needle-thin window around one value;
    None for several ε (matplotlib's own range is right then)."""
    values = set(eps)
    if len(values) != 1:
        return None
    (only,) = values
    return (0.0, 2 * only) if only > 0 else (-0.5, 0.5)


def robustness_curve(path: Path, curves: list[dict[str, Any]], *, norm: str | None,
                     title: str, option: str = "--plot", dpi: int = DEFAULT_DPI) -> None:
    """Robust accuracy vs ε with 95% intervals, one line per curve, on all of [0, 1]; the
    file's format is its suffix's (`save_figure`).

    ``curves``: dicts with ``label``, ``eps`` (list), ``accuracy`` (list), ``interval``
    (list of (low, high)) and optional ``style`` (matplotlib keyword arguments); without a
    style, each curve has its own colour and marker.
    """
    plt = pyplot(option)
    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    try:
        colours = distinct_colours(len(curves))
        for i, curve in enumerate(curves):
            eps, acc = list(curve["eps"]), curve["accuracy"]
            style = {"marker": MARKERS[i % len(MARKERS)], "color": colours[i], "capsize": 3,
                     **curve.get("style", {})}
            ax.errorbar(eps, acc, yerr=error_bars(acc, curve["interval"]),
                        label=curve["label"], **style)
        window = eps_window([e for curve in curves for e in curve["eps"]])
        if window is not None:
            ax.set_xlim(*window)
        ax.set_xlabel(f"ε ({norm or 'budget'})")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(*ACCURACY_RANGE)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=10)
        if len(curves) <= 6:
            ax.legend(fontsize=8)
        else:
            fig.legend(fontsize=7, loc="outside right upper")
        save_figure(fig, path, dpi=dpi)
    finally:
        plt.close(fig)


def adversarial_grid(path: Path, clean: Tensor, adversarial: Tensor, labels: Tensor,
                     clean_pred: Tensor, adv_pred: Tensor, *, title: str,
                     option: str = "--save-images", dpi: int = DEFAULT_DPI) -> None:
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
    save_figure(fig, path, dpi=dpi)
    plt.close(fig)


def class_grid(path: Path, clean: Tensor, turned: Tensor, labels: Tensor, *, title: str,
               option: str = "--save-images", dpi: int = DEFAULT_DPI) -> None:
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
    save_figure(fig, path, dpi=dpi)
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
    save_figure(fig, path)
    plt.close(fig)
