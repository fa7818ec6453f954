"""Tests of the ``noise`` attack: the pagctl conformance and behaviour checks (the kit
pagctl runs on its own attacks), the geometry of the noise, its effect on a model that any
noise of this size breaks, the query budget, and discovery through the entry point."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch
from pagctl_example_attack import NoiseAttack
from torch import Tensor, nn

from pagctl.testing import (
    check_attack,
    check_attack_breaks,
    check_attack_edge_cases,
    check_attack_in_train_mode,
    check_attack_seeding,
    small_context,
)

pytestmark = pytest.mark.plugins


def build(**params: object) -> NoiseAttack:
    return NoiseAttack(NoiseAttack.Params.model_validate(params), small_context())


class Deviation(nn.Module):
    """Predicts class 1 when the input's deviation from 0.5 (in ``norm``) exceeds
    ``threshold``, else class 0. Counts its forward passes and the rows they saw."""

    def __init__(self, norm: str, threshold: float) -> None:
        super().__init__()
        self.norm, self.threshold = norm, threshold
        self.calls = 0
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        d = (x - 0.5).flatten(1)
        size = d.abs().amax(dim=1) if self.norm == "linf" else d.norm(dim=1)
        one = (size > self.threshold).float()
        return torch.stack([1 - one, one], dim=1)


class Constant(nn.Module):
    """Always predicts class 0; counts forward passes and rows."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        logits = torch.zeros(x.shape[0], 2, dtype=x.dtype)
        logits[:, 0] = 1.0
        return logits


def half_grey(n: int = 16) -> tuple[Tensor, Tensor]:
    """Images at 0.5 (no clipping for eps <= 0.5 in L-inf) with label 0."""
    return torch.full((n, 1, 8, 8), 0.5), torch.zeros(n, dtype=torch.long)


def test_conforms_with_defaults() -> None:
    check_attack(NoiseAttack)


def test_conforms_l2_sphere() -> None:
    check_attack(NoiseAttack, params={"norm": "l2", "eps": 0.5, "distribution": "sphere"})


def test_conforms_linf_sphere() -> None:
    check_attack(NoiseAttack, params={"norm": "linf", "eps": "8/255", "distribution": "sphere"})


@pytest.mark.parametrize("params", [{}, {"norm": "l2", "eps": 0.5, "distribution": "sphere"}],
                         ids=["defaults", "l2-sphere"])
def test_behaves_as_pagctl_attacks_do(params: dict[str, object]) -> None:
    """The same seed gives the same noise whatever ran before, another seed other noise, the
    seed parameter wins over the run's; an empty batch and eps = 0 give the inputs; a model
    in train mode (float64 here) keeps its flags."""
    check_attack_seeding(NoiseAttack, params=params)
    check_attack_edge_cases(NoiseAttack, params=params)
    x, y = half_grey(6)
    check_attack_in_train_mode(NoiseAttack, params=params, inputs=x.double(), labels=y,
                               model=Deviation("linf", threshold=0.05).double().train())


def test_breaks_what_its_noise_breaks() -> None:
    x, y = half_grey()
    clean, robust = check_attack_breaks(NoiseAttack, params={"eps": 0.1}, inputs=x, labels=y,
                                        model=Deviation("linf", threshold=0.05))
    assert (clean, robust) == (1.0, 0.0)


def test_l2_sphere_has_radius_eps() -> None:
    x, y = half_grey()
    # eps = 0.5 over 64 pixels: no single pixel moves by 0.5, so nothing is clipped.
    out = build(norm="l2", eps=0.5, distribution="sphere", samples=1)(Constant(), x, y)
    norms = (out - x).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 0.5), rtol=1e-5, atol=0)
    assert bool((norms <= 0.5).all())


def test_linf_sphere_moves_every_pixel_by_eps() -> None:
    x, y = half_grey()
    out = build(norm="linf", eps=0.25, distribution="sphere", samples=1)(Constant(), x, y)
    delta = (out - x).abs()
    assert torch.allclose(delta, torch.full_like(delta, 0.25), rtol=1e-6, atol=0)
    signs = (out - x).sign()
    assert 0.3 < float((signs > 0).float().mean()) < 0.7  # both signs occur


