"""Sparse-RS in L0: what the algorithm promises, checked as invariants (no installed library
has Sparse-RS to compare with: torchattacks, ART and foolbox lack it).

The contract, seeding, edge cases and breaking the digits MLP in general are
test_attack_suite.py's; here: at most k pixels change, each to a corner of the colour box,
the kept loss never decreases, the query budget and the schedule of α hold, a seed fixes the
points, and k = 4 of 64 pixels breaks nearly every point of the undefended digits MLP.
"""

from __future__ import annotations

import pytest
import torch
from attack_kit import train_digits_mlp
from torch import Tensor, nn

from pagctl import registry
from pagctl.attacks.sparse_rs import SparseRS, alpha_schedule, sparse_rs
from pagctl.errors import SpecError
from pagctl.protocols import BuildContext, declared_budget

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _colour_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10)).eval()


def _colour_inputs(model: nn.Module, n: int = 16) -> tuple[Tensor, Tensor]:
    """Random 3-channel 6×6 images, labelled with the model's predictions."""
    x = torch.rand((n, 3, 6, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, model(x).argmax(1)


def _changed_pixels(adv: Tensor, x: Tensor) -> Tensor:
    """(N, H, W) bool: any channel differs."""
    return (adv != x).any(dim=1)


def _run(k: int, seed: int = 0, **kwargs: object) -> tuple[Tensor, Tensor, Tensor]:
    model = _colour_model()
    x, y = _colour_inputs(model)
    adv = sparse_rs(model, x, y, k=k, generator=torch.Generator().manual_seed(seed),
                    **kwargs)  # type: ignore[arg-type]
    return x, y, adv


class _Recording(nn.Module):
    """The model, keeping a copy of every input it is queried with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        out: Tensor = self.model(x)
        return out


def _corners_only(points: Tensor, x: Tensor) -> bool:
    """Every channel of every pixel where ``points`` differ from ``x`` is 0 or 1."""
    values = points.permute(0, 2, 3, 1)[_changed_pixels(points, x)]
    return bool(((values == 0) | (values == 1)).all())


@pytest.mark.parametrize("k", [1, 3, 10])
def test_at_most_k_pixels_change_each_to_a_box_corner(k: int) -> None:
    """In every query, not only the returned points (whose fit into the budget would hide
    a query over it), and the returned points are queries."""
    model = _Recording(_colour_model())
    x, y = _colour_inputs(model.model)
    adv = sparse_rs(model, x, y, k=k, queries=60, generator=torch.Generator().manual_seed(0))
    changed = _changed_pixels(adv, x)
    assert int(changed.flatten(1).sum(1).max()) <= k
    assert bool(changed.any()) and _corners_only(adv, x)
    unchanged = ~changed[:, None].expand_as(x)
    assert torch.equal(adv[unchanged], x[unchanged])
    queries = torch.cat(model.seen[1:])  # after the clean pass
    # Each query's nearest clean input (the one it perturbs) differs in at most k pixels.
    pixels = (queries[:, None] != x[None]).any(dim=2).flatten(2).sum(2)  # (queries, N)
    nearest = pixels.argmin(dim=1)
    assert int(pixels.min(dim=1).values.max()) <= k
    assert _corners_only(queries, x[nearest])
    for i in range(len(x)):
        if bool(changed[i].any()):
            assert bool((queries == adv[i]).flatten(1).all(1).any()), i


def test_every_pixel_perturbed_recolours_instead() -> None:
    """With k = H·W there is no pixel outside the set: the run recolours, still corners."""
    x, y, adv = _run(36, queries=30)
    corners = adv.permute(0, 2, 3, 1)[_changed_pixels(adv, x)]
    assert bool(((corners == 0) | (corners == 1)).all())
    assert torch.equal(_run(36, queries=30)[2], adv)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, Tensor, Tensor]:
    """attack_kit's undefended digits MLP and 100 held-out points."""
    pytest.importorskip("sklearn.datasets")
    return train_digits_mlp(100)


def test_the_kept_loss_never_decreases_and_rises_somewhere(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, y = digits
    trace: list[Tensor] = []
    sparse_rs(model, x, y, k=1, queries=80, generator=torch.Generator().manual_seed(0),
              trace=trace)
    assert len(trace) == 80  # the initial point and 79 candidates, one forward each
    steps = torch.stack(trace)  # (queries, N)
    assert bool((steps.diff(dim=0) >= 0).all())
    assert bool((steps[-1] > steps[0]).any())


def test_queries_per_example_and_early_stop(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    counts = torch.zeros(len(y), dtype=torch.int64)
    adv = sparse_rs(model, x, y, k=1, queries=40, restarts=2, counts=counts,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fooled = (model(adv).argmax(1) != y) & correct
    assert bool(fooled.any()) and not bool(fooled[correct].all())
    assert bool((counts[~correct] == 1).all())  # misclassified clean: the clean pass only
    assert int(counts[fooled].max()) < 1 + 2 * 40  # a fooled point stopped being queried
    robust = correct & ~fooled
    assert bool((counts[robust] == 1 + 2 * 40).all())  # a robust one spent every query


def test_a_seed_fixes_the_points() -> None:
    first, again, other = _run(3, 7, queries=30)[2], _run(3, 7, queries=30)[2], _run(
        3, 8, queries=30)[2]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_the_schedule_of_alpha() -> None:
    """The reference's L0 schedule: halved from the first iteration, down to p_init/20,
    breakpoints on the 10,000-query scale."""
    at = [1, 50, 51, 200, 201, 500, 501, 1000, 1001, 2001, 4001, 6001, 8000, 8001, 9999]
    factors = [2, 2, 4, 4, 5, 5, 6, 6, 8, 10, 12, 15, 15, 20, 20]
    assert [round(0.3 / alpha_schedule(0.3, i, 10000)) for i in at] == factors
    assert alpha_schedule(0.3, 100, 1000) == pytest.approx(0.3 / 6)  # 100 of 1,000 = 1,000
    assert alpha_schedule(0.3, 1, 20000) == 0.3  # iteration 0.5 of 10,000: not yet halved


def test_params_declare_an_l0_budget_of_whole_pixels() -> None:
    factory = registry.attacks.get("sparse_rs")
    assert factory is SparseRS
    params = SparseRS.Params.model_validate({"eps": 5})
    ctx = BuildContext(num_classes=10, input_shape=(3, 6, 6), device=CPU, seed=0)
    assert declared_budget(SparseRS(params, ctx), params) == ("l0", 5.0)
    defaults = SparseRS.Params()
    assert (defaults.queries, defaults.p_init, defaults.restarts) == (10000, 0.3, 1)
    for bad in ({"eps": 2.5}, {"eps": -1}, {"norm": "linf"}, {"p_init": 0}):
        with pytest.raises(SpecError):
            registry.attacks.validate_params("sparse_rs", bad, "--param")


def test_four_pixels_break_an_undefended_digits_model(
    digits: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, y = digits
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    adv = sparse_rs(model, x, y, k=4, queries=200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        robust = (model(adv).argmax(1) == y) & correct
    assert float(correct.float().mean()) > 0.9
    assert float(robust.float().mean()) < 0.1
    assert int(_changed_pixels(adv, x).flatten(1).sum(1).max()) <= 4
