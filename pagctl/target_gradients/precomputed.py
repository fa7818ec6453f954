"""Precomputed: serve per-image, per-class target gradients from a bank file.

A bank (`pagctl.banks`, docs/banks.md) is a safetensors file written once by ``pagctl bank``
from any source — typically an expensive one such as a score-based (diffusion) source, as
the official code stores its SBG targets in an (N, 11, 3, 32, 32) tensor:

- ``targets`` (N, num_classes, C, H, W) float16 or float32, ``targets[i, t]`` = g(x_i, t)
  for training image i (training-set order) and class t;
- ``labels`` (N,) int64, the training labels;
- metadata ``pagctl_bank`` (JSON): ``format`` (1), ``data_fingerprint`` (the training set
  it was made for), ``num_images``, ``num_classes``, ``input_shape``, ``dtype``, ``source``,
  ``params`` and ``created_by``.

Targets are looked up by ``index`` (the images' training-set positions), which training
always passes, with or without augmentation: the target belongs to the un-augmented image,
as in the official code. A call with ``index=None`` (test images, other inputs) is refused:
a bank cannot be the alignment source of ``eval.align_source`` or ``pagctl align-score``;
name the source that wrote the bank there instead.

With ``mmap: true`` (the default) the file is opened with ``safetensors.safe_open`` and each
batch reads only its own rows (one ``get_slice`` per run of consecutive indices), so a
CIFAR-10 bank (3.07 GB in float16) costs no memory up front; ``mmap: false`` loads it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from pagctl.errors import CheckpointError, SpecError
from pagctl.protocols import BuildContext, PluginParams
from pagctl.target_gradients._pool import check_call


class MissingIndexError(SpecError, ValueError):
    """A bank was asked for targets of inputs that are not indexed training images."""


class Precomputed:
    """Look up each training image's target for each class in a bank written by
    ``pagctl bank`` (training only: needs the images' training-set index)."""

    requires_index = True
    """Calls need ``index``; with ``index=None`` (test images) this source raises."""

    class Params(PluginParams):
        path: Path = Field(description="the bank file (pagctl bank SOURCE --spec SPEC --out "
                           "FILE)")
        mmap: bool = Field(
            default=True, description="read only each batch's rows from the file "
            "(safetensors safe_open); false loads the whole bank into memory once",
        )
        check_fingerprint: bool = Field(
            default=True, description="refuse a bank made for a different training set "
            "(its data_fingerprint differs from this run's)",
        )

    def __init__(self, params: Params, ctx: BuildContext) -> None:
        from safetensors import safe_open

        from pagctl.banks import read_bank_metadata

        self.params = params
        path = Path(params.path).expanduser()
        try:
            meta = read_bank_metadata(path)
        except CheckpointError as exc:
            raise ValueError(str(exc)) from None
        self.metadata = meta
        self.num_images = int(meta["num_images"])
        self.num_classes = int(meta["num_classes"])
        self.image_shape = tuple(int(v) for v in meta["input_shape"])
        fix = ("write a bank for this run's data with 'pagctl bank "
               f"{meta.get('source') or 'SOURCE'} --spec SPEC --out FILE'")
        if self.num_classes != ctx.num_classes or self.image_shape != tuple(ctx.input_shape):
            raise ValueError(
                f"the bank {path} holds {self.num_classes} classes of {self.image_shape} "
                f"images, this run has {ctx.num_classes} classes of "
                f"{tuple(ctx.input_shape)}; {fix}")
        if ctx.train_set is not None and len(ctx.train_set) != self.num_images:  # type: ignore[arg-type]
            raise ValueError(
                f"the bank {path} holds {self.num_images} images, the training set has "
                f"{len(ctx.train_set)}; {fix}")  # type: ignore[arg-type]
        if (params.check_fingerprint and ctx.data_fingerprint is not None
                and meta["data_fingerprint"] != ctx.data_fingerprint):
            raise ValueError(
                f"the bank {path} was made for training data {meta['data_fingerprint'][:12]}, "
                f"this run's training set is {ctx.data_fingerprint[:12]} (different images, "
                f"labels or order); {fix}, or set check_fingerprint: false if the data are "
                "known to match")
        self.path = path
        self._handle: Any = None
        self._targets: Tensor | None = None
        if params.mmap:
            self._handle = safe_open(str(path), framework="pt")
            self.labels: Tensor = self._handle.get_tensor("labels")
        else:
            from safetensors.torch import load_file

            stored = load_file(str(path))
            self.labels = stored["labels"]
            self._targets = stored["targets"]

    def _rows(self, index: Tensor) -> Tensor:
        """The bank rows ``index`` (any order, repeats allowed). Shape: (n,) ->
        (n, num_classes, C, H, W) in the bank's dtype, on the CPU."""
        if self._targets is not None:
            return self._targets[index]
        order = torch.argsort(index)
        ordered = index[order]
        pieces, start = [], 0
        view = self._handle.get_slice("targets")
        values = ordered.tolist()
        for i in range(1, len(values) + 1):
            # One read per run of consecutive (or repeated) rows.
            if i == len(values) or values[i] - values[i - 1] > 1:
                lo, hi = values[start], values[i - 1] + 1
                block = view[lo:hi]
                pieces.append(block[ordered[start:i] - lo])
                start = i
        rows = torch.cat(pieces) if pieces else torch.zeros(
            (0, self.num_classes, *self.image_shape), dtype=torch.float32)
        out = torch.empty_like(rows)
        out[order] = rows
        return out

    def __call__(
        self, inputs: Tensor, labels: Tensor, classes: Tensor, *, index: Tensor | None = None
    ) -> Tensor:
        """Shape: (N, C, H, W) in [0, 1], (N,), (N, K), index (N,) int64 -> (N, K, C, H, W)
        in the inputs' dtype and on their device: ``targets[index[i], classes[i, k]]``."""
        check_call(inputs, classes, self.image_shape, self.num_classes)
        if index is None:
            raise MissingIndexError(
                "the precomputed bank has targets for training images only, looked up by "
                "their training-set index; it was called without one (test images or other "
                "inputs), so it cannot serve as eval.align_source or for pagctl align-score: "
                f"use the source that wrote the bank ({self.metadata.get('source')}) there")
        rows = index.detach().to("cpu")
        if rows.shape != (inputs.shape[0],) or rows.dtype != torch.int64:
            raise ValueError(f"index must be int64 of shape ({inputs.shape[0]},), got "
                             f"{rows.dtype} {tuple(rows.shape)}")
        if rows.numel() and bool(((rows < 0) | (rows >= self.num_images)).any()):
            raise ValueError(f"index must lie in [0, {self.num_images}) (the bank's images)")
        expected = self.labels[rows]
        if not torch.equal(expected, labels.detach().to("cpu", torch.int64)):
            raise ValueError("the labels differ from the bank's labels at these indices; the "
                             "index does not point at the training images the bank was made for")
        table = self._rows(rows)  # (N, num_classes, C, H, W)
        picked = table[torch.arange(rows.shape[0])[:, None], classes.detach().to("cpu")]
        return picked.to(device=inputs.device, dtype=inputs.dtype)
