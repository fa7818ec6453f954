"""The samples figure of a score run (samples.png).

`write_samples_figure` samples ``spec.sample.per_class`` images of every class with the
trained model and draws them: a grid with one row per class (`image_grid_figure`) or, for
the 2-D toy points, a scatter over the training data (`points_figure`). matplotlib is
optional; without it the figure is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pagctl.score.model import sample

if TYPE_CHECKING:
    from torch import Tensor

    from pagctl.data import DataBundle
    from pagctl.score.model import ScoreModel
    from pagctl.score.spec import ScoreSpec

__all__ = ["SAMPLES_FILE", "image_grid_figure", "points_figure", "write_samples_figure"]

SAMPLES_FILE = "samples.png"


def write_samples_figure(run_dir: Path, model: ScoreModel, bundle: DataBundle,
                         spec: ScoreSpec, *, log: Callable[[str], None] | None = None
                         ) -> Path | None:
    """Sample ``spec.sample.per_class`` images of every class and write samples.png: one row
    per class, or, for 2-D points, a scatter of the samples coloured by class over the
    training data. Returns the path, or None when matplotlib is missing."""
    import torch

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if log is not None:
            log(f"{SAMPLES_FILE} skipped: matplotlib is missing (pip install 'pagctl[plots]')")
        return None
    per = spec.sample.per_class
    k = bundle.num_classes
    classes = torch.arange(k).repeat_interleave(per)
    was_training = model.training
    model.eval()
    try:
        images = sample(model, classes, steps=spec.sample.steps,
                        generator=torch.Generator().manual_seed(spec.train.seed + 1),
                        guidance=spec.sample.guidance).cpu()
    finally:
        model.train(was_training)
    path = run_dir / SAMPLES_FILE
    title = f"{spec.name}: {per} samples per class ({spec.sample.steps} Heun steps" + (
        f", guidance {spec.sample.guidance:g})" if spec.sample.guidance else ")")
    if bundle.input_shape == (2, 1, 1):
        from pagctl.data import as_tensors

        data, labels = as_tensors(bundle.train)
        points_figure(path, data.reshape(-1, 2), labels, images.reshape(-1, 2), classes,
                      title=title)
    else:
        image_grid_figure(path, images.reshape(k, per, *bundle.input_shape),
                          list(bundle.class_names), title=title)
    return path


def image_grid_figure(path: Path, images: Tensor, row_names: list[str], *, title: str) -> None:
    """One row per class. Shape: images (rows, per_row, C, H, W) in [0, 1]."""
    from pagctl.figures import pyplot, save_figure, show_image

    plt = pyplot("samples.png")
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(0.7 * cols + 0.6, 0.7 * rows + 0.4),
                             squeeze=False)
    for r in range(rows):
        for c in range(cols):
            show_image(axes[r][c], images[r, c])
        axes[r][0].set_ylabel(row_names[r] if r < len(row_names) else str(r), fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    plt.close(fig)


def points_figure(path: Path, data: Tensor, labels: Tensor, points: Tensor, classes: Tensor,
                  *, title: str) -> None:
    """Samples (coloured by class) over the training data (light). Shape: (N, 2), (N,),
    (M, 2), (M,)."""
    from pagctl.figures import pyplot, save_figure

    plt = pyplot("samples.png")
    fig, ax = plt.subplots(figsize=(5, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for cls in sorted(set(labels.tolist()) | set(classes.tolist())):
        colour = colours[cls % len(colours)]
        d = data[labels == cls]
        ax.scatter(d[:, 0], d[:, 1], s=4, alpha=0.15, color=colour)
        p = points[classes == cls]
        ax.scatter(p[:, 0], p[:, 1], s=14, color=colour, edgecolors="black", linewidths=0.4,
                   label=f"samples of class {cls}")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    plt.close(fig)
