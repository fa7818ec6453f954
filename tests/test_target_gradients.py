"""Built-in target-gradient sources: exact values against hand computation and brute force."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor
from torch.utils.data import Dataset

from pagctl.errors import SpecError
from pagctl.protocols import BuildContext, TargetGradientSource
from pagctl.target_gradients import nearest_neighbor as nn_module
from pagctl.target_gradients.class_mean import ClassMean
from pagctl.target_gradients.nearest_neighbor import NearestNeighbor
from pagctl.target_gradients.none import NoSource
from pagctl.target_gradients.one_image import OneImage

SHAPE = (2, 3, 3)


pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3
COUNTS = (12, 10, 8)
DUPLICATE = (5, 29)  # image 29 is an exact copy of image 5 (both class 0)


class _Tiny(Dataset[tuple[Tensor, int]]):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.rand((len(labels), *SHAPE), generator=g)
    labels[DUPLICATE[1]] = labels[DUPLICATE[0]] = 0
    images[DUPLICATE[1]] = images[DUPLICATE[0]]
    return images, labels


def _ctx(*, seed: int = 0, cache_dir: Path | None = None, fingerprint: str | None = None,
         train: bool = True) -> BuildContext:
    images, labels = _data()
    return BuildContext(num_classes=NUM_CLASSES, input_shape=SHAPE, device=torch.device("cpu"),
                        seed=seed, train_set=_Tiny(images, labels) if train else None,
                        cache_dir=cache_dir, data_fingerprint=fingerprint)


def _all_classes(n: int) -> Tensor:
    return torch.arange(NUM_CLASSES).repeat(n, 1)


def _queries(n: int = 7) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand((n, *SHAPE), generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _brute_force(queries: Tensor, images: Tensor, labels: Tensor, pool: Tensor | None = None,
                 self_index: Tensor | None = None) -> Tensor:
    """(Q, num_classes) training positions of the nearest image of each class, skipping exact
    copies of the query and the query itself; −1 where none is left. Full matrix, float64."""
    d = torch.cdist(queries.flatten(1).double(), images.flatten(1).double(),
                    compute_mode="donot_use_mm_for_euclid_dist")
    d[d == 0] = float("inf")
    if self_index is not None:
        d[torch.arange(len(queries)), self_index] = float("inf")
    if pool is not None:
        outside = torch.ones(len(images), dtype=torch.bool)
        outside[pool] = False
        d[:, outside] = float("inf")
    out = torch.full((len(queries), NUM_CLASSES), -1, dtype=torch.int64)
    for c in range(NUM_CLASSES):
        dc = torch.where(labels[None, :] == c, d, float("inf"))
        best, arg = dc.min(dim=1)
        out[:, c] = torch.where(torch.isinf(best), -1, arg)
    return out


def _targets_from(table: Tensor, images: Tensor, inputs: Tensor) -> Tensor:
    reps = images[table.clamp_min(0)]
    return torch.where((table < 0)[..., None, None, None], 0.0, reps - inputs[:, None])


BUILDERS: dict[str, Any] = {
    "none": lambda ctx: NoSource(NoSource.Params(), ctx),
    "one_image": lambda ctx: OneImage(OneImage.Params(), ctx),
    "class_mean": lambda ctx: ClassMean(ClassMean.Params(scale=1.5), ctx),
    "nearest_neighbor": lambda ctx: NearestNeighbor(NearestNeighbor.Params(), ctx),
    "nearest_neighbor_pool": lambda ctx: NearestNeighbor(
        NearestNeighbor.Params(pool_size=3, chunk_size=2), ctx),
}


# ---------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("with_index", [False, True])
def test_shape_finite_and_inputs_untouched(name: str, with_index: bool) -> None:
    source = BUILDERS[name](_ctx())
    assert isinstance(source, TargetGradientSource)
    images, labels = _data()
    index = torch.tensor([3, 0, 29, 11])
    x, y = images[index].clone(), labels[index].clone()
    classes = torch.tensor([[0, 1], [2, 2], [1, 0], [0, 1]])
    before = (x.clone(), y.clone(), classes.clone())
    rng = torch.get_rng_state()
    out = source(x, y, classes, index=index if with_index else None)
    assert out.shape == (4, 2, *SHAPE) and out.dtype == x.dtype
    assert bool(torch.isfinite(out).all())
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])
    assert torch.equal(classes, before[2])
    assert torch.equal(torch.get_rng_state(), rng)
    double = source(x.double(), y, classes, index=index if with_index else None)
    assert double.dtype == torch.float64
    assert torch.allclose(double.float(), out, atol=1e-6)


@pytest.mark.parametrize("name", ["one_image", "class_mean", "nearest_neighbor"])
def test_sources_need_the_training_set(name: str) -> None:
    with pytest.raises(SpecError, match=f"target_gradients: {name} needs the training set"):
        BUILDERS[name](_ctx(train=False))


@pytest.mark.parametrize("name", ["one_image", "class_mean", "nearest_neighbor"])
def test_bad_calls_are_rejected(name: str) -> None:
    source = BUILDERS[name](_ctx())
    x, y = _queries(2)
    with pytest.raises(ValueError):
        source(x, y, torch.tensor([[0], [3]]))
    with pytest.raises(ValueError):
        source(x[:, :1], y, torch.tensor([[0], [1]]))


def test_none_returns_zeros_and_disables_pag() -> None:
    source = NoSource(NoSource.Params(), _ctx(train=False))
    assert NoSource.disables_pag is True
    x, y = _queries(3)
    out = source(x, y, _all_classes(3))
    assert out.shape == (3, NUM_CLASSES, *SHAPE) and not out.any()
    with pytest.raises(ValidationError):
        NoSource.Params(scale=1)  # type: ignore[call-arg]


# --------------------------------------------------------------------- one image, mean


def test_one_image_is_r_minus_x_with_a_fixed_seeded_image() -> None:
    images, labels = _data()
    source = OneImage(OneImage.Params(), _ctx(seed=5))
    assert source.indices.shape == (NUM_CLASSES,)
    assert torch.equal(labels[source.indices], torch.arange(NUM_CLASSES))
    x, y = _queries()
    classes = _all_classes(len(x))
    expected = images[source.indices][None] - x[:, None]
    assert torch.equal(source(x, y, classes), expected)
    # Fixed for every x, and reproducible from the seed (ctx.seed or the seed param).
    assert torch.equal(OneImage(OneImage.Params(), _ctx(seed=5)).indices, source.indices)
    assert torch.equal(OneImage(OneImage.Params(seed=5), _ctx(seed=0)).indices, source.indices)
    picks = {tuple(OneImage(OneImage.Params(seed=s), _ctx()).indices.tolist()) for s in range(6)}
    assert len(picks) > 1


@pytest.mark.parametrize("scale", [1.0, 2.5, 0.0])
def test_class_mean_is_scaled_mean_minus_x(scale: float) -> None:
    images, labels = _data()
    source = ClassMean(ClassMean.Params(scale=scale), _ctx())
    means = torch.stack([images[labels == c].double().mean(0) for c in range(NUM_CLASSES)])
    assert torch.allclose(source.means.double(), means, atol=1e-7)
    x, y = _queries()
    classes = torch.tensor([[2, 0]] * len(x))
    expected = (scale * means[classes] - x[:, None].double()).float()
    assert torch.allclose(source(x, y, classes), expected, atol=1e-6)
    with pytest.raises(ValidationError):
        ClassMean.Params(scale=-1.0)


# -------------------------------------------------------------------- nearest neighbour


def _nn(ctx: BuildContext | None = None, **params: Any) -> NearestNeighbor:
    return NearestNeighbor(NearestNeighbor.Params(**params), ctx or _ctx())


@pytest.mark.parametrize("chunk_size", [4096, 3, 1])
def test_nearest_neighbor_table_equals_brute_force(chunk_size: int) -> None:
    images, labels = _data()
    source = _nn(chunk_size=chunk_size)
    expected = _brute_force(images, images, labels, self_index=torch.arange(len(images)))
    assert source.table.dtype == torch.int64 and source.table.shape == (len(images), NUM_CLASSES)
    assert torch.equal(source.table, expected)
    n = torch.arange(len(images))
    assert not bool((source.table == n[:, None]).any())  # never itself
    a, b = DUPLICATE  # nor an exact copy of itself
    assert source.table[a, 0] != b and source.table[b, 0] != a


@pytest.mark.parametrize("chunk_size", [4096, 3])
def test_nearest_neighbor_index_and_search_paths(chunk_size: int) -> None:
    images, labels = _data()
    source = _nn(chunk_size=chunk_size)
    index = torch.tensor([0, 5, 29, 17, 8])
    x, classes = images[index], _all_classes(len(index))
    expected = _targets_from(source.table[index], images, x)
    by_index = source(x, labels[index], classes, index=index)
    assert torch.equal(by_index, expected)
    # Without index the same training images are searched on the fly: same answer.
    assert torch.equal(source(x, labels[index], classes), expected)
    # Unseen images: brute force over the whole training set.
    q, qy = _queries()
    brute = _brute_force(q, images, labels)
    assert torch.equal(source(q, qy, _all_classes(len(q))), _targets_from(brute, images, q))
    # Only the requested classes, in the requested order.
    assert torch.equal(source(q, qy, torch.tensor([[2, 0]] * len(q))),
                       _targets_from(brute[:, [2, 0]], images, q))
    with pytest.raises(ValueError):
        source(x, labels[index], classes, index=torch.tensor([0, 1, 2, 3, 30]))


def test_nearest_neighbor_pool_subset() -> None:
    images, labels = _data()
    source = _nn(pool_size=4, seed=7)
    entries = torch.unique(source.table[source.table >= 0])
    assert len(entries) <= 4 * NUM_CLASSES
    for c in range(NUM_CLASSES):
        column = source.table[:, c]
        assert bool((labels[column] == c).all())
        assert len(torch.unique(column)) <= 4
    pool = entries if len(entries) == 4 * NUM_CLASSES else None
    assert pool is not None  # every pool image is somebody's nearest neighbour here
    expected = _brute_force(images, images, labels, pool=pool, self_index=torch.arange(30))
    assert torch.equal(source.table, expected)
    q, qy = _queries()
    assert torch.equal(source(q, qy, _all_classes(len(q))),
                       _targets_from(_brute_force(q, images, labels, pool=pool), images, q))
    # seeded: the same subset from the same seed, another one from another seed
    assert torch.equal(_nn(pool_size=4, seed=7).table, source.table)
    assert torch.equal(_nn(_ctx(seed=7), pool_size=4).table, source.table)
    assert not torch.equal(_nn(pool_size=4, seed=8).table, source.table)
    # a pool at least as large as a class is the whole class
    assert torch.equal(_nn(pool_size=len(images)).table, _nn().table)


def test_nearest_neighbor_without_candidate_gives_zero() -> None:
    images, labels = _data()
    source = _nn(pool_size=1)
    x, y, classes = images, labels, _all_classes(len(images))
    out = source(x, y, classes, index=torch.arange(len(images)))
    alone = source.table < 0  # the single pool image of a class, asked for its own class
    assert int(alone.sum()) == NUM_CLASSES
    assert not out[alone].any()
    assert bool(out[~alone].flatten(1).abs().sum(1).gt(0).all())
    assert torch.equal(source(x, y, classes), out)


def test_nearest_neighbor_cache_is_written_reused_and_repaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = _ctx(cache_dir=tmp_path, fingerprint="digits-abc")
    first = _nn(ctx)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    assert not list(tmp_path.glob("*.tmp"))

    real_compute = nn_module._compute_table

    def fail(*args: Any, **kwargs: Any) -> Tensor:
        raise AssertionError("recomputed")

    monkeypatch.setattr(nn_module, "_compute_table", fail)
    assert torch.equal(_nn(ctx).table, first.table)  # read from the file
    assert torch.equal(_nn(ctx, chunk_size=5).table, first.table)  # chunking is not in the key
    with pytest.raises(AssertionError, match="recomputed"):
        _nn(ctx, pool_size=3)  # other parameters, other key
    with pytest.raises(AssertionError, match="recomputed"):
        _nn(_ctx(cache_dir=tmp_path, fingerprint="other"))

    files[0].write_bytes(b"\x00garbage" * 10)  # corrupt: recomputed, not crashed on
    with pytest.raises(AssertionError, match="recomputed"):
        _nn(ctx)
    monkeypatch.setattr(nn_module, "_compute_table", real_compute)
    assert torch.equal(_nn(ctx).table, first.table)
    monkeypatch.setattr(nn_module, "_compute_table", fail)
    assert torch.equal(_nn(ctx).table, first.table)  # the repaired file is used again

    from safetensors.torch import save_file

    wrong = first.table.roll(1, dims=1)  # readable but inconsistent with the labels
    save_file({"table": wrong, "pool_index": torch.arange(30)}, str(files[0]))
    with pytest.raises(AssertionError, match="recomputed"):
        _nn(ctx)


def test_nearest_neighbor_cache_needs_dir_fingerprint_and_flag(tmp_path: Path) -> None:
    _nn(_ctx(cache_dir=tmp_path))  # no fingerprint
    _nn(_ctx(cache_dir=tmp_path, fingerprint="f"), cache=False)
    assert not list(tmp_path.iterdir())
    _nn(_ctx(fingerprint="f"))  # no cache dir: nothing written anywhere


def test_nearest_neighbor_params() -> None:
    params = NearestNeighbor.Params()
    assert (params.pool_size, params.seed, params.chunk_size, params.cache) == \
        (None, None, 4096, True)
    for bad in ({"pool_size": 0}, {"chunk_size": 0}, {"k": 1}):
        with pytest.raises(ValidationError):
            NearestNeighbor.Params.model_validate(bad)
