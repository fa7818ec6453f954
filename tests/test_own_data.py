"""A user's own held-out data: the dataset ``tensors`` (one .safetensors or .npz file of x
and y), ``--dataset tensors --data-dir FILE`` on a run trained on other data, ``--indices
START:STOP``, and a model imported with its own file as its test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import envelope_records
from safetensors.torch import save_file
from torch import nn

from pagctl import api
from pagctl.checkpoint import read_metrics
from pagctl.data import load_data
from pagctl.errors import DataError, SpecError
from pagctl.spec import DataSpec


def _images(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def _tensors(path: Path, num_classes: int | None = None) -> Any:
    return load_data(DataSpec(dataset="tensors", root=path, num_classes=num_classes))


def test_safetensors_and_npz_files_load_alike_with_an_optional_training_split(
        tmp_path: Path) -> None:
    x, y = _images()
    xu = (x * 255).round().to(torch.uint8)
    save_file({"x": x, "y": y}, str(tmp_path / "a.safetensors"))
    np.savez(tmp_path / "a.npz", x=x.numpy().astype(np.float64), y=y.numpy().astype(np.int32),
             x_train=xu.numpy(), y_train=y.numpy())
    a, b = _tensors(tmp_path / "a.safetensors"), _tensors(tmp_path / "a.npz")
    assert len(a.test) == len(b.test) == 40 and a.num_classes == b.num_classes == 10
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels,
                                                                      b.test.labels)
    assert len(a.train) == 0 and (a.mean, a.std) == ((0.0,), (1.0,))  # no x_train: none
    assert len(b.train) == 40 and b.train.images.dtype == torch.uint8
    pixels = xu.double() / 255
    assert b.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-6)
    assert b.std[0] == pytest.approx(float(pixels.std(unbiased=False)), abs=1e-6)
    assert _tensors(tmp_path / "a.npz", num_classes=12).num_classes == 12


@pytest.mark.parametrize(("arrays", "suffix", "words"), [
    ({"x": torch.rand(4, 1, 8, 8), "y": torch.arange(4)}, ".pt", "no pickle"),
    ({"x": torch.rand(4, 1, 8, 8)}, ".safetensors", "no array 'y'"),
    ({"x": torch.rand(4, 8, 8, 3), "y": torch.arange(4)}, ".npz", "channels last"),
    ({"x": torch.rand(4, 8, 8), "y": torch.arange(4)}, ".npz", "(N, 1, H, W)"),
    ({"x": torch.rand(4, 1, 8, 8) * 2, "y": torch.arange(4)}, ".npz", "outside [0, 1]"),
    ({"x": torch.rand(4, 1, 8, 8), "y": torch.arange(4).float()}, ".npz", "'y': expected int"),
    ({"x": torch.rand(4, 1, 8, 8), "y": torch.arange(3)}, ".npz", "one per image"),
    ({"x": torch.rand(4, 1, 8, 8), "y": torch.arange(4), "x_train": torch.rand(2, 1, 8, 8)},
     ".npz", "both 'x_train' and 'y_train'"),
    ({"x": torch.rand(4, 1, 8, 8), "y": torch.arange(4), "x_train": torch.rand(2, 1, 4, 4),
      "y_train": torch.arange(2)}, ".npz", "'x_train' images are"),
])
def test_a_file_that_is_not_images_and_labels_is_refused_naming_the_key(
        tmp_path: Path, arrays: dict[str, torch.Tensor], suffix: str, words: str) -> None:
    path = tmp_path / f"f{suffix}"
    if suffix == ".safetensors":
        save_file(arrays, str(path))
    else:
        with path.open("wb") as handle:
            np.savez(handle, **{k: v.numpy() for k, v in arrays.items()})
    with pytest.raises(DataError, match=r"^data(\.root)?: .*f" + suffix) as info:
        _tensors(path)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [
    b"\xff" * 64,                                     # a header length past the file
    b"\x60\x00\x00\x00\x00\x00\x00\x00" + (
        b'{"x":{"dtype":"F32","shape":[1000000000,3,1000,1000],"data_offsets":[0,16]},'
        b'"y":{"dtype":"I64","shape":[2],"data_offsets":[16,32]}}').ljust(96) + b"\0" * 32,
])
def test_a_damaged_safetensors_file_is_one_line_naming_the_file(tmp_path: Path,
                                                                 content: bytes) -> None:
    path = tmp_path / "f.safetensors"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"^data\.root: .*f\.safetensors: cannot read it") \
            as info:
        _tensors(path)
    assert "\n" not in str(info.value)


def test_a_label_far_beyond_any_class_count_is_refused_not_allocated(
        tmp_path: Path) -> None:
    x, y = _images(4)
    np.savez(tmp_path / "a.npz", x=x.numpy(), y=np.array([0, 1, 2, 2**40]))
    with pytest.raises(DataError, match=r"a label is 1099511627776, more classes than "
                                        r"100,000; .*data\.num_classes"):
        _tensors(tmp_path / "a.npz")
    with pytest.raises(api.FieldError, match="^labels: a label is 1099511627776"):
        api.tensors(x, torch.tensor([0, 1, 2, 2**40]))


def test_training_on_a_file_without_a_training_split_names_the_keys_it_needs(
        tmp_path: Path) -> None:
    from pagctl.build import setup
    from pagctl.spec import load_spec

    x, y = _images()
    np.savez(tmp_path / "a.npz", x=x.numpy(), y=y.numpy())
    spec = load_spec("digits-vanilla", ["data.dataset=tensors", f"data.root={tmp_path}/a.npz"])
    with pytest.raises(DataError, match=r"no training split; .*'x_train' and 'y_train'"):
        setup(spec, torch.device("cpu"))


def test_labels_beyond_the_classes_given_and_num_classes_on_another_dataset_are_refused(
        tmp_path: Path) -> None:
    x, y = _images()
    save_file({"x": x, "y": y}, str(tmp_path / "a.safetensors"))
    with pytest.raises(DataError, match="outside"):
        _tensors(tmp_path / "a.safetensors", num_classes=5)
    with pytest.raises(ValueError, match="data.num_classes"):
        DataSpec(dataset="digits", num_classes=10)


# ------------------------------------------------------------------------ the CLI route


@pytest.fixture
def imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pagctl: Any) -> dict[str, Any]:
    """A timm network trained on the digits' training split (a model pagctl did not train),
    imported on the digits; a held-out file of 60 digits test images in both formats."""
    import timm

    from pagctl.data import get_batch
    from pagctl.spec import load_spec

    monkeypatch.chdir(tmp_path)
    bundle = load_data(load_spec("digits-vanilla", []).data)
    x, y = get_batch(bundle.train, torch.arange(len(bundle.train)))  # type: ignore[arg-type]
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
    save_file(net.state_dict(), "net.safetensors")
    xt, yt = get_batch(bundle.test, torch.arange(60))
    save_file({"x": xt.contiguous(), "y": yt}, "held.safetensors")
    np.savez("held.npz", x=xt.numpy(), y=yt.numpy())
    got = pagctl("import", "--model", "test_resnet", "--dataset", "digits", "--checkpoint",
                 "net.safetensors", "--mean", "0", "--std", "1", "--out", "runs/d")
    assert got.code == 0, got.stderr
    return {"net": net.eval(), "x": xt, "y": yt}


ATTACK = ["--attack", "pgd_linf", "--param", "eps=0.1", "--param", "steps=5", "--no-probes",
          "--no-progress", "--format", "json"]


def test_a_held_out_file_reaches_the_cli_and_gives_the_apis_per_point_results(
        pagctl: Any, imported: dict[str, Any]) -> None:
    """``--dataset tensors --data-dir FILE --indices 10:50`` attacks points 10..49 of the
    user's file: the same per-point results as the API on ``(x, y)`` at those indices; the
    run's metrics.jsonl is untouched (not its test split) and stderr says so."""
    before = read_metrics(Path("runs/d")).records
    got = pagctl("attack", "runs/d", "--dataset", "tensors", "--data-dir", "held.npz",
                 "--indices", "10:50", *ATTACK)
    assert got.code == 0, got.stderr
    [record] = envelope_records(got.stdout, "attack")
    assert record["n"] == 40 and "not recorded" in got.stderr
    report = api.attack(imported["net"], (imported["x"], imported["y"]), "pgd_linf",
                        eps=0.1, params={"steps": 5}, indices=range(10, 50), probes=False)
    per_example = report.to_record().per_example
    assert per_example is not None
    assert record["per_example"]["robust"] == per_example.robust
    assert record["subset"]["data_sha256"] == report.subset["data_sha256"]
    assert 0 < report.robust_accuracy < report.clean_accuracy
    assert read_metrics(Path("runs/d")).records == before


