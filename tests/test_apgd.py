"""Auto-PGD: parameters, losses, schedule, analytic case, strength, reference parity, runs
together. The contract and behaviour every attack shares: test_attack_suite.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from attack_kit import (
    SHAPE,
    accuracy,
    assert_grouping_does_not_matter,
    norms,
    train_digits_mlp,
)
from pydantic import ValidationError
from torch import Tensor, nn

from pagctl.attacks.apgd import (
    APGDCE,
    APGDDLR,
    APGDT,
    apgd,
    checkpoint_lengths,
    dlr_loss,
    large_eps_phases,
    targeted_dlr_loss,
)
from pagctl.attacks.pgd import PGDL2, PGDLinf
from pagctl.attacks.steps import group_size
from pagctl.protocols import Attack, BuildContext

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
CLASSES: dict[str, type[APGDCE] | type[APGDDLR] | type[APGDT]] = {
    "apgd_ce": APGDCE, "apgd_dlr": APGDDLR, "apgd_t": APGDT,
}
EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 2.0}


def _ctx(seed: int = 0, shape: tuple[int, int, int] = SHAPE, classes: int = 10) -> BuildContext:
    return BuildContext(num_classes=classes, input_shape=shape, device=CPU, seed=seed)


def _build(name: str, ctx: BuildContext, **params: object) -> Attack:
    cls = CLASSES[name]
    attack: Attack = cls(cls.Params.model_validate(params), ctx)  # type: ignore[arg-type]
    return attack


# ------------------------------------------------------------------ params and building


def test_params_defaults_and_validation() -> None:
    p = APGDCE.Params()
    assert p.eps == pytest.approx(8 / 255)
    assert (p.norm, p.steps, p.restarts, p.seed, p.rho) == ("linf", 100, 1, None, 0.75)
    assert APGDT.Params().n_target_classes == 9
    assert APGDDLR.Params.model_validate({"eps": "2/255"}).eps == pytest.approx(2 / 255)
    for cls in (APGDCE, APGDDLR, APGDT):
        for bad in ({"eps": -0.1}, {"steps": 0}, {"restarts": 0}, {"norm": "l0"},
                    {"large_eps": True}, {"large_eps": True, "norm": "l2"},
                    {"eps": "1/0"}, {"eps": float("nan")}, {"rho": 0}, {"rho": 1.5},
                    {"unknown": 1}):
            with pytest.raises(ValidationError):
                cls.Params.model_validate(bad)
    with pytest.raises(ValidationError):
        APGDT.Params(n_target_classes=0)
    with pytest.raises(ValidationError):
        APGDCE.Params.model_validate({"n_target_classes": 3})
    l1 = APGDCE.Params.model_validate({"norm": "L1", "large_eps": True})
    assert (l1.norm, l1.large_eps) == ("l1", True)
    with pytest.raises(ValidationError, match="large_eps needs norm 'l1'"):
        APGDCE.Params.model_validate({"norm": "linf", "large_eps": True})


def test_large_eps_schedule_follows_the_reference() -> None:
    """3ε, 2ε, ε over ⌈0.3 N⌉, ⌈0.3 N⌉ and the rest, always ending at ε."""
    assert large_eps_phases(1.0, 100) == [(3.0, 30), (2.0, 30), (1.0, 40)]
    assert large_eps_phases(0.5, 10) == [(1.5, 3), (1.0, 3), (0.5, 4)]
    assert large_eps_phases(1.0, 3) == [(3.0, 1), (2.0, 1), (1.0, 1)]
    assert large_eps_phases(1.0, 2) == [(1.0, 2)]  # no room for the larger balls
    for steps in range(1, 60):
        phases = large_eps_phases(2.0, steps)
        assert sum(n for _, n in phases) == steps and phases[-1][0] == 2.0
        assert all(n >= 1 for _, n in phases)


def test_l1_steps_are_sparse() -> None:
    """One L1 step from the clean input moves only the coordinates of largest gradient: a
    1-step run with no random start noise is impossible to isolate, so check the start and
    the first step's support on a linear model, where the gradient is the weight row."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.full((4, 1, 8, 8), 0.5)
    with torch.no_grad():
        y = lin(x).argmax(1)
    adv = apgd(lin, x, y, loss="ce", norm="l1", eps=0.5, steps=1, restarts=1, rho=0.75,
               generator=torch.Generator().manual_seed(0))
    changed = (adv - x).flatten(1).ne(0).sum(1)
    # The Gaussian start projected on the L1 ball keeps few coordinates (soft threshold);
    # the step adds at most 20% of the 64; far from the dense 64 an L2-style step moves.
    assert bool((changed <= 40).all()), changed
    assert bool((norms(adv - x, "l1") <= 0.5 + 1e-6).all())