def test_uniform_l2_stays_inside_the_ball() -> None:
    x, y = half_grey(64)
    out = build(norm="l2", eps=0.5, samples=1)(Constant(), x, y)
    norms = (out - x).flatten(1).norm(dim=1)
    assert bool((norms <= 0.5).all())
    # Uniform in a 64-dimensional ball: the radius is eps * U^(1/64), mostly near eps.
    assert float(norms.mean()) == pytest.approx(0.5 * 64 / 65, rel=0.02)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("distribution", ["sphere", "uniform"])
def test_breaks_a_model_that_any_noise_of_this_size_breaks(norm: str, distribution: str) -> None:
    """Every sphere draw has size eps > eps/2, and a uniform draw in 64 dimensions is below
    eps/2 with probability 2^-64: the first draw breaks every point."""
    x, y = half_grey()
    model = Deviation(norm, threshold=0.1 / 2)
    out = build(norm=norm, eps=0.1, distribution=distribution, samples=5)(model, x, y)
    assert bool((model(out).argmax(dim=1) == 1).all())
    assert model.calls == 2  # one draw for every point, then our own check


def test_samples_bounds_the_queries() -> None:
    x, y = half_grey(6)
    model = Constant()
    build(samples=7)(model, x, y)
    assert (model.calls, model.rows) == (7, 7 * 6)


def test_misclassified_points_are_not_queried_again() -> None:
    """With threshold 0 every point breaks on the first draw and is not queried again;
    with a threshold above eps none ever breaks and every point is queried each time."""
    x = torch.full((4, 1, 8, 8), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    model = Deviation("linf", threshold=0.0)
    build(eps=0.1, samples=3)(model, x, y)
    assert (model.calls, model.rows) == (1, 4)
    never = Deviation("linf", threshold=1.0)
    build(eps=0.1, samples=3)(never, x, y)
    assert (never.calls, never.rows) == (3, 12)


def test_returns_the_last_draw_when_nothing_breaks() -> None:
    x, y = half_grey(4)
    attack = build(norm="linf", eps=0.2, distribution="sphere", samples=3)
    out = attack(Constant(), x, y)
    assert bool(((out - x).abs() > 0.19).all())  # a real draw, not the clean input


def test_works_under_no_grad_and_leaves_inputs_alone() -> None:
    x, y = half_grey(4)
    x.requires_grad_(True)
    before = x.detach().clone()
    with torch.no_grad():
        out = build(eps=0.1)(Constant(), x, y)
    assert torch.equal(x.detach(), before) and x.grad is None
    assert not out.requires_grad


def test_seed_and_eps_zero() -> None:
    x, y = half_grey(4)
    a = build(seed=1, samples=1)(Constant(), x, y)
    b = build(seed=1, samples=1)(Constant(), x, y)
    c = build(seed=2, samples=1)(Constant(), x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)
    model = Constant()
    assert torch.equal(build(eps=0)(model, x, y), x) and model.calls == 0


def test_params_reject_bad_values() -> None:
    from pydantic import ValidationError

    for bad in ({"eps": -0.1}, {"samples": 0}, {"norm": "l1"}, {"distribution": "gauss"}):
        with pytest.raises(ValidationError):
            NoiseAttack.Params.model_validate(bad)
    assert NoiseAttack.Params.model_validate({"eps": "8/255"}).eps == pytest.approx(8 / 255)


def test_entry_point_is_discoverable() -> None:
    from pagctl import registry

    names = {ep.name for ep in metadata.entry_points(group="pagctl.attacks")}
    if "noise" not in names:
        pytest.skip("pagctl-example-attack is not installed (pip install -e "
                    "plugins/pagctl-example-attack): no 'noise' entry point")
    if registry.autoload_disabled():
        pytest.skip(f"{registry.AUTOLOAD_ENV} is set: entry points are not loaded")

    registry.attacks.refresh()
    try:
        assert registry.attacks.get("noise") is NoiseAttack
    finally:
        registry.attacks.refresh()
