"""No target gradients: vanilla cross-entropy training."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from pagctl.protocols import BuildContext, PluginParams


class NoSource:
    """No target: vanilla cross-entropy training (the PAG term is skipped).

    ``disables_pag`` tells the training loop to skip the PAG term, so vanilla training never
    calls this object; if called anyway it returns zeros (a zero target makes every cosine 0,
    i.e. a constant loss with no gradient)."""

    disables_pag: ClassVar[bool] = True

    class Params(PluginParams):
        """No parameters."""

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        self.params = params

    def __call__(
        self, inputs: Tensor, labels: Tensor, classes: Tensor, *, index: Tensor | None = None
    ) -> Tensor:
        """Shape: (N, C, H, W), (N,), (N, K) -> zeros (N, K, C, H, W), inputs' dtype/device."""
        n, k = classes.shape
        return torch.zeros((n, k, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