def test_class_count_requirements() -> None:
    with pytest.raises(ValueError, match="apgd_t needs at least 4 classes"):
        APGDT(APGDT.Params(), _ctx(classes=3))
    with pytest.raises(ValueError, match="apgd_dlr needs at least 3 classes"):
        APGDDLR(APGDDLR.Params(), _ctx(classes=2))
    APGDT(APGDT.Params(), _ctx(classes=4))
    APGDCE(APGDCE.Params(), _ctx(classes=2))


# ------------------------------------------------------------------- losses and schedule


def test_dlr_losses_by_hand_and_invariance() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -2.0]])
    labels = torch.tensor([0, 0])
    # Row 0: −(3 − 1)/(3 − 0); row 1: −(0 − 2)/(2 − 0).
    assert torch.allclose(dlr_loss(logits, labels), torch.tensor([-2 / 3, 1.0]))
    targets = torch.tensor([3, 2])
    # Row 0: −(3 − (−1))/(3 − (0 − 1)/2); row 1: −(0 − 1)/(2 − (0 − 2)/2).
    expected = torch.tensor([-4 / 3.5, 1 / 3])
    assert torch.allclose(targeted_dlr_loss(targets)(logits, labels), expected)
    moved = 2.5 * logits + 7.0  # DLR ignores shifting and positive scaling of the logits
    assert torch.allclose(dlr_loss(moved, labels), dlr_loss(logits, labels))
    assert torch.allclose(targeted_dlr_loss(targets)(moved, labels), expected)


def test_checkpoints_follow_the_paper() -> None:
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 for 100 steps.
    assert checkpoint_lengths(100) == [22, 19, 16, 13, 10, 7, 6, 6]
    assert checkpoint_lengths(1) == [1]
    assert sum(checkpoint_lengths(37)) <= 37


# --------------------------------------------------------------- analytic: linear model


def _linear_four_class() -> tuple[nn.Module, Tensor, Tensor]:
    """Logits (w·x + 0.5, 0, −1, −2) with ‖w‖₂ = 2.5, ‖w‖₁ = 4.5: at x = 0.5 class 0 wins by
    0.75 over class 1, i.e. L2 distance 0.3, L∞ distance 1/6 and L1 distance 0.375 (‖w‖∞ = 2)
    to the boundary."""
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0] = torch.tensor([1.0, -2.0, 0.5, 1.0])
        lin.bias.copy_(torch.tensor([0.5, 0.0, -1.0, -2.0]))
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = torch.full((3, 1, 2, 2), 0.5)
    x[1, 0, 0, 0] += 0.04  # slightly different points at (almost) the same margin
    x[2, 0, 1, 1] -= 0.04
    return model, x, torch.zeros(3, dtype=torch.int64)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.25), ("l2", 0.5), ("l1", 1.0)])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_points_closer_than_eps_to_the_boundary_are_flipped(
    name: str, norm: str, eps: float,
) -> None:
    model, x, y = _linear_four_class()
    assert bool((model(x).argmax(1) == y).all())
    attack = _build(name, _ctx(shape=(1, 2, 2), classes=4), eps=eps, norm=norm, steps=10)
    adv = attack(model, x, y)
    assert bool((model(adv).argmax(1) != y).all())
    assert bool((norms(adv - x, norm) <= eps).all())


