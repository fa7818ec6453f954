"""The toy experiment's figures: decision regions (decision_boundaries.png) and robust
accuracy against ε (robustness.png). matplotlib is needed; `pagctl.toy_experiment` draws
them when asked for figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pagctl.toy_experiment.measures import predict_grid

__all__ = ["decision_boundaries_figure", "robustness_figure"]


# ---------------------------------------------------------------------------------------
# figures


def _bayes_boundaries() -> list[tuple[float, float]]:
    """Midpoints between neighbouring modes of different classes (the Bayes boundary crosses
    the line of modes there, perpendicular to it)."""
    from pagctl.data.toy import TOY_MEANS, TOY_MODE_CLASSES

    mids = []
    for (a, ca), (b, cb) in zip(zip(TOY_MEANS, TOY_MODE_CLASSES, strict=True),
                                zip(TOY_MEANS[1:], TOY_MODE_CLASSES[1:], strict=True),
                                strict=False):
        if ca != cb:
            mids.append(((a[0] + b[0]) / 2, (a[1] + b[1]) / 2))
    return mids


def decision_boundaries_figure(path: Path, panels: list[list[dict[str, Any]]]) -> None:
    """One row per seed, one panel per model: decision regions, training points, mode centres
    (×), Bayes boundaries (dashed). ``panels[row][column]``: dicts with ``model``, ``train``
    (images, labels) and ``title``."""
    from matplotlib.colors import ListedColormap

    from pagctl.data.toy import TOY_MEANS
    from pagctl.figures import pyplot, save_figure

    plt = pyplot("the toy experiment")
    window = ((0.0, 0.6), (0.05, 1.0))
    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 3.9 * rows + 0.45),
                             squeeze=False)
    colors = ("#3b6fb6", "#c8453c")
    regions = ListedColormap(["#c9d7ee", "#f2cbc7"])
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            ax = axes[r][c]
            x1, x2, grid = predict_grid(panel["model"], window, 0.002)
            ax.imshow(grid.T.numpy(), origin="lower", cmap=regions, vmin=0, vmax=1,
                      extent=(window[0][0], window[0][1], window[1][0], window[1][1]),
                      interpolation="nearest", aspect="equal")
            ax.contour(x1.numpy(), x2.numpy(), grid.T.float().numpy(), levels=[0.5],
                       colors="k", linewidths=0.8)
            images, labels = panel["train"]
            pts = images.reshape(-1, 2)
            for k in (0, 1):
                mine = pts[labels == k]
                ax.scatter(mine[:, 0], mine[:, 1], s=8, color=colors[k], edgecolors="k",
                           linewidths=0.3, label=f"class {k}", zorder=3)
            ax.scatter([m[0] for m in TOY_MEANS], [m[1] for m in TOY_MEANS], marker="x",
                       color="k", s=25, zorder=4, label="mode centre")
            for mx, my in _bayes_boundaries():  # perpendicular to the direction (1, 2)
                t = 0.45
                ax.plot([mx - 2 * t, mx + 2 * t], [my + t, my - t], ls="--", lw=0.7,
                        color="0.35", zorder=2)
            ax.set_xlim(*window[0])
            ax.set_ylim(*window[1])
            ax.set_title(panel["title"], fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, loc="upper left")
    height = 3.9 * rows + 0.45
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.45 / height))
    fig.suptitle("decision regions (black: model boundary; dashed: Bayes boundaries)",
                 fontsize=10, y=1.0 - 0.12 / height)
    save_figure(fig, path)
    plt.close(fig)


def robustness_figure(path: Path, eps: Sequence[float], curves: list[dict[str, Any]],
                      title: str) -> None:
    """Robust accuracy vs ε with 95% Wilson intervals. ``curves``: dicts with ``label``,
    ``accuracy``, ``interval`` and optional ``style`` (matplotlib keyword arguments)."""
    from pagctl.figures import robustness_curve

    robustness_curve(path, [{**curve, "eps": list(eps)} for curve in curves], norm="L2",
                     title=title, option="the toy experiment")
