"""Image-folder datasets: ``root/train/<class>/<image>`` and ``root/test`` (or ``root/val``).

Images are read lazily and converted to RGB. Class folders are labelled in sorted order, as
torchvision's ``ImageFolder``, which is used to scan them.

- Without ``data.image_size`` every image must have one size (checked when the folders are
  scanned). With it, each image is resized and centre-cropped as timm evaluates models
  (shorter side to ``floor(image_size / crop_pct)`` with ``data.interpolation``, then the
  centre ``image_size`` square), so images of any size mix and no image is opened to scan.
- A folder with only ``test/`` (or ``val/``) is an evaluation set: its training split is
  empty (attacks need none; training and sources that read training images refuse it).
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
                 root: Path, image_size: tuple[int, int], *, resize: int | None = None,
                 crop_pct: float = 1.0, interpolation: str = "bilinear") -> None:
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.root = root
        self.image_size = image_size  # (H, W)
        self.resize = resize  # the shorter side before the centre crop; None: as they are
        self.crop_pct = crop_pct
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        from PIL import Image
        from torchvision.transforms.functional import to_tensor

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except OSError as exc:
            raise DataError(f"data.root: cannot read image {path}: {exc}") from exc
        if self.resize is not None:
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms.functional import center_crop, resize

            mode = InterpolationMode(self.interpolation)
            rgb = center_crop(resize(rgb, self.resize, interpolation=mode),
                              list(self.image_size))
        tensor = to_tensor(rgb)
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


def _scan_folder(folder: Path, size: tuple[int, int] | None, *, check_sizes: bool = True,
                 ) -> tuple[list[tuple[str, int]], list[str], tuple[int, int] | None]:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        found = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"data.root: cannot use {folder} as an image folder: {exc}") from exc
    if not found.samples:
        raise DataError(f"data.root: no images in {folder}")
    if not check_sizes:
        return list(found.samples), list(found.classes), size
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
                            f"{size[1]}x{size[0]}; resize all images to one size, or set "
                            "data.image_size to resize and centre-crop them")
    return list(found.samples), list(found.classes), size


def find_image_folders(spec: DataSpec) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The train and test (or val) folders of ``spec.root``, scanned: same class folders,
    one image size (or ``spec.image_size``). Without ``train/`` the training split is
    empty. Raises `DataError` (one line, with the fix) otherwise."""
    layout = "DIR/test/<class>/<image> (or DIR/val), and DIR/train/<class>/<image> to train"
    if spec.download:
        raise DataError("data.download: 'imagefolder' cannot be downloaded; set it to false")
    if spec.root is None:
        raise DataError(f"data.root: dataset 'imagefolder' needs --data-dir DIR with {layout}")
    root = Path(spec.root).expanduser()
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise DataError(f"data.root: dataset 'imagefolder' not found in {root}: expected "
                        f"{layout}")
    fixed = None if spec.image_size is None else (spec.image_size, spec.image_size)
    check = fixed is None
    classes: list[str] | None = None
    train_samples: list[tuple[str, int]] = []
    size = fixed
    if (root / "train").is_dir():
        train_samples, classes, size = _scan_folder(root / "train", fixed, check_sizes=check)
    test_samples, test_classes, size = _scan_folder(test_dir, size, check_sizes=check)
    if classes is not None and test_classes != classes:
        raise DataError(f"data.root: class folders differ: train has {classes}, "
                        f"{test_dir.name} has {test_classes}; use the same class folders")
    assert size is not None
    resize = None if spec.image_size is None else int(spec.image_size / spec.crop_pct)
    options = {"resize": resize, "crop_pct": spec.crop_pct,
               "interpolation": spec.interpolation}
    return (ImageFolderDataset(train_samples, test_classes, root, size, **options),  # type: ignore[arg-type]
            ImageFolderDataset(test_samples, test_classes, root, size, **options))  # type: ignore[arg-type]
