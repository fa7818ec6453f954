"""The alignment metric: known values (a model against its own gradients, a linear model
against its weight rows), the report's parts, and its agreement with the training metric."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel
from torch import Tensor, nn

import pagctl.api as pg
from pagctl.align import (
    AlignmentJob,
    AlignProgress,
    AlignReport,
    alignment_report,
    evaluate_alignment,
    gradient_panels,
    mean_alignment,
)
from pagctl.data import DataBundle, TensorImageDataset, subset_digest
from pagctl.errors import FieldError, SpecError
from pagctl.evaluation.request import EvaluationRequest
from pagctl.evaluation.state import evaluation_key
from pagctl.gradients import input_gradients
from pagctl.provenance import model_digest

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 40, classes: int = 5) -> TensorImageDataset:
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % classes)


def _bundle(data: TensorImageDataset, classes: int = 5) -> DataBundle:
    """``data`` as an evaluation set (what `evaluate_alignment` measures on)."""
    return pg.tensors(data.images, data.labels, num_classes=classes)


def _mlp(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, classes))


class OwnGradients:
    """The model's own ∇ₓ log p(t|x): perfectly aligned by construction."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: Tensor, y: Tensor, classes: Tensor, *, index: Any = None) -> Tensor:
        return input_gradients(self.model, x, classes).detach()


class WeightRows:
    """g(x, t) = w_t, the linear model's weight row of class t."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight

    def __call__(self, x: Tensor, y: Tensor, classes: Tensor, *, index: Any = None) -> Tensor:
        return self.weight[classes].reshape(*classes.shape, *x.shape[1:])


def test_a_model_against_its_own_gradients_scores_one() -> None:
    model = _mlp().eval()
    rep = alignment_report(model, _data(), torch.arange(40), OwnGradients(model),
                           num_classes=5, classes_per_image=3, batch_size=16)
    assert rep.mean == pytest.approx(1.0, abs=1e-6)
    assert rep.interval[0] == pytest.approx(1.0, abs=1e-6)
    assert rep.fraction_positive == 1.0 and rep.n == 40
    assert rep.per_target["other"] == pytest.approx(1.0, abs=1e-6)
    assert set(rep.per_true_class) == {"0", "1", "2", "3", "4"}


def test_a_linear_model_against_its_weight_rows_matches_the_closed_form() -> None:
    """log p(t|x) = w_t·x + b_t − logsumexp(Wx + b), so ∇ₓ = w_t − Σ_j p_j w_j."""
    torch.manual_seed(1)
    lin = nn.Linear(16, 5)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    data = _data()
    x = torch.stack([data[i][0] for i in range(40)]).flatten(1)
    w = lin.weight.detach()
    with torch.no_grad():
        p = torch.softmax(lin(x), dim=1)
    expected = []
    for t in range(5):
        grad = w[t] - p @ w
        expected.append(torch.cosine_similarity(grad, w[t].expand_as(grad), dim=1))
    exact = torch.stack(expected, dim=1)  # (40, 5)
    rep = alignment_report(model, data, torch.arange(40), WeightRows(w), num_classes=5,
                           classes_per_image=5, batch_size=7)
    assert rep.mean == pytest.approx(float(exact.mean()), abs=1e-5)
    labels = torch.arange(40) % 5
    own = exact[torch.arange(40), labels]
    assert rep.per_target["true"] == pytest.approx(float(own.mean()), abs=1e-5)
    assert rep.per_true_class["2"] == pytest.approx(float(exact[labels == 2].mean()), abs=1e-5)
    assert rep.fraction_positive == pytest.approx(float((exact.mean(1) > 0).double().mean()))
    lo, hi = rep.interval
    assert lo < rep.mean < hi and hi - lo < 0.5


def test_mean_alignment_is_the_report_mean_and_restores_the_mode() -> None:
    model = _mlp()
    model.train()
    src = WeightRows(torch.randn(5, 16, generator=torch.Generator().manual_seed(3)))
    kwargs: dict[str, Any] = {"num_classes": 5, "classes_per_image": 2, "seed": 4}
    m = mean_alignment(model, _data(), torch.arange(30), src, **kwargs)
    rep = alignment_report(model, _data(), torch.arange(30), src, **kwargs)
    assert m == rep.mean and model.training
    assert rep.per_target["true"] is not None or rep.per_target["other"] is not None


def test_gradient_panels_cover_every_class() -> None:
    model = _mlp().eval()
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    grads, targets = gradient_panels(model, x, y, OwnGradients(model), 5)
    assert grads.shape == targets.shape == (3, 5, 1, 4, 4)
    assert torch.allclose(grads, targets, atol=1e-6)


class NoisyTargets:
    """A source that draws noise for unseen images from its own generator, as SBG does, and
    declares ``reseed``; ``calls`` counts its calls, ``fail_at`` interrupts one."""

    def __init__(self, seed: int, reseed: bool = True, fail_at: int | None = None) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.fail_at = fail_at
        if reseed:
            self.reseed = lambda s: self.generator.manual_seed(s)

    def __call__(self, x: Tensor, y: Tensor, classes: Tensor, *, index: Any = None) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        noise = torch.randn((*classes.shape, *x.shape[1:]), generator=self.generator)
        return noise + x[:, None]


def _shard_scores(tmp_path: Path, source: Any, count: int, *, batch_size: int = 7,
                  seed: int = 3) -> AlignReport:
    """Score ``count`` shards, each with a fresh source (as independent jobs), then merge."""
    model, data = _mlp(), _data()
    job = AlignmentJob("noisy", _Params(), 3)
    request = EvaluationRequest(indices=torch.arange(len(data)), batch_size=batch_size,
                                seed=seed, shard_dir=tmp_path)
    for i in range(count):
        assert evaluate_alignment(model, _bundle(data), job, request.part(shard=(i, count)),
                                  source()) is None
    merged = evaluate_alignment(model, _bundle(data), job,
                                request.part(merge_shards=count), source())
    assert merged is not None
    return merged


class _Params(BaseModel):
    scale: float = 1.0


@pytest.mark.parametrize("count", [2, 3, 6])
def test_shards_merge_into_the_unsharded_report(tmp_path: Path, count: int) -> None:
    """Shards scored by fresh sources merge into exactly the unsharded report (every number
    but the seconds), because each batch draws its classes and reseeds the source from the
    batch's own seed."""
    model, data = _mlp(), _data()
    whole = evaluate_alignment(model, _bundle(data), AlignmentJob("noisy", _Params(), 3),
                               EvaluationRequest(batch_size=7, seed=3), NoisyTargets(0))
    assert whole is not None
    merged = _shard_scores(tmp_path / str(count), lambda: NoisyTargets(0), count)
    assert replace(merged, seconds=0.0) == replace(whole, seconds=0.0)
    assert len(list((tmp_path / str(count)).iterdir())) == count
    assert whole.n == 40 and whole.per_target["true"] is not None
    # 40 images in batches of 7 are 6 batches: a 7th shard would own none, and is refused
    with pytest.raises(FieldError, match="7 shards of 40 points in batches of 7"):
        _shard_scores(tmp_path / "7", lambda: NoisyTargets(0), 7)


