"""A user's own images in one file: the dataset ``tensors`` (``--dataset tensors --data-dir
FILE``), and the checks every pair of images and labels handed to pagctl passes (the file's,
and the Python API's ``(x, y)``).

The file is ``.safetensors`` or ``.npz`` (read with ``allow_pickle=False``): formats that hold
arrays only, so reading one cannot run code. Pickle-based files (``.pt``, ``.pth``,
``.pkl``, ``.npy`` of objects) are refused with the way to re-save them. Keys:

| key | shape | what |
|---|---|---|
| ``x`` | (N, C, H, W) | the test split: what ``attack`` and ``align-score`` evaluate |
| ``y`` | (N,) | its labels, integers 0..K-1 |
| ``x_train``, ``y_train`` | (M, C, H, W), (M,) | optional: a training split |

(a training split is what training needs, and the target-gradient sources that read
training images).

Images are uint8 (0..255) or floating point in [0, 1] (read as float32); channels first.
The number of classes is ``data.num_classes`` when set, else the largest label + 1. The
default normalisation is the per-channel mean and standard deviation of ``x_train`` when the
file has it, else none (mean 0, std 1): a model brought from elsewhere carries its own
(``pagctl import --mean/--std``). Indices (``--indices``) are positions in ``x``, the user's
own index space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pagctl.errors import DataError

__all__ = ["TENSOR_SUFFIXES", "as_image_pair", "channel_stats", "read_tensor_file"]

TENSOR_SUFFIXES = (".safetensors", ".npz")
KEYS = ("x", "y", "x_train", "y_train")


def as_image_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Images and labels as pagctl holds them: images (N, C, H, W) uint8 kept as is, or
    float32 (from any floating type), labels int64. ValueError("images: …" or "labels: …",
    one line) for another dtype or shape, no image, or a label count that is not one per
    image (pixel ranges and label ranges are `pagctl.data.validate_tensors`'s)."""
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"images: expected float pixels in [0, 1] or uint8 0..255, got "
                             f"{x.dtype}")
        x = x.float()
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels: expected integer class labels, got {y.dtype}")
    if x.dim() != 4:
        hint = "; for grey images add the channel axis: (N, 1, H, W)" if x.dim() == 3 \
            else ""
        raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError("images: no image given; an evaluation set needs at least one")
    if x.shape[1] not in (1, 2, 3, 4) and x.shape[-1] in (1, 3):
        raise ValueError(f"images: expected channels first (N, C, H, W), got shape "
                         f"{tuple(x.shape)}, which looks like channels last; transpose it")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels: expected ({x.shape[0]},), one per image, got "
                         f"{tuple(y.shape)}")
    return x.contiguous(), y.to(torch.int64).contiguous()


def read_tensor_file(path: Path) -> dict[str, Tensor]:
    """The arrays of a ``tensors`` file (module docstring), checked: ``x`` and ``y`` always,
    ``x_train`` and ``y_train`` when the file has them (both or neither). DataError naming
    ``data.root``, the file and the key for anything else."""
    where = f"data.root: {path}"
    if path.is_dir():
        raise DataError(f"{where}: is a folder; the dataset 'tensors' reads one .safetensors "
                        "or .npz file of x and y")
    if path.suffix.lower() not in TENSOR_SUFFIXES:
        raise DataError(f"{where}: the dataset 'tensors' reads .safetensors or .npz files "
                        "(arrays only, no pickle); re-save x and y with safetensors' "
                        "save_file or numpy.savez")
    if not path.is_file():
        raise DataError(f"{where}: no such file; give the .safetensors or .npz file of x "
                        "and y")
    from safetensors import SafetensorError

    try:
        arrays = _read(path)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise DataError(f"{where}: cannot read it ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'malformed'}); give a "
                        ".safetensors or .npz file of x and y") from None
    for key in ("x", "y"):
        if key not in arrays:
            found = ", ".join(sorted(arrays)) or "none"
            raise DataError(f"{where}: no array '{key}' (found {found}); the file holds "
                            "images 'x' (N, C, H, W) and labels 'y'")
    if ("x_train" in arrays) != ("y_train" in arrays):
        raise DataError(f"{where}: a training split needs both 'x_train' and 'y_train'")
    out: dict[str, Tensor] = {}
    for xs, ys in (("x", "y"), ("x_train", "y_train")):
        if xs not in arrays:
            continue
        try:
            out[xs], out[ys] = as_image_pair(arrays[xs], arrays[ys])
        except ValueError as exc:
            field, _, detail = str(exc).partition(": ")
            key = xs if field == "images" else ys
            raise DataError(f"{where}: '{key}': {detail}") from None
    if "x_train" in out and out["x_train"].shape[1:] != out["x"].shape[1:]:
        raise DataError(f"{where}: 'x_train' images are {tuple(out['x_train'].shape[1:])} "
                        f"but 'x' images are {tuple(out['x'].shape[1:])}")
    return out


def _read(path: Path) -> dict[str, Tensor]:
    """Every array of the file as a CPU tensor (only the keys pagctl reads)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.numpy import load_file

        found = load_file(str(path))
    else:
        with np.load(path, allow_pickle=False) as npz:
            found = {key: npz[key] for key in npz.files if key in KEYS}
    return {key: torch.from_numpy(np.ascontiguousarray(value))
            for key, value in found.items() if key in KEYS}


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of images in [0, 1] (uint8 read as /255),
    computed in chunks; a zero deviation is read as 1. Shape: (N, C, H, W) -> (C,), (C,)."""
    c = int(images.shape[1])
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    count = 0
    for lo in range(0, len(images), 1024):
        chunk = images[lo: lo + 1024].double()
        if images.dtype == torch.uint8:
            chunk = chunk / 255
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.pow(2).sum(dim=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
