"""Class Mean (CM): r_t = c · (mean of the training images of class t),
g(x, t) = r_t − x. The paper scales the mean by an unstated constant c."""

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


class ClassMean:
    """Point from x toward the (scaled) mean image of each target class.

    ``means`` (num_classes, C, H, W) float32 holds the unscaled class means.
    """

    class Params(PluginParams):
        scale: float = Field(
            default=1.0, ge=0, allow_inf_nan=False,
            description="c in r_t = c * mean_t (the paper's unstated constant; 1 = plain mean)",
        )

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        self.params = params
        images, labels = load_pool(ctx, "class_mean")
        class_members(labels, ctx.num_classes, "class_mean")  # every class must be present
        # Accumulate in float64: a float32 running sum over 5,000+ images loses digits.
        sums = torch.zeros((ctx.num_classes, *images.shape[1:]), dtype=torch.float64,
                           device=images.device)
        sums.index_add_(0, labels, images.to(torch.float64))
        counts = torch.bincount(labels, minlength=ctx.num_classes).to(torch.float64)
        means = sums / counts.reshape(-1, *([1] * (images.dim() - 1)))
        self.means: Tensor = means.to(torch.float32)
        self._representatives = (means * params.scale).to(torch.float32)

    def __call__(
        self, inputs: Tensor, labels: Tensor, classes: Tensor, *, index: Tensor | None = None
    ) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,), (N, K) -> (N, K, C, H, W) = c·mean_t − x."""
        return toward_class_representatives(self._representatives, inputs, classes)
