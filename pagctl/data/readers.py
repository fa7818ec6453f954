"""Readers for the binary files of the torchvision dataset layouts: CIFAR pickles, MNIST
idx files (plain or gzipped), SVHN ``.mat`` files and STL-10 ``.bin`` files.

Each reader returns numpy arrays (`Arrays`) and raises ``ValueError`` (or the I/O error)
for a truncated or malformed file; nothing checks md5 sums. CIFAR batches are pickles, read
with an unpickler that accepts numpy arrays and plain containers only, so a data directory
cannot run code. `pagctl.data.formats` says which files each dataset has.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Arrays", "read_cifar", "read_mnist", "read_stl10", "read_svhn", "unpickle"]

Arrays = tuple[np.ndarray, np.ndarray]  # uint8 (N, C, H, W), int64 (N,)


_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only (CIFAR batches)."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("core.multiarray", "_reconstruct"),
                ("core.multiarray", "scalar"), ("core.numeric", "_frombuffer"),
                ("_codecs", "encode")}  # bytes in protocol-2 pickles written by Python 3

    def find_class(self, module: str, name: str) -> Any:
        core = module.startswith(("numpy.core.", "numpy._core."))
        key = module.split(".", 1)[1].lstrip("_") if core else module
        if (key, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        # the official files name numpy.core (numpy 1); numpy 2 calls it numpy._core
        return super().find_class(f"{_NUMPY_CORE}.{key[len('core.'):]}" if core else module,
                                  name)


def unpickle(path: Path) -> dict[str, Any]:
    """A pickled dict of numpy arrays and plain values (latin-1 strings, as CIFAR's)."""
    with path.open("rb") as f:
        obj = _NumpyUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict, got {type(obj).__name__}")
    return obj


def read_cifar(folder: Path, files: Sequence[str], label_key: str) -> Arrays:
    """CIFAR batches ``files`` in ``folder``, concatenated; labels under ``label_key``."""
    images, labels = [], []
    for name in files:
        entry = unpickle(folder / name)
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST format), plain or .gz: big-endian header, then uint8 data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError("not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"header says {dims} but the file holds {data.size} values")
    return data.reshape(dims)


def read_mnist(raw: Path, split: str) -> Arrays:
    """The idx files of ``split`` in an MNIST-style ``raw`` folder (1 channel)."""
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_idx_path(raw, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_idx_path(raw, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"images {images.shape} and labels {labels.shape} do not match")
    return images[:, None], labels.astype(np.int64)


def _idx_path(raw: Path, name: str) -> Path:
    return raw / name if (raw / name).is_file() else raw / f"{name}.gz"


def read_svhn(root: Path, split: str) -> Arrays:
    """``{split}_32x32.mat`` in ``root``; the digit 0 gets label 0."""
    from scipy.io import loadmat

    mat = loadmat(str(root / f"{split}_32x32.mat"))
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != y.shape[0]:
        raise ValueError(f"'X' must be uint8 (32, 32, 3, N) with N labels, got {x.dtype} "
                         f"{x.shape} and {y.shape[0]} labels")
    return x.transpose(3, 2, 0, 1), np.where(y == 10, 0, y)  # the digit 0 is stored as 10


def read_stl10(folder: Path, split: str) -> Arrays:
    """``{split}_X.bin`` and ``{split}_y.bin`` in ``folder`` (labels 1..10 -> 0..9)."""
    data = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8)
    labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
    if data.size != labels.size * 3 * 96 * 96:
        raise ValueError(f"{data.size} bytes of images for {labels.size} labels "
                         "(expected 27,648 per image)")
    # stored column-major per channel: transpose H and W
    return data.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2), labels