def test_a_model_imported_with_its_own_file_records_on_it(
        pagctl: Any, imported: dict[str, Any]) -> None:
    """Imported with ``--dataset tensors --data-dir FILE``, the file is the run's test
    split: attacks on it are recorded, and ``--dataset tensors`` naming the same file is
    the run's own data."""
    got = pagctl("import", "--model", "test_resnet", "--dataset", "tensors", "--data-dir",
                 "held.safetensors", "--checkpoint", "net.safetensors", "--out", "runs/t")
    assert got.code == 0, got.stderr
    first = pagctl("attack", "runs/t", "--indices", "0:30", *ATTACK)
    again = pagctl("attack", "runs/t", "--dataset", "tensors", "--data-dir",
                   "held.safetensors", "--indices", "0:30", *ATTACK)
    assert first.code == again.code == 0, (first.stderr, again.stderr)
    kinds = [r.kind for r in read_metrics(Path("runs/t")).records]
    assert kinds == ["import", "attack", "attack"]
    a, b = (envelope_records(r.stdout, "attack")[0] for r in (first, again))
    assert a["per_example"] == b["per_example"]


@pytest.mark.parametrize(("argv", "words"), [
    (["--dataset", "tensors"], "--dataset tensors: reads its files from --data-dir"),
    (["--dataset", "tensors", "--data-dir", "held.pt"], "no pickle"),
    (["--dataset", "nope", "--data-dir", "held.npz"], "--dataset: Input should be"),
    (["--indices", "5:5"], "--indices 5:5: the range"),
    (["--indices", "nowhere.txt"], "--indices nowhere.txt: no such file"),
    (["--indices", "runs"], "--indices runs: is a folder"),
    (["--dataset", "tensors", "--data-dir", "runs"], "runs: is a folder"),
    (["--dataset", "tensors", "--data-dir", "held.npz", "--indices", "50:70"], "indices"),
])
def test_bad_data_options_are_one_line_exit_2(pagctl: Any, imported: dict[str, Any],
                                              argv: list[str], words: str) -> None:
    Path("held.pt").write_bytes(b"not a pickle either")
    got = pagctl("attack", "runs/d", *ATTACK, *argv)
    assert got.code == 2, got.stderr
    assert words in got.stderr and len(got.stderr.strip().splitlines()) == 1, got.stderr


def test_a_range_of_indices_is_start_inclusive_stop_exclusive() -> None:
    from pagctl.cli.common import read_indices

    assert read_indices("3:7").tolist() == [3, 4, 5, 6]
    assert read_indices(":3").tolist() == [0, 1, 2]
    with pytest.raises(SpecError, match="holds no index"):
        read_indices("7:3")
