"""Adversarial examples from the Python API: ``keep_adversarial`` hands every point's back
(in batches, as one tensor, as a file), in memory or memory-mapped; ``save_adversarial``
writes the ``--save-adversarial`` file, streamed; the streaming safetensors writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from attack_kit import train_digits_mlp
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from pagctl import api
from pagctl.checkpoint import save_tensor_chunks
from pagctl.errors import FieldError
from pagctl.robustness import adversarial


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    pytest.importorskip("sklearn.datasets")
    return train_digits_mlp(90)


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **extra: Any) -> Any:
    return api.attack(model, (x, y), "pgd_linf", eps=0.1, params={"steps": 5},
                      batch_size=32, probes=False, **extra)


def test_every_points_adversarial_example_comes_back_in_batches_and_is_what_was_measured(
        digits: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """The batches cover the points in order; each point counted broken is misclassified at
    its x_adv and each counted robust is classified correctly there; clean-misclassified
    points come back unchanged; every x_adv is inside the budget and the box."""
    model, x, y = digits
    report = _attack(model, x, y, keep_adversarial=True)
    examples = report.adversarial
    assert examples is not None and len(examples) == report.n == len(y)
    batches = list(examples.batches(25))
    assert [len(b.indices) for b in batches] == [25, 25, 25, 15]
    x_adv = torch.cat([b.x_adv for b in batches])
    assert torch.equal(x_adv, examples.x_adv())
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(len(y)))
    assert torch.equal(torch.cat([b.x for b in batches]), x)
    assert torch.equal(torch.cat([b.y for b in batches]), y)
    robust = torch.cat([b.robust_correct for b in batches])
    clean = torch.cat([b.clean_correct for b in batches])
    assert torch.equal(robust, report.robust_mask) and torch.equal(clean, report.clean_mask)
    with torch.no_grad():
        right = model(x_adv).argmax(1) == y
    assert torch.equal(right, robust)
    assert 0 < int(robust.sum()) < int(clean.sum())
    assert torch.equal(x_adv[~clean], x[~clean])
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert _attack(model, x, y).adversarial is None  # kept only when asked


def _mapped_file(tensor: torch.Tensor) -> bool:
    """Whether the tensor's memory is a mapping of the store's (deleted) temporary file, as
    /proc/self/maps lists the process's mappings."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    address = tensor.data_ptr()
    for line in maps.read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in span.split("-"))
        if lo <= address < hi:
            return "pagctl-adversarial-" in (rest[-1] if len(rest) == 5 else "")
    return False


def test_a_large_evaluation_keeps_its_examples_in_a_memory_mapped_file_with_the_same_results(
        digits: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Above IN_MEMORY_BYTES the store is a memory-mapped file; the examples, the results
    and the saved file are the same as in memory."""
    model, x, y = digits
    in_memory = _attack(model, x, y, save_adversarial=tmp_path / "a.safetensors")
    monkeypatch.setattr(adversarial, "IN_MEMORY_BYTES", 1024)
    store = adversarial.image_store(api.tensors(x, y).test, torch.arange(len(y)), len(y))
    assert _mapped_file(store) and torch.equal(store, x)
    mapped = _attack(model, x, y, keep_adversarial=True,
                     save_adversarial=tmp_path / "b.safetensors")
    assert mapped.adversarial is not None and in_memory.adversarial is not None
    assert _mapped_file(mapped.images) and not _mapped_file(in_memory.images)
    assert torch.equal(mapped.adversarial.x_adv(), in_memory.adversarial.x_adv())
    assert torch.equal(mapped.robust_mask, in_memory.robust_mask)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_the_saved_file_is_the_save_adversarial_format_and_sweeps_number_their_files(
        digits: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    model, x, y = digits
    reports = api.attack(model, (x, y), "pgd_linf", params={"steps": 3}, eps_sweep=[0.05, 0.1],
                         probes=False, save_adversarial=tmp_path / "adv.safetensors")
    for i, report in enumerate(reports):
        path = tmp_path / f"adv-eps{i}.safetensors"
        saved = load_file(str(path))
        assert sorted(saved) == ["clean_correct", "indices", "robust_correct", "x", "x_adv",
                                 "y"]
        assert report.adversarial is not None
        assert torch.equal(saved["x_adv"], report.adversarial.x_adv())
        assert torch.equal(saved["x"], x) and torch.equal(saved["y"], y)
        assert torch.equal(saved["robust_correct"].bool(), report.robust_mask)
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata()["attack"] == "pgd_linf"
            assert float(handle.metadata()["eps"]) == pytest.approx([0.05, 0.1][i])
    assert not (tmp_path / "adv.safetensors").exists()


@pytest.mark.parametrize(("given", "words"), [
    ({"save_adversarial": "adv.pt"}, "save_adversarial: adv.pt: writes safetensors"),
    ({"save_adversarial": "runs/a/model.safetensors"},
     "save_adversarial: .*run folder's own file"),
    ({"keep_adversarial": True, "shard": (0, 2), "shard_dir": "s"},
     "keep_adversarial: a shard"),
    ({"save_adversarial": "/proc/nowhere/adv.safetensors"}, "cannot write in /proc"),
    ({"save_adversarial": "."}, "writes safetensors"),
    ({"save_adversarial": "runs/r/model.safetensors"}, "a run folder's own file"),
])
def test_bad_adversarial_requests_are_one_field_error(
        digits: tuple[nn.Module, torch.Tensor, torch.Tensor], given: dict[str, Any],
        words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, x, y = digits
    with pytest.raises(FieldError, match=words):
        _attack(model, x, y, **given)
    assert list(tmp_path.iterdir()) == []


def test_chunks_written_piece_by_piece_read_back_as_safetensors(tmp_path: Path) -> None:
    """Every dtype the writer names, rows in chunks of uneven sizes, metadata: what
    safetensors reads back equals the tensors; chunks that do not add up leave no file."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.rand(7, 3, 2, generator=g),
               "b": torch.randint(0, 2**40, (7,), generator=g),
               "c": torch.randint(0, 255, (5, 4), generator=g).to(torch.uint8),
               "d": torch.rand(3, generator=g).double(),
               "e": torch.rand(4, generator=g) > 0.5,
               "f": torch.randint(-9, 9, (6, 1), generator=g).int(),
               "g": torch.rand(2, 2, generator=g).half()}
    entries = [(name, t.dtype, tuple(t.shape), [t[:1], t[1:3], t[3:]])
               for name, t in tensors.items()]
    save_tensor_chunks(tmp_path / "t.safetensors", entries, {"k": "v"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"k": "v"}
    short = [("a", torch.float32, (7, 3, 2), [tensors["a"][:6]])]
    with pytest.raises(ValueError, match="6 rows, not 7"):
        save_tensor_chunks(tmp_path / "u.safetensors", short)
    wrong = [("a", torch.float32, (7, 3, 2), [tensors["a"].double()])]
    with pytest.raises(ValueError, match="does not fit"):
        save_tensor_chunks(tmp_path / "u.safetensors", wrong)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
