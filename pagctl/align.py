"""Alignment of a model's input gradients with a target-gradient source.

The metric uses the same primitive as the training objective
(``pagctl.gradients.logits_and_input_gradients`` and ``pagctl.losses.cosine_alignment``), so
metric and objective cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
    from torch.utils.data import Dataset

    from pagctl.protocols import TargetGradientSource


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

    Evaluated in eval mode (restored afterwards); K classes per image drawn without
    replacement from a generator seeded with ``seed``. Range [-1, 1].
    """
    import torch

    from pagctl.attack import eval_mode
    from pagctl.data import get_batch
    from pagctl.gradients import input_gradients
    from pagctl.losses import cosine_alignment, sample_target_classes

    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with eval_mode(model):
        for lo in range(0, len(indices), batch_size):
            x, y = get_batch(dataset, indices[lo: lo + batch_size])
            x, y = x.to(device), y.to(device)
            classes = sample_target_classes(y, num_classes, classes_per_image, gen)
            with torch.no_grad():
                targets = source(x, y, classes)
            cos = cosine_alignment(input_gradients(model, x, classes), targets)
            total += float(cos.sum())
            count += cos.numel()
    return total / max(1, count)
