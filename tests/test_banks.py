"""Target-gradient banks (pagctl.banks) and the precomputed source that serves them."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from pagctl.banks import bank_info, bank_nbytes, write_bank
from pagctl.errors import CheckpointError, SpecError
from pagctl.protocols import BuildContext
from pagctl.target_gradients.class_mean import ClassMean
from pagctl.target_gradients.precomputed import MissingIndexError, Precomputed
from pagctl.testing import small_context

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting:
    """Wraps a source; counts the images it was called on and checks the call."""

    def __init__(self, inner: Any, num_classes: int) -> None:
        self.inner = inner
        self.num_classes = num_classes
        self.images = 0

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, *,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        assert index is not None and index.dtype == torch.int64
        assert torch.equal(classes, torch.arange(self.num_classes).expand(len(inputs), -1))
        self.images += len(inputs)
        return self.inner(inputs, labels, classes, index=index)


def _setup(seed: int = 0) -> tuple[BuildContext, ClassMean, torch.Tensor, torch.Tensor]:
    ctx = small_context(seed=seed)
    source = ClassMean(ClassMean.Params(scale=0.7), ctx)
    train = ctx.train_set
    assert train is not None
    x = torch.stack([train[i][0] for i in range(len(train))])  # type: ignore[arg-type]
    y = torch.tensor([train[i][1] for i in range(len(train))])  # type: ignore[arg-type]
    return ctx, source, x, y


def _write(ctx: BuildContext, source: Any, path: Path, **kw: Any) -> Any:
    options: dict[str, Any] = {"num_classes": ctx.num_classes, "batch_size": 7,
                               "dtype": "float32", "progress": False, "chunk_size": 8,
                               "source_name": "class_mean", "source_params": {"scale": 0.7},
                               "data_fingerprint": ctx.data_fingerprint}
    options.update(kw)
    assert ctx.train_set is not None
    return write_bank(source, ctx.train_set, path, **options)


def _precomputed(path: Path, ctx: BuildContext, **params: Any) -> Precomputed:
    return Precomputed(Precomputed.Params(path=path, **params), ctx)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("mmap", [True, False])
def test_serves_the_sources_values_by_index(tmp_path: Path, dtype: str, mmap: bool) -> None:
    ctx, source, x, y = _setup()
    path = tmp_path / "bank.safetensors"
    info = _write(ctx, source, path, dtype=dtype)
    assert (info.num_images, info.num_classes, info.input_shape) == (40, 10, (1, 8, 8))
    assert info.dtype == dtype and info.source == "class_mean"
    assert info.params == {"scale": 0.7} and info.data_fingerprint == ctx.data_fingerprint
    bank = _precomputed(path, ctx, mmap=mmap)
    gen = torch.Generator().manual_seed(0)
    # Random order, a repeat, consecutive runs, first and last rows.
    index = torch.cat([torch.randperm(40, generator=gen)[:11], torch.tensor([3, 3, 4, 5, 0,
                                                                             39])])
    classes = torch.randint(0, 10, (len(index), 4), generator=gen)
    got = bank(x[index], y[index], classes, index=index)
    want = source(x[index], y[index], classes)
    assert got.shape == want.shape and got.dtype == torch.float32
    if dtype == "float32":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_mmap_and_full_load_agree(tmp_path: Path) -> None:
    ctx, source, x, y = _setup()
    path = tmp_path / "bank.safetensors"
    _write(ctx, source, path, dtype="float16")
    index = torch.tensor([7, 1, 30, 31, 32, 12])
    classes = torch.arange(10).expand(6, -1).contiguous()
    a = _precomputed(path, ctx, mmap=True)(x[index], y[index], classes, index=index)
    b = _precomputed(path, ctx, mmap=False)(x[index], y[index], classes, index=index)
    assert torch.equal(a, b)


def test_file_loads_with_safetensors_own_readers(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    ctx, source, x, y = _setup()
    path = tmp_path / "bank.safetensors"
    _write(ctx, source, path, dtype="float16")
    tensors = load_file(str(path))
    assert set(tensors) == {"targets", "labels"}
    assert tensors["targets"].shape == (40, 10, 1, 8, 8)
    assert tensors["targets"].dtype == torch.float16
    assert torch.equal(tensors["labels"], y)
    classes = torch.arange(10).expand(40, -1)
    full = source(x, y, classes).to(torch.float16)
    assert torch.equal(tensors["targets"], full)
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["pagctl_bank"])
        assert torch.equal(fh.get_slice("targets")[5:9], full[5:9])
    assert meta["format"] == 1 and meta["num_images"] == 40 and meta["dtype"] == "float16"
    assert meta["created_by"].startswith("pagctl ")
    # Header: 8-byte little-endian length, JSON, data aligned to 8 bytes.
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0 and json.loads(raw[8: 8 + length])["labels"]["dtype"] == "I64"
    assert len(raw) == 8 + length + 40 * 8 + bank_nbytes(40, 10, (1, 8, 8), "float16")


def test_resume_after_an_interruption_gives_the_same_bank(tmp_path: Path) -> None:
    ctx, source, _, _ = _setup()
    whole = tmp_path / "whole.safetensors"
    _write(ctx, source, whole)

    class Stop(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        assert total == 5
        if done == 2:
            raise Stop

    path = tmp_path / "bank.safetensors"
    first = Counting(source, 10)
    with pytest.raises(Stop):
        _write(ctx, first, path, on_chunk=stop_after_two)
    parts = tmp_path / "bank.safetensors.parts"
    assert sorted(p.name for p in parts.glob("chunk-*")) == ["chunk-000000.safetensors",
                                                             "chunk-000001.safetensors"]
    assert not path.exists() and first.images == 16
    second = Counting(source, 10)
    calls: list[int] = []
    _write(ctx, second, path, resume=True, on_chunk=lambda d, t: calls.append(d))
    assert second.images == 24 and calls == [3, 4, 5]  # only the missing chunks
    assert path.read_bytes() == whole.read_bytes()
    assert not parts.exists()
    # Running the finished command again is a no-op.
    again = Counting(source, 10)
    assert _write(ctx, again, path, resume=True).num_images == 40 and again.images == 0


def test_a_fresh_run_discards_old_parts_and_resume_refuses_foreign_ones(
        tmp_path: Path) -> None:
    ctx, source, _, _ = _setup()
    path = tmp_path / "bank.safetensors"

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(ctx, source, path, on_chunk=stop)
    with pytest.raises(CheckpointError, match="dtype"):
        _write(ctx, source, path, resume=True, dtype="float16")
    counted = Counting(source, 10)
    _write(ctx, counted, path)  # no resume: starts over
    assert counted.images == 40


def test_refuses_to_replace_a_bank_without_overwrite(tmp_path: Path) -> None:
    ctx, source, _, _ = _setup()
    path = tmp_path / "bank.safetensors"
    _write(ctx, source, path)
    with pytest.raises(CheckpointError, match="overwrite"):
        _write(ctx, source, path)
    _write(ctx, source, path, overwrite=True, dtype="float16")
    assert bank_info(path).dtype == "float16"


def test_float16_overflow_is_an_error_naming_float32(tmp_path: Path) -> None:
    ctx, source, _, _ = _setup()

    def huge(inputs: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, *,
             index: torch.Tensor | None = None) -> torch.Tensor:
        return source(inputs, labels, classes) * 1e6

    with pytest.raises(SpecError, match="float32"):
        _write(ctx, huge, tmp_path / "bank.safetensors", dtype="float16")
    with pytest.raises(SpecError, match="dtype"):
        _write(ctx, source, tmp_path / "b.safetensors", dtype="bfloat16")


def test_refuses_a_bank_made_for_other_data(tmp_path: Path) -> None:
    ctx, source, x, y = _setup()
    path = tmp_path / "bank.safetensors"
    _write(ctx, source, path)
    other = small_context(seed=3)  # same shapes and size, other images
    with pytest.raises(ValueError, match="made for training data .*pagctl bank"):
        _precomputed(path, other)
    _precomputed(path, other, check_fingerprint=False)  # the user vouches for the data
    with pytest.raises(ValueError, match="classes"):
        _precomputed(path, small_context(classes=5))
    with pytest.raises(ValueError, match="40 images"):
        _precomputed(path, small_context(train_size=30))
    with pytest.raises(ValueError, match="no such bank"):
        _precomputed(tmp_path / "missing.safetensors", ctx)
    not_a_bank = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"targets": torch.zeros(2)}, str(not_a_bank))
    with pytest.raises(ValueError, match="not a pagctl target-gradient bank"):
        _precomputed(not_a_bank, ctx)


def test_refuses_calls_without_index(tmp_path: Path) -> None:
    ctx, source, x, y = _setup()
    path = tmp_path / "bank.safetensors"
    _write(ctx, source, path)
    bank = _precomputed(path, ctx)
    classes = torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(MissingIndexError, match="training images only.*class_mean"):
        bank(x[:3], y[:3], classes)
    assert issubclass(MissingIndexError, ValueError) and issubclass(MissingIndexError,
                                                                    SpecError)
    assert bank.requires_index is True
    with pytest.raises(ValueError, match=r"index must lie in \[0, 40\)"):
        bank(x[:3], y[:3], classes, index=torch.tensor([0, 1, 40]))
    with pytest.raises(ValueError, match="labels differ"):
        bank(x[:3], (y[:3] + 1) % 10, classes, index=torch.arange(3))


def test_index_path_meets_the_source_contract(tmp_path: Path) -> None:
    """The conformance suite on the indexed call only: a bank refuses index=None by
    design (index_only)."""
    from pagctl.testing import check_target_gradient_source

    ctx, source, x, y = _setup()
    path = tmp_path / "bank.safetensors"
    _write(ctx, source, path, dtype="float16")
    out = check_target_gradient_source(Precomputed, params={"path": str(path)}, ctx=ctx,
                                       index_only=True)
    assert out.shape == (8, 3, 1, 8, 8) and out.dtype == torch.float32
    with pytest.raises(AssertionError, match="NaN"):  # the suite can fail here
        check_target_gradient_source(_NaNBank, params={"path": str(path)}, ctx=ctx,
                                     index_only=True)


class _NaNBank(Precomputed):
    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, *,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        return super().__call__(inputs, labels, classes, index=index) * float("nan")


def test_memory_formula_matches_the_documented_sizes() -> None:
    assert bank_nbytes(50_000, 10, (3, 32, 32), "float16") == 3_072_000_000
    assert bank_nbytes(50_000, 10, (3, 32, 32), "float32") == 6_144_000_000
    assert bank_nbytes(50_000, 100, (3, 32, 32), "float16") == 30_720_000_000
    assert bank_nbytes(1437, 10, (1, 8, 8), "float16") == 1_839_360


def test_trains_from_a_bank_of_the_toy_score(tmp_path: Path, workdir: Path) -> None:
    """A bank written from toy_score trains exactly like toy_score itself (float32)."""
    from pagctl import registry
    from pagctl.build import build_context
    from pagctl.checkpoint import load_tensors
    from pagctl.data import load_data
    from pagctl.spec import load_spec
    from pagctl.target_gradients.toy_score import ToyScore
    from pagctl.train import train

    reg = registry.target_gradients
    added = [n for n in ("toy_score", "precomputed") if n not in reg._builtins]
    reg._builtins.update({
        "toy_score": "pagctl.target_gradients.toy_score:ToyScore",
        "precomputed": "pagctl.target_gradients.precomputed:Precomputed"})
    reg.refresh()
    try:
        common = ["data.toy_train_size=200", "data.batch_size=50", "train.epochs=2",
                  "eval.attack=null", "eval.align_source.name=toy_score"]
        base = load_spec("toy-pag-score", common)
        bundle = load_data(base.data)
        ctx = build_context(bundle, torch.device("cpu"), 0, None)
        bank = tmp_path / "toy.safetensors"
        write_bank(ToyScore(ToyScore.Params(), ctx), bundle.train, bank, num_classes=2,
                   dtype="float32", progress=False, source_name="toy_score")
        direct = train(load_spec("toy-pag-score", [*common, "out_dir=direct"]),
                       device="cpu", progress=False)
        banked = train(load_spec("toy-pag-score", [
            *common, "out_dir=banked", "target_gradients.name=precomputed",
            f"target_gradients.params.path={bank}"]), device="cpu", progress=False)
        assert direct.last["pag"] == pytest.approx(banked.last["pag"], rel=1e-6)
        wa = load_tensors(workdir / "direct" / "model.safetensors")
        wb = load_tensors(workdir / "banked" / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    finally:
        for name in added:
            del reg._builtins[name]
        reg.refresh()
