"""Shared helpers of the built-in sources: the training pool, class grouping, call checks.

The paper's heuristic sources all point from the image toward a class
representative, g(x, t) = r_t − x, with representatives taken from the training set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pagctl.errors import DataError, SpecError
from pagctl.protocols import BuildContext


def load_pool(ctx: BuildContext, who: str) -> tuple[Tensor, Tensor]:
    """The whole training set as tensors on ``ctx.device``, checked against ``ctx``.

    ``who`` is the source's registry name, for messages. Raises ``SpecError`` without a
    training set, ``DataError`` for bad shapes, labels or pixels.
    Shape: -> images (N, C, H, W) float32 in [0, 1], labels (N,) int64.
    """
    if ctx.train_set is None:
        raise SpecError(f"target_gradients: {who} needs the training set")
    from pagctl.data import as_tensors  # lazy: keeps importing a source cheap

    if len(ctx.train_set) == 0:  # type: ignore[arg-type]
        raise DataError(f"target_gradients: {who}: the training set is empty")
    images, labels = as_tensors(ctx.train_set, batch_size=1024)
    images = images.to(device=ctx.device, dtype=torch.float32)
    labels = labels.to(device=ctx.device, dtype=torch.int64)
    if tuple(images.shape[1:]) != tuple(ctx.input_shape):
        raise DataError(f"target_gradients: {who}: training images have shape "
                        f"{tuple(images.shape[1:])}, expected {tuple(ctx.input_shape)}")
    if labels.shape != (images.shape[0],):
        raise DataError(f"target_gradients: {who}: expected one label per training image")
    bad = (labels < 0) | (labels >= ctx.num_classes)
    if bool(bad.any()):
        raise DataError(f"target_gradients: {who}: training label {int(labels[bad][0])} is "
                        f"outside [0, {ctx.num_classes})")
    if not bool(torch.isfinite(images).all()):
        raise DataError(f"target_gradients: {who}: the training images contain NaN or inf")
    return images, labels


def class_members(labels: Tensor, num_classes: int, who: str) -> list[Tensor]:
    """Sorted positions of each class's images; a class without images is a ``DataError``.

    Shape: (N,) -> num_classes tensors (n_c,) int64.
    """
    members = [torch.nonzero(labels == c).squeeze(1) for c in range(num_classes)]
    empty = [c for c, m in enumerate(members) if m.numel() == 0]
    if empty:
        raise DataError(f"target_gradients: {who}: class(es) {empty} have no training "
                        "images; a representative is needed for every class")
    return members


def check_call(inputs: Tensor, classes: Tensor, image_shape: tuple[int, ...],
               num_classes: int) -> None:
    """Validate a source call's tensors (raises ``ValueError``).

    Shape: inputs (N, C, H, W), classes (N, K) int64 in [0, num_classes).
    """
    if inputs.dim() != 4 or tuple(inputs.shape[1:]) != tuple(image_shape):
        raise ValueError(f"inputs must have shape (N, {', '.join(map(str, image_shape))}), "
                         f"got {tuple(inputs.shape)}")
    if classes.dim() != 2 or classes.shape[0] != inputs.shape[0]:
        raise ValueError(f"classes must have shape (N, K) with N = {inputs.shape[0]}, got "
                         f"{tuple(classes.shape)}")
    if classes.dtype != torch.int64:
        raise ValueError(f"classes must be int64, got {classes.dtype}")
    if classes.numel() and bool(((classes < 0) | (classes >= num_classes)).any()):
        raise ValueError(f"classes must lie in [0, {num_classes})")


def toward(representatives: Tensor, inputs: Tensor) -> Tensor:
    """g = r − x for each target. Shape: r (N, K, C, H, W), x (N, C, H, W) -> (N, K, C, H, W),
    in the inputs' dtype and on their device."""
    reps = representatives.to(device=inputs.device, dtype=inputs.dtype)
    return reps - inputs.unsqueeze(1)


def toward_class_representatives(per_class: Tensor, inputs: Tensor, classes: Tensor) -> Tensor:
    """g(x, t) = r_t − x for one fixed representative per class (One Image, Class Mean).
    Shape: per_class (num_classes, C, H, W), x (N, C, H, W), classes (N, K) -> (N, K, C, H, W).
    """
    check_call(inputs, classes, tuple(per_class.shape[1:]), per_class.shape[0])
    return toward(per_class[classes.to(per_class.device)], inputs)

