"""DeepFool: its pieces, the analytic linear case, the budget, params, and parity with
foolbox's L2DeepFoolAttack / LinfDeepFoolAttack. The contract and behaviour every attack
shares: test_attack_suite.py."""

from __future__ import annotations

import pytest
import torch
from attack_kit import SHAPE, norms, train_digits_mlp
from pydantic import ValidationError
from torch import Tensor, nn

from pagctl.attacks.deepfool import DeepFool, candidate_classes, deepfool
from pagctl.protocols import BuildContext, declared_budget

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _ctx() -> BuildContext:
    return BuildContext(num_classes=10, input_shape=SHAPE, device=CPU, seed=0)


def _pred(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        pred: Tensor = model(x).argmax(1)
    return pred


def _linear(w: Tensor, b: float) -> nn.Module:
    """Two classes on (1, 8, 8) inputs: logits (0, w·x + b)."""
    layer = nn.Linear(64, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.weight[1] = w
        layer.bias[1] = b
    return nn.Sequential(nn.Flatten(), layer).eval()


def test_candidate_classes_put_the_label_first() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 6.0, -1.0]])
    labels = torch.tensor([2, 0])
    assert candidate_classes(logits, labels, 3).tolist() == [[2, 1, 3], [0, 2, 1]]
    assert candidate_classes(logits, labels, None).tolist() == [[2, 1, 3, 0], [0, 2, 1, 3]]
    assert candidate_classes(logits, labels, 50).shape == (2, 4)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_linear_boundary_is_reached_in_one_step(norm: str) -> None:
    """On a linear model the first step lands on the boundary (plus 1e-4, times the
    overshoot): the distance is |f| / ‖w‖ in the dual norm, along w (L2) or sign(w) (L∞)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g)
    x = 0.5 + 0.01 * torch.rand((6, *SHAPE), generator=g)
    model = _linear(w, -float(w @ x[0].flatten()) - 0.5)  # class 0 at x, margins near 0.5
    y = torch.zeros(6, dtype=torch.int64)
    f = (x.flatten(1) @ w) - float(w @ x[0].flatten()) - 0.5
    assert bool((f < 0).all())
    adv = deepfool(model, x, y, norm=norm, overshoot=0.02)  # type: ignore[arg-type]
    dual = w.norm() if norm == "l2" else w.abs().sum()
    expected = 1.02 * (f.abs() / (dual + 1e-8) + 1e-4)
    torch.testing.assert_close(norms(adv - x, norm), expected, rtol=1e-4, atol=0)
    direction = w / w.norm() if norm == "l2" else w.sign()
    torch.testing.assert_close((adv - x).flatten(1), expected[:, None] * direction,
                               rtol=1e-4, atol=1e-7)
    assert bool((_pred(model, adv) == 1).all())


def test_the_budget_keeps_or_drops_the_point_found() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, generator=g)
    x = 0.5 + 0.01 * torch.rand((4, *SHAPE), generator=g)
    model = _linear(w, -float(w @ x[0].flatten()) - 0.5)
    y = torch.zeros(4, dtype=torch.int64)
    found = norms(deepfool(model, x, y) - x, "l2")
    eps = float(found.median())
    adv = DeepFool(DeepFool.Params(eps=eps), _ctx())(model, x, y)
    inside = found <= eps
    assert 0 < int(inside.sum()) < 4
    assert bool((_pred(model, adv[inside]) == 1).all())
    assert torch.equal(adv[~inside], x[~inside])


def test_misclassified_inputs_and_bad_arguments() -> None:
    model = _linear(torch.ones(64), -40.0)
    x = torch.full((3, *SHAPE), 0.5)  # w·x + b = -8: class 0
    y = torch.tensor([0, 1, 0])
    adv = deepfool(model, x, y)
    assert torch.equal(adv[1], x[1]) and bool((_pred(model, adv[[0, 2]]) == 1).all())
    for bad in ({"eps": -1.0}, {"steps": 0}, {"overshoot": -0.1}, {"candidates": 1},
                {"norm": "l1"}):
        with pytest.raises(ValueError):
            deepfool(model, x, y, **bad)  # type: ignore[arg-type]


def test_params_defaults_validation_and_budget() -> None:
    p = DeepFool.Params()
    assert (p.eps, p.norm, p.steps, p.overshoot, p.candidates) == (0.5, "l2", 50, 0.02, 10)
    assert DeepFool.Params(norm="Linf", candidates=None).norm == "linf"
    for bad in ({"candidates": 1}, {"steps": 0}, {"overshoot": -1}, {"norm": "l1"}):
        with pytest.raises(ValidationError):
            DeepFool.Params.model_validate(bad)
    params = DeepFool.Params(eps="8/255", norm="linf")
    attack = DeepFool(params, _ctx())
    assert declared_budget(attack, params) == ("linf", 8 / 255)


# ------------------------------------------------------ trained model: foolbox parity


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, Tensor, Tensor]:
    pytest.importorskip("sklearn.datasets")
    return train_digits_mlp(300)


@pytest.mark.parametrize("candidates", [10, 3])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_matches_foolbox(digits_model: tuple[nn.Module, Tensor, Tensor], norm: str,
                         candidates: int) -> None:
    """foolbox's DeepFool (logits loss, 50 steps, overshoot 0.02) on the digits MLP, 300
    points: on every point the model classifies correctly, the same point to float
    rounding (measured: 6e-8 in L2, 0 in L∞; foolbox breaks all of them), and at a budget
    pagctl keeps exactly foolbox's points within it."""
    fb = pytest.importorskip("foolbox")
    model, x, y = digits_model
    reference = fb.attacks.L2DeepFoolAttack if norm == "l2" else fb.attacks.LinfDeepFoolAttack
    theirs = reference(steps=50, candidates=candidates, overshoot=0.02).run(
        fb.PyTorchModel(model, bounds=(0, 1)), x, y)
    ours = deepfool(model, x, y, norm=norm, candidates=candidates)  # type: ignore[arg-type]
    correct = _pred(model, x) == y
    assert float(correct.float().mean()) > 0.9
    assert bool((_pred(model, theirs[correct]) != y[correct]).all())
    torch.testing.assert_close(ours[correct], theirs[correct], rtol=0, atol=1e-6)
    assert torch.equal(ours[~correct], x[~correct])

    sizes = norms(theirs - x, norm)
    ranked = sizes[correct].sort().values
    middle = len(ranked) // 2
    eps = float(ranked[middle - 1:middle + 1].mean())  # between two points' norms
    budgeted = DeepFool(DeepFool.Params(eps=eps, norm=norm, candidates=candidates),
                        _ctx())(model, x, y)
    inside = correct & (sizes <= eps)
    torch.testing.assert_close(budgeted[inside], theirs[inside], rtol=0, atol=1e-6)
    assert torch.equal(budgeted[~inside], x[~inside])
