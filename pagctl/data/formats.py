"""On-disk formats of the file-based datasets: the layouts torchvision downloads.

``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``svhn`` and ``stl10``: which
files each needs in the data directory, how to read them (`pagctl.data.readers`), their class
names and default normalisation, and how to download them. torchvision is used only to
download (``spec.download``), which checks the archive's md5; reading does not compare md5
sums, which would reject every subset or re-export of a dataset.

`find_dataset_files` locates (and, when asked, downloads) a dataset; `DatasetFiles.read`
returns a split as tensors, which `pagctl.data.load_data` wraps and validates.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pagctl.data.readers import Arrays, read_cifar, read_mnist, read_stl10, read_svhn, unpickle
from pagctl.errors import DataError
from pagctl.spec import DataSpec

__all__ = ["DatasetFiles", "find_dataset_files"]


@dataclass(frozen=True)
class _Format:
    place: str  # what the user places in the data dir (for messages)
    files: tuple[str, ...]  # required files, relative to the data dir
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    read: Callable[[Path, str], Arrays]  # (data dir, "train" | "test")
    class_names: Callable[[Path], tuple[str, ...]]
    download: Callable[[Path], None]


def _cifar_names(path: str, key: str) -> Callable[[Path], tuple[str, ...]]:
    return lambda root: tuple(str(n) for n in unpickle(root / path)[key])


def _fixed(names: Sequence[str]) -> Callable[[Path], tuple[str, ...]]:
    return lambda root: tuple(names)


_DIGIT_NAMES = tuple(str(d) for d in range(10))
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
_STL10_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                "truck")


def _stl10_names(root: Path) -> tuple[str, ...]:
    path = root / "stl10_binary" / "class_names.txt"
    if not path.is_file():
        return _STL10_NAMES
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def _tv_download(cls_name: str, **split_kwargs: Any) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        for kwargs in split_kwargs.values():
            cls(str(root), download=True, **kwargs)

    return download


def _mnist_format(folder: str, cls_name: str, mean: float, std: float,
                  names: Sequence[str]) -> _Format:
    raw = f"{folder}/raw"
    return _Format(
        place=f"the '{raw}' folder with the four idx-ubyte files",
        files=tuple(f"{raw}/{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k")
                    for k, d in (("images", 3), ("labels", 1))),
        num_classes=10, mean=(mean,), std=(std,),
        read=lambda root, split: read_mnist(root / raw, split),
        class_names=_fixed(names),
        download=_tv_download(cls_name, train={"train": True}, test={"train": False}),
    )


_FORMATS: dict[str, _Format] = {
    "cifar10": _Format(
        place="the extracted 'cifar-10-batches-py' folder",
        files=tuple(f"cifar-10-batches-py/{f}"
                    for f in (*_CIFAR10_TRAIN, "test_batch", "batches.meta")),
        num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        read=lambda root, split: read_cifar(
            root / "cifar-10-batches-py", _CIFAR10_TRAIN if split == "train" else ("test_batch",),
            "labels"),
        class_names=_cifar_names("cifar-10-batches-py/batches.meta", "label_names"),
        download=_tv_download("CIFAR10", train={"train": True}),
    ),
    "cifar100": _Format(
        place="the extracted 'cifar-100-python' folder",
        files=tuple(f"cifar-100-python/{f}" for f in ("train", "test", "meta")),
        num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        read=lambda root, split: read_cifar(root / "cifar-100-python", (split,), "fine_labels"),
        class_names=_cifar_names("cifar-100-python/meta", "fine_label_names"),
        download=_tv_download("CIFAR100", train={"train": True}),
    ),
    "mnist": _mnist_format("MNIST", "MNIST", 0.1307, 0.3081, _DIGIT_NAMES),
    "fashion_mnist": _mnist_format("FashionMNIST", "FashionMNIST", 0.2860, 0.3530,
                                   _FASHION_NAMES),
    "svhn": _Format(
        place="'train_32x32.mat' and 'test_32x32.mat'",
        files=("train_32x32.mat", "test_32x32.mat"),
        num_classes=10, mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
        read=read_svhn,
        class_names=_fixed(_DIGIT_NAMES),
        download=_tv_download("SVHN", train={"split": "train"}, test={"split": "test"}),
    ),
    "stl10": _Format(
        place="the extracted 'stl10_binary' folder",
        files=tuple(f"stl10_binary/{s}_{k}.bin" for s in ("train", "test") for k in "Xy"),
        num_classes=10, mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713),
        read=lambda root, split: read_stl10(root / "stl10_binary", split),
        class_names=_stl10_names,
        download=_tv_download("STL10", train={"split": "train"}),
    ),
}


def _missing(root: Path, files: Sequence[str]) -> list[str]:
    def present(rel: str) -> bool:
        # MNIST files may stay gzipped
        return (root / rel).is_file() or ("ubyte" in rel and (root / f"{rel}.gz").is_file())

    return [rel for rel in files if not present(rel)]


def _where_hint(fmt: _Format) -> str:
    return f"pass --download once to fetch it, or place {fmt.place} there"



_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError)


class DatasetFiles:
    """A file-based dataset present in ``root`` (see `find_dataset_files`): its format's
    ``num_classes`` and default normalisation ``mean``/``std``, and readers."""

    def __init__(self, name: str, root: Path, fmt: _Format) -> None:
        self.name = name
        self.root = root
        self.num_classes = fmt.num_classes
        self.mean = fmt.mean
        self.std = fmt.std
        self._fmt = fmt

    def read(self, split: str) -> tuple[Tensor, Tensor]:
        """Split ``"train"`` or ``"test"``; raises `DataError` when it cannot be read.

        Shape: -> images (N, C, H, W) uint8, labels (N,) int64 (not range-checked).
        """
        try:
            images, labels = self._fmt.read(self.root, split)
        except _READ_ERRORS as exc:
            raise DataError(f"data.root: cannot read the {split} split of '{self.name}' in "
                            f"{self.root} ({type(exc).__name__}: {exc}); re-download or "
                            "re-extract it") from exc
        return (torch.from_numpy(np.require(images, requirements=["C", "W"])),
                torch.from_numpy(np.require(labels, requirements=["C", "W"])))

    def class_names(self) -> tuple[str, ...]:
        """The class names in label order; raises `DataError` when they cannot be read."""
        try:
            return self._fmt.class_names(self.root)
        except _READ_ERRORS as exc:
            raise DataError(f"data.root: cannot read the class names of '{self.name}' in "
                            f"{self.root}: {exc}") from exc


def find_dataset_files(spec: DataSpec) -> DatasetFiles:
    """The files of ``spec.dataset`` in ``spec.root``, downloaded there first when missing
    and ``spec.download``. Raises `DataError` (one line, with the fix) when there is no
    root, the download fails, or files are missing."""
    name = spec.dataset
    fmt = _FORMATS[name]
    if spec.root is None:
        raise DataError(f"data.root: dataset '{name}' needs --data-dir DIR "
                        f"({_where_hint(fmt)})")
    root = Path(spec.root).expanduser()
    missing = _missing(root, fmt.files)
    if missing and spec.download:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fmt.download(root)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"data.download: fetching '{name}' into {root} failed: {exc}") \
                from exc
        missing = _missing(root, fmt.files)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"data.root: dataset '{name}' not found in {root}: missing "
                        f"{missing[0]}{more}; {_where_hint(fmt)}")
    return DatasetFiles(name, root, fmt)
