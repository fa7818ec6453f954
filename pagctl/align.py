"""Alignment of a model's input gradients with a target-gradient source.

The metric uses the same primitive as the training objective
(``pagctl.gradients.logits_and_input_gradients`` and ``pagctl.losses.cosine_alignment``), so
metric and objective cannot drift apart. Any registered source can be the reference,
whatever the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagctl.records import AlignRecord, Subset
from pagctl.stats import mean_interval, subset_record

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
    from torch.utils.data import Dataset

    from pagctl.protocols import TargetGradientSource



@dataclass
class AlignReport:
    """Cosine between ∇ₓ log p(t|x) and the source's g(x, t), over images and K targets.

    ``mean`` averages every (image, target) pair; ``interval`` is a 95% normal interval of
    that mean computed over images (each image's K cosines averaged first, so the pairs of
    one image are not counted as independent). ``fraction_positive``: images whose mean
    cosine is > 0. ``per_true_class``: mean by the image's label. ``per_target``: mean over
    pairs whose target is the image's own label (``true``) and over the others (``other``);
    None when no pair of that kind was sampled.
    """

    n: int
    classes_per_image: int
    mean: float
    interval: tuple[float, float]
    fraction_positive: float
    per_true_class: dict[str, float] = field(default_factory=dict)
    per_target: dict[str, float | None] = field(default_factory=dict)
    subset: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    seconds: float = 0.0

    def to_record(self, source: str, source_params: dict[str, Any],
                  params_given: dict[str, Any]) -> AlignRecord:
        """The metrics.jsonl record of this score against ``source`` (its validated params,
        and the params as the user typed them)."""
        return AlignRecord(
            source=source, source_params=source_params, params_given=params_given, n=self.n,
            classes_per_image=self.classes_per_image, mean=self.mean, interval=self.interval,
            fraction_positive=self.fraction_positive, per_true_class=self.per_true_class,
            per_target=self.per_target, subset=Subset(**self.subset), seed=self.seed,
            seconds=self.seconds)


def alignment_report(
    model: nn.Module,
    dataset: Dataset[Any],
    indices: Tensor,
    source: TargetGradientSource,
    *,
    num_classes: int,
    classes_per_image: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> AlignReport:
    """Alignment of ``model`` with ``source`` on ``dataset[indices]`` (see AlignReport).

    Evaluated in eval mode (restored afterwards); K classes per image drawn without
    replacement from a generator seeded with ``seed``. The source is called with
    ``index=None`` (the images are treated as unseen test images).
    """
    import time

    import torch

    from pagctl.data import get_batch
    from pagctl.gradients import logits_and_input_gradients
    from pagctl.losses import cosine_alignment, sample_target_classes
    from pagctl.models import check_finite_outputs, eval_mode
    from pagctl.progress import ProgressBar

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    per_image: list[Tensor] = []
    labels: list[Tensor] = []
    true_sum = other_sum = 0.0
    true_count = other_count = 0
    with eval_mode(model), ProgressBar("align", len(indices), enabled=progress) as bar:
        for lo in range(0, len(indices), batch_size):
            x, y = get_batch(dataset, indices[lo: lo + batch_size])
            x, y = x.to(device), y.to(device)
            classes = sample_target_classes(y, num_classes, classes_per_image, gen)
            with torch.no_grad():
                targets = source(x, y, classes)
            logits, grads = logits_and_input_gradients(model, x, classes)
            check_finite_outputs(logits, "alignment")
            cos = cosine_alignment(grads, targets).double()
            is_true = classes == y[:, None]
            true_sum += float(cos[is_true].sum())
            other_sum += float(cos[~is_true].sum())
            true_count += int(is_true.sum())
            other_count += int((~is_true).sum())
            per_image.append(cos.mean(dim=1).cpu())
            labels.append(y.cpu())
            bar.update(advance=len(y), info=f"mean cos {float(torch.cat(per_image).mean()):.3f}")
    images = torch.cat(per_image) if per_image else torch.zeros(0, dtype=torch.float64)
    label = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    n = int(images.numel())
    mean = float(images.mean()) if n else 0.0
    sd = float(images.std()) if n > 1 else 0.0
    return AlignReport(
        n=n, classes_per_image=classes_per_image, mean=mean,
        interval=mean_interval(mean, sd, n, low=-1.0, high=1.0),
        fraction_positive=float((images > 0).double().mean()) if n else 0.0,
        per_true_class={str(int(c)): float(images[label == c].mean())
                        for c in torch.unique(label)},
        per_target={"true": true_sum / true_count if true_count else None,
                    "other": other_sum / other_count if other_count else None},
        subset=subset_record(indices), seed=seed, seconds=time.perf_counter() - start,
    )


def mean_alignment(
    model: nn.Module,
    dataset: Dataset[Any],
    indices: Tensor,
    source: TargetGradientSource,
    *,
    num_classes: int,
    classes_per_image: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Mean over images and K sampled target classes of cos(grad_x log p(t|x), g(x, t)).

    The ``mean`` of :func:`alignment_report`. Range [-1, 1].
    """
    return alignment_report(model, dataset, indices, source, num_classes=num_classes,
                            classes_per_image=classes_per_image, batch_size=batch_size,
                            device=device, seed=seed).mean


def gradient_panels(model: nn.Module, x: Tensor, y: Tensor, source: TargetGradientSource,
                    num_classes: int) -> tuple[Tensor, Tensor]:
    """For every class t: the model's ∇ₓ log p(t|x) and the source's g(x, t), for a figure.
    Shape: (k, C, H, W), (k,) -> (k, num_classes, C, H, W) twice."""
    import torch

    from pagctl.gradients import input_gradients
    from pagctl.models import eval_mode

    classes = torch.arange(num_classes, device=x.device).repeat(x.shape[0], 1)
    with eval_mode(model):
        grads = input_gradients(model, x, classes)
    with torch.no_grad():
        targets = source(x, y, classes)
    return grads.detach(), targets.detach()
