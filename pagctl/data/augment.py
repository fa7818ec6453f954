"""Training augmentation that is differentiated through.

Random crops (zero padding, i.e. black in pixel space) and horizontal flips are applied
inside the model call, so ``grad_x`` is taken with respect to the un-augmented image and can
be compared with a target gradient computed on it (the official code does the same by
differentiating through torchvision's tensor transforms). Pixels cropped away get a zero model
gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from pagctl.spec import DataSpec


class Augmented:
    """``model(augment(x))`` with crop offsets and flips drawn once per step.

    ``x`` may hold each image's rows repeated m times in a row (the ``"repeat"`` input-gradient
    method's (N·m)-row batch); every copy of image i then gets image i's crop and flip.
    """

    def __init__(self, model: Callable[[Tensor], Tensor], offsets: Tensor | None,
                 flips: Tensor | None, padding: int) -> None:
        self.model, self.offsets, self.flips, self.padding = model, offsets, flips, padding

    def __call__(self, x: Tensor) -> Tensor:
        import torch
        import torch.nn.functional as F

        offsets, flips = self.offsets, self.flips
        drawn = len(offsets) if offsets is not None else len(flips) if flips is not None else 0
        if drawn and x.shape[0] != drawn:
            if x.shape[0] % drawn:
                raise ValueError(f"augmentation was drawn for {drawn} images, got a batch of "
                                 f"{x.shape[0]} rows")
            m = x.shape[0] // drawn
            offsets = offsets.repeat_interleave(m, 0) if offsets is not None else None
            flips = flips.repeat_interleave(m, 0) if flips is not None else None
        if offsets is not None:
            n, c, h, w = x.shape
            p = self.padding
            padded = F.pad(x, (p, p, p, p))
            dev = x.device
            rows = offsets[:, 0:1].to(dev) + torch.arange(h, device=dev)  # (N, H)
            cols = offsets[:, 1:2].to(dev) + torch.arange(w, device=dev)  # (N, W)
            x = padded[torch.arange(n, device=dev)[:, None, None, None],
                       torch.arange(c, device=dev)[None, :, None, None],
                       rows[:, None, :, None], cols[:, None, None, :]]
        if flips is not None:
            x = torch.where(flips.to(x.device)[:, None, None, None], x.flip(-1), x)
        return self.model(x)


def draw_augmentation(d: DataSpec, n: int, gen: torch.Generator) -> tuple[
        Tensor | None, Tensor | None]:
    """Crop offsets (N, 2) and flips (N,) for one step, from ``gen`` only."""
    import torch

    if d.augment == "none":
        return None, None
    rows = 1 if d.shared_augmentation else n
    offsets = torch.randint(0, 2 * d.crop_padding + 1, (rows, 2), generator=gen)
    flips = torch.rand(rows, generator=gen) < 0.5 if d.augment == "crop_flip" else None
    if d.shared_augmentation:
        offsets = offsets.expand(n, 2)
        flips = flips.expand(n) if flips is not None else None
    return offsets, flips
