"""Image-folder datasets: ``root/train/<class>/<image>`` and ``root/test`` (or ``root/val``).

Images are read lazily and converted to RGB; all images must have one size (checked when
the folders are scanned). Class folders are labelled in sorted order, as torchvision's
``ImageFolder``, which is used to scan them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from pagctl.errors import DataError
from pagctl.spec import DataSpec

__all__ = ["ImageFolderDataset", "find_image_folders"]

Item = tuple[Tensor, int]


class ImageFolderDataset(Dataset[Item]):
    """Image files read lazily, converted to RGB; all images have one size (checked on load).

    ``samples`` lists (path, label); ``classes`` the class folder names (label order).
    Items are (float32 (3, H, W) in [0, 1], int).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 root: Path, image_size: tuple[int, int]) -> None:
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.root = root
        self.image_size = image_size  # (H, W)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        from PIL import Image
        from torchvision.transforms.functional import to_tensor

        path, label = self.samples[index]
        with Image.open(path) as img:
            tensor = to_tensor(img.convert("RGB"))
        return tensor, label

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return 3, self.image_size[0], self.image_size[1]

    def fingerprint(self) -> str:
        """sha256 over each file's relative path, label and bytes (one read of the folder;
        identical content elsewhere gives the same fingerprint)."""
        digest = hashlib.sha256(b"imagefolder|")
        for path, label in self.samples:
            rel = Path(path).relative_to(self.root).as_posix()
            data = Path(path).read_bytes()
            digest.update(f"{rel}|{label}|{len(data)}|".encode())
            digest.update(data)
        return digest.hexdigest()


def _scan_folder(folder: Path, size: tuple[int, int] | None,
                 ) -> tuple[list[tuple[str, int]], list[str], tuple[int, int]]:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        found = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"data.root: cannot use {folder} as an image folder: {exc}") from exc
    first = None
    for path, _ in found.samples:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except OSError as exc:
            raise DataError(f"data.root: cannot read image {path}: {exc}") from exc
        if size is None:
            size, first = (h, w), path
        elif (h, w) != size:
            where = f"{first}" if first else "the training images"
            raise DataError(f"data.root: image {path} is {w}x{h} but {where} is "
                            f"{size[1]}x{size[0]}; resize all images to one size")
    if size is None:
        raise DataError(f"data.root: no images in {folder}")
    return list(found.samples), list(found.classes), size


def find_image_folders(spec: DataSpec) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The train and test (or val) folders of ``spec.root``, scanned: same class folders,
    one image size. Raises `DataError` (one line, with the fix) otherwise."""
    layout = "DIR/train/<class>/<image> and DIR/test/<class>/<image> (or DIR/val)"
    if spec.download:
        raise DataError("data.download: 'imagefolder' cannot be downloaded; set it to false")
    if spec.root is None:
        raise DataError(f"data.root: dataset 'imagefolder' needs --data-dir DIR with {layout}")
    root = Path(spec.root).expanduser()
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"data.root: dataset 'imagefolder' not found in {root}: expected "
                        f"{layout}")
    train_samples, classes, size = _scan_folder(root / "train", None)
    test_samples, test_classes, _ = _scan_folder(test_dir, size)
    if test_classes != classes:
        raise DataError(f"data.root: class folders differ: train has {classes}, "
                        f"{test_dir.name} has {test_classes}; use the same class folders")
    return (ImageFolderDataset(train_samples, classes, root, size),
            ImageFolderDataset(test_samples, classes, root, size))