# ------------------------------------------------------------------------ trained model


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, Tensor, Tensor]:
    """The shared digits MLP; 200 test points."""
    pytest.importorskip("sklearn.datasets")
    return train_digits_mlp(200)


# Budgets that leave the digits MLP mid-range robust accuracy (0.45–0.65).
BUDGETS = {"linf": 0.07, "l2": 0.5}


def _pgd(norm: str, eps: float, steps: int) -> Attack:
    if norm == "l2":
        return PGDL2(PGDL2.Params(eps=eps, steps=steps, seed=0), _ctx())
    return PGDLinf(PGDLinf.Params(eps=eps, steps=steps, seed=0), _ctx())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_at_least_as_strong_as_pgd(
    digits_model: tuple[nn.Module, Tensor, Tensor], norm: str,
) -> None:
    """Same ε and 100 steps. This MLP is easy for PGD (its robust accuracy settles within
    5–20 steps), so the margins are small. Measured (seeds 0 and 1): APGD-T 0.5–2.5 pp below
    PGD, APGD-CE 2 pp below to 0.5 pp above it, APGD-DLR 0.5 pp below to 2 pp above it (DLR
    is the weaker loss on this model; the reference implementation measures the same)."""
    model, x, y = digits_model
    eps = BUDGETS[norm]
    pgd100 = accuracy(model, _pgd(norm, eps, 100)(model, x, y), y)
    robust = {name: accuracy(model, _build(name, _ctx(), eps=eps, norm=norm, seed=0)(model, x, y),
                              y) for name in CLASSES}
    assert 0.3 < pgd100 < 0.9, pgd100
    assert robust["apgd_t"] <= pgd100, (robust, pgd100)
    assert robust["apgd_ce"] <= pgd100 + 0.01 + 1e-9, (robust, pgd100)
    assert robust["apgd_dlr"] <= pgd100 + 0.025, (robust, pgd100)


def _reference_robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, loss: str, norm: str,
                               eps: float, seed: int) -> float:
    autopgd = pytest.importorskip("pyautoattack.autopgd_base")  # pip package pyautoattack
    ref_norm = "L2" if norm == "l2" else "Linf"
    state = torch.get_rng_state()  # the reference seeds the global RNG
    if loss == "dlr-targeted":
        attack = autopgd.APGDAttack_targeted(model, n_iter=100, norm=ref_norm, eps=eps,
                                             seed=seed, n_target_classes=9, device="cpu")
    else:
        attack = autopgd.APGDAttack(model, n_iter=100, norm=ref_norm, eps=eps, seed=seed,
                                    loss=loss, device="cpu")
    robust = accuracy(model, attack.perturb(x, y), y)
    torch.set_rng_state(state)
    return robust


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr", "dlr-targeted"])
def test_apgd_matches_the_reference_implementation(
    digits_model: tuple[nn.Module, Tensor, Tensor], loss: str, norm: str,
) -> None:
    """fra31/auto-attack's APGD (package pyautoattack), 100 steps, one restart, on 200
    points: robust accuracies within ±2 pp. The seeds differ (1 here, 0 there) so that the
    random starts are independent draws and the loops, not the streams, are compared."""
    model, x, y = digits_model
    eps = BUDGETS[norm]
    theirs = _reference_robust_accuracy(model, x, y, loss=loss, norm=norm, eps=eps, seed=0)
    ours_adv = apgd(model, x, y, loss=loss, norm=norm, eps=eps, steps=100,  # type: ignore[arg-type]
                    restarts=1, rho=0.75, generator=torch.Generator().manual_seed(1))
    ours = accuracy(model, ours_adv, y)
    assert 0.3 <= theirs <= 0.8, theirs  # mid-range: the comparison means something
    assert math.isclose(ours, theirs, abs_tol=0.02 + 1e-9), (ours, theirs)


