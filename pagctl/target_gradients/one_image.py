"""One Image (OI): r_t is one training image of class t, drawn once at
random and used for every x, so g(x, t) = r_t − x."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pagctl.protocols import BuildContext, PluginParams
from pagctl.target_gradients._pool import (
    class_members,
    load_pool,
    toward_class_representatives,
)


class OneImage:
    """Point from x toward a fixed, randomly chosen training image of each target class.

    ``indices`` (num_classes,) int64 holds the chosen training-set positions.
    """

    class Params(PluginParams):
        seed: int | None = Field(
            default=None, description="seed of the per-class image draw; null = the run's seed",
        )

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        self.params = params
        images, labels = load_pool(ctx, "one_image")
        members = class_members(labels.cpu(), ctx.num_classes, "one_image")
        generator = torch.Generator().manual_seed(ctx.seed if params.seed is None else params.seed)
        picks = [
            m[int(torch.randint(m.numel(), (1,), generator=generator))] for m in members
        ]
        self.indices: Tensor = torch.stack(picks)
        self._representatives = images[self.indices.to(images.device)].clone()

    def __call__(
        self, inputs: Tensor, labels: Tensor, classes: Tensor, *, index: Tensor | None = None
    ) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,), (N, K) -> (N, K, C, H, W) = r_t − x."""
        return toward_class_representatives(self._representatives, inputs, classes)