def test_a_source_without_reseed_makes_shards_differ(tmp_path: Path) -> None:
    """Fault injection: a random source that cannot be reseeded continues one stream across
    batches, so the shards (fresh streams) no longer reproduce the unsharded score: the
    reseed is what makes the merge exact."""
    model, data = _mlp(), _data()
    whole = alignment_report(model, data, torch.arange(len(data)),
                             NoisyTargets(0, reseed=False), num_classes=5,
                             classes_per_image=3, batch_size=7, seed=3)
    merged = _shard_scores(tmp_path, lambda: NoisyTargets(0, reseed=False), 2)
    assert merged.mean != whole.mean


def test_a_stopped_shard_resumes_and_a_foreign_file_is_refused(tmp_path: Path) -> None:
    """A shard interrupted after its first batch keeps it in its file; rerunning scores only
    the rest, and the merge equals the unsharded score. A shard file of another score (here
    another K) is refused, naming what differs."""
    model, data = _mlp(), _data()
    indices = torch.arange(len(data))
    job = AlignmentJob("noisy", _Params(), 3)
    request = EvaluationRequest(indices=indices, batch_size=7, seed=3, shard_dir=tmp_path)
    bundle = _bundle(data)
    whole = evaluate_alignment(model, bundle, job, request, NoisyTargets(0))
    assert whole is not None
    with pytest.raises(KeyboardInterrupt):
        evaluate_alignment(model, bundle, job, request.part(shard=(0, 1)),
                           NoisyTargets(0, fail_at=2))
    [path] = list(tmp_path.iterdir())
    key = evaluation_key({"source": "noisy", "params": _Params().model_dump(mode="json"),
                          "classes_per_image": 3}, seed=3, batch_size=7, indices=indices,
                         model_sha256=model_digest(model),
                         data_sha256=subset_digest(data, indices))
    saved = AlignProgress.load(path, {**key, "shard": [0, 1]})
    assert saved.done.tolist() == [True] + [False] * 5
    with pytest.raises(SpecError, match=r"merge_shards: shard 0/1 stopped before the end "
                       r"\(its batch 1 not scored\)"):
        evaluate_alignment(model, bundle, job, request.part(merge_shards=1), NoisyTargets(0))
    rest = NoisyTargets(0)
    evaluate_alignment(model, bundle, job, request.part(shard=(0, 1)), rest)
    assert rest.calls == 5  # the first batch was not scored again
    merged = evaluate_alignment(model, bundle, job, request.part(merge_shards=1),
                                NoisyTargets(0))
    assert merged is not None
    assert replace(merged, seconds=0.0) == replace(whole, seconds=0.0)
    with pytest.raises(SpecError, match="classes per image"):
        AlignProgress.load(path, {**key, "classes_per_image": 2, "shard": [0, 1]})