@pytest.mark.parametrize(("loss", "large"), [("ce", False), ("ce", True), ("dlr", False),
                                             ("dlr", True), ("dlr-targeted", True)])
def test_apgd_l1_matches_the_reference_implementation(
    digits_model: tuple[nn.Module, Tensor, Tensor], loss: str, large: bool,
) -> None:
    """fra31/auto-attack's L1 APGD (package pyautoattack; the sparse step, the adaptive
    sparsity and, with ``use_largereps``, the 3ε → 2ε → ε schedule), 100 steps, L1 ε = 1 on
    200 points: the mean robust accuracy over three independent seeds per side within
    ±1.5 pp. Measured: ce 0.665 vs 0.668 (0.680 vs 0.695 with the schedule), dlr 0.682 vs
    0.682 (0.672 vs 0.680), dlr-targeted with the schedule 0.640 vs 0.640."""
    autopgd = pytest.importorskip("pyautoattack.autopgd_base")
    model, x, y = digits_model
    theirs, ours = [], []
    for seed in range(3):
        state = torch.get_rng_state()  # the reference seeds the global RNG
        if loss == "dlr-targeted":
            ref = autopgd.APGDAttack_targeted(model, n_iter=100, norm="L1", eps=1.0, seed=seed,
                                              n_target_classes=9, device="cpu",
                                              use_largereps=large)
        else:
            ref = autopgd.APGDAttack(model, n_iter=100, norm="L1", eps=1.0, seed=seed,
                                     loss=loss, device="cpu", use_largereps=large)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its zero-gradient notice on DLR
            theirs.append(accuracy(model, ref.perturb(x, y), y))
        torch.set_rng_state(state)
        adv = apgd(model, x, y, loss=loss, norm="l1", eps=1.0, steps=100,  # type: ignore[arg-type]
                   restarts=1, rho=0.75, generator=torch.Generator().manual_seed(seed + 10),
                   large_eps=large)
        assert bool((norms(adv - x, "l1") <= 1.0).all())
        ours.append(accuracy(model, adv, y))
    mean_theirs, mean_ours = sum(theirs) / 3, sum(ours) / 3
    assert 0.3 <= mean_theirs <= 0.8, theirs
    assert math.isclose(mean_ours, mean_theirs, abs_tol=0.015 + 1e-9), (ours, theirs)


@pytest.mark.parametrize(("norm", "eps", "large"), [("linf", 0.07, False), ("l2", 0.5, False),
                                                    ("l1", 1.0, True)])
@pytest.mark.parametrize(("loss", "restarts"), [("dlr-targeted", 2), ("ce", 3)])
def test_runs_together_do_not_change_the_result(
    digits_model: tuple[nn.Module, Tensor, Tensor], norm: str, eps: float, large: bool,
    loss: str, restarts: int,
) -> None:
    """The target × restart runs stacked along the batch in any grouping: the same result
    (`attack_kit.assert_grouping_does_not_matter`)."""
    model, x, y = digits_model
    x, y = x[:60], y[:60]
    assert_grouping_does_not_matter(
        lambda together, generator: apgd(
            model, x, y, loss=loss, norm=norm, eps=eps, steps=20,  # type: ignore[arg-type]
            restarts=restarts, rho=0.75, generator=generator, n_target_classes=3,
            large_eps=large, runs_together=together), model, y)


def test_runs_together_default_depends_on_the_device() -> None:
    """All runs at once on a CUDA device, one at a time on the CPU; an explicit number wins;
    a negative one is refused."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert group_size(None, 9, cuda) == 9 and group_size(None, 9, cpu) == 1
    assert group_size(0, 9, cpu) == 9 and group_size(3, 9, cuda) == 3
    with pytest.raises(ValueError, match="runs_together"):
        group_size(-1, 9, cpu)
