"""PGD-L1 with SLIDE's sparse steps: the quantile and the step direction by hand, the
budget and the box, and parity with foolbox's SparseL1DescentAttack. The contract and
behaviour every attack shares: test_attack_suite.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from attack_kit import SHAPE, accuracy, norms, train_digits_mlp
from pydantic import ValidationError
from torch import Tensor, nn

from pagctl.attacks.pgd_l1 import PGDL1, pgd_l1, row_quantile, sparse_l1_direction
from pagctl.protocols import BuildContext, declared_budget

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _ctx() -> BuildContext:
    return BuildContext(num_classes=10, input_shape=SHAPE, device=CPU, seed=0)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99, 0.999, 1.0])
def test_row_quantile_is_numpys(q: float) -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.rand((5, 64), generator=g)
    values[0, :40] = 0.0  # ties, as a masked gradient has
    values[1] = values[1].round(decimals=1)
    expected = np.quantile(values.numpy(), q, axis=-1)
    assert torch.equal(row_quantile(values, q), torch.from_numpy(expected))


def test_sparse_direction_by_hand() -> None:
    x = torch.tensor([[0.0, 1.0, 0.5, 0.5, 0.2, 0.0]])
    grad = torch.tensor([[-9.0, 8.0, 3.0, -2.0, 0.5, 1.0]])
    # The first two push out of the box and are dropped; the top third of the rest moves.
    e = sparse_l1_direction(grad, x, 2 / 3)
    assert e.tolist() == [[0.0, 0.0, 0.5, -0.5, 0.0, 0.0]]
    assert sparse_l1_direction(grad, x, 1.0).tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]
    assert torch.equal(sparse_l1_direction(torch.zeros(2, 6), x.expand(2, 6), 0.99),
                       torch.zeros(2, 6))


def test_params_defaults_validation_and_budget() -> None:
    p = PGDL1.Params()
    assert (p.eps, p.steps, p.step_size, p.quantile, p.keep) == (
        12.0, 10, None, 0.99, "first_fooled")
    for bad in ({"quantile": 1.5}, {"steps": 0}, {"step_size": 0}, {"eps": -1}):
        with pytest.raises(ValidationError):
            PGDL1.Params.model_validate(bad)
    attack = PGDL1(PGDL1.Params(eps=2.0, steps=10), _ctx())
    assert declared_budget(attack, attack.params) == ("l1", 2.0)
    assert attack.step_size == 0.5


# ------------------------------------------------------ trained model: foolbox parity


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, Tensor, Tensor]:
    pytest.importorskip("sklearn.datasets")
    return train_digits_mlp(300)


def _foolbox_slide(exact_l1_projection: bool, **options: Any) -> Any:
    """foolbox's SparseL1DescentAttack, or the same with its L1-ball projection replaced by
    Duchi et al.'s, written out (foolbox's own takes the first index where the sorted
    criterion fails for the last where it holds, so its threshold is too small and its
    points can leave the ball)."""
    fb = pytest.importorskip("foolbox")
    ep = pytest.importorskip("eagerpy")

    class Exact(fb.attacks.SparseL1DescentAttack):  # type: ignore[misc]
        def project(self, x: Any, x0: Any, epsilon: float) -> Any:
            d = (x - x0).raw.flatten(1)
            mu = d.abs().sort(dim=1, descending=True).values
            cums = mu.cumsum(1)
            j = torch.arange(1, d.shape[1] + 1, dtype=d.dtype)
            rho = ((mu - (cums - epsilon) / j) > 0).sum(1) - 1
            theta = ((cums.gather(1, rho[:, None]).squeeze(1) - epsilon) / (rho + 1))
            d = d.sign() * (d.abs() - theta.clamp_min(0)[:, None]).clamp_min(0)
            return ep.astensor(x0.raw + d.reshape(x0.raw.shape))

    return (Exact if exact_l1_projection else fb.attacks.SparseL1DescentAttack)(**options)


@pytest.mark.parametrize("quantile", [0.99, 0.9, 0.5])
def test_matches_foolbox_where_the_box_does_not_bind(
    digits_model: tuple[nn.Module, Tensor, Tensor], quantile: float,
) -> None:
    """Digits squeezed into [0.25, 0.75] and ε = 0.2: no step reaches the box. For 3 steps
    of ε/4 the ball does not bind either, and the points are foolbox's own; over 10 steps
    it does, and they are foolbox's with an exact L1-ball projection (measured: within 1e-7).
    foolbox's own projection leaves the ball there (measured: L1 norms up to 0.25)."""
    fb = pytest.importorskip("foolbox")
    model, x, y = digits_model
    x = 0.25 + 0.5 * x
    eps = 0.2
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    for steps, exact in ((3, False), (10, True)):
        theirs = _foolbox_slide(exact, quantile=quantile, rel_stepsize=0.25, steps=steps).run(
            fmodel, x, y, epsilon=eps)
        ours = pgd_l1(model, x, y, eps=eps, steps=steps, step_size=eps / 4,
                      quantile=quantile, keep="last")
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert bool((norms(ours - x, "l1") <= eps).all())
    # The attack did something, not everything (measured: 0.32 to 0.37 from 0.47 clean).
    assert 0.1 < accuracy(model, ours, y) < accuracy(model, x, y) - 0.05
    theirs = _foolbox_slide(False, quantile=0.99, rel_stepsize=0.25, steps=10).run(
        fmodel, x, y, epsilon=eps)
    assert float(norms(theirs - x, "l1").max()) > eps * 1.1


def test_on_the_box_faces_budget_box_and_loss(
    digits_model: tuple[nn.Module, Tensor, Tensor],
) -> None:
    """On the digits themselves (most pixels 0, where the box binds): every point in the
    L1 ball and the box, the loss of the last iterate above the clean loss for every point,
    and the first misclassified iterate breaks as many points as the last."""
    model, x, y = digits_model
    eps = 2.0
    last = pgd_l1(model, x, y, eps=eps, steps=10, keep="last")
    first = PGDL1(PGDL1.Params(eps=eps, steps=10), _ctx())(model, x, y)
    for adv in (last, first):
        assert bool((norms(adv - x, "l1") <= eps).all())
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(last), y, reduction="none")
        clean = nn.functional.cross_entropy(model(x), y, reduction="none")
    assert bool((loss > clean).all())
    assert accuracy(model, first, y) <= accuracy(model, last, y)
    assert accuracy(model, first, y) < 0.5 * accuracy(model, x, y)
