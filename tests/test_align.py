"""The alignment metric: known values (a model against its own gradients, a linear model
against its weight rows), the report's parts, and its agreement with the training metric."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pagctl.align import alignment_report, gradient_panels, mean_alignment
from pagctl.data import TensorImageDataset
from pagctl.gradients import input_gradients

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 40, classes: int = 5) -> TensorImageDataset:
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % classes)


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
