"""Tests of the torchattacks adapters: pagctl's conformance checks on every adapter, parity
with torchattacks called directly, and the contract problems of torchattacks that the
adapters fix (model mode, global RNG, parameter gradients, normalisation, budgets)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from typing import Any

import pytest
import torch
import torchattacks
from pagctl_torchattacks import (
    TaAutoAttack,
    TaCW,
    TaDeepFool,
    TaPGD,
    TaPGDL2,
    TorchattacksAdapter,
    call_seed,
)
from torch import Tensor, nn

from pagctl.testing import (
    check_attack,
    check_attack_edge_cases,
    check_attack_in_train_mode,
    check_attack_seeding,
    small_context,
    small_data,
    small_model,
)

pytestmark = pytest.mark.plugins

ADAPTERS = {
    "ta_pgd": TaPGD,
    "ta_pgdl2": TaPGDL2,
    "ta_cw": TaCW,
    "ta_deepfool": TaDeepFool,
    "ta_autoattack": TaAutoAttack,
}


def build(cls: Any, **params: Any) -> Any:
    return cls(cls.Params.model_validate(params), small_context())


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


@pytest.fixture(scope="module")
def digits() -> Iterator[tuple[nn.Module, Tensor, Tensor]]:
    """A small MLP trained on sklearn's digits (about a second), in eval mode, and 200 test
    images (N, 1, 8, 8) in [0, 1] with their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[:1500]), y[:1500])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    yield model, x[1500:1700], y[1500:1700]


def mixed_model(root_training: bool) -> nn.Module:
    """Flatten-Linear-BatchNorm-ReLU-Dropout-Linear with real BatchNorm statistics, in a
    mixed mode: root training with the BatchNorm in eval, or root eval with the Dropout in
    training. torchattacks restores neither."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                              nn.Dropout(0.2), nn.Linear(32, 10))
        with torch.no_grad():
            model.train()
            model(torch.rand(64, 1, 8, 8))
    if root_training:
        model.train()
        model[2].eval()
    else:
        model.eval()
        model[4].train()
    return model


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


# ---------------------------------------------------------------------------- conformance

FAST: dict[str, list[dict[str, Any]]] = {
    "ta_pgd": [{"steps": 3}, {"steps": 3, "random_start": False, "eps": "4/255"}],
    "ta_pgdl2": [{"steps": 3, "eps": 0.5, "alpha": 0.1}],
    "ta_cw": [{"steps": 10, "eps": 0.5, "c": 1.0}, {"steps": 5, "eps": 1e-3}],
    "ta_deepfool": [{"steps": 5, "eps": 1.0}],
    "ta_autoattack": [{"eps": 0.3}, {"norm": "l2", "eps": 3.0}, {"eps": 0.3, "version": "rand"},
                      {"eps": 0.3, "version": "plus"}],
}


@pytest.mark.parametrize(("name", "params"),
                         [(n, p) for n, ps in FAST.items() for p in ps],
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_conforms(name: str, params: dict[str, Any]) -> None:
    check_attack(ADAPTERS[name], params=params)


# (params, random): whether another seed gives other points (False: no randomness)
BEHAVIOUR: dict[str, tuple[dict[str, Any], bool]] = {
    "ta_pgd": ({"steps": 3}, True),
    "ta_pgdl2": ({"steps": 3, "eps": 0.5, "alpha": 0.1}, True),
    "ta_cw": ({"steps": 10, "eps": 0.5, "c": 1.0}, False),
    "ta_deepfool": ({"steps": 5, "eps": 1.0}, False),
    "ta_autoattack": ({"eps": 0.3}, True),
}


@pytest.mark.parametrize("name", sorted(BEHAVIOUR))
def test_behaves_as_pagctl_attacks_do(name: str) -> None:
    """pagctl's behaviour checks, as on its own attacks: the output is a function of the
    seed (not of the global RNG nor of other instances), an empty batch and eps = 0 give the
    inputs, and a model in train mode keeps every module's flag."""
    params, random = BEHAVIOUR[name]
    check_attack_seeding(ADAPTERS[name], params=params, random=random)
    check_attack_edge_cases(ADAPTERS[name], params=params)
    check_attack_in_train_mode(ADAPTERS[name], params=params)


@pytest.mark.parametrize("name", ["ta_pgd", "ta_pgdl2", "ta_cw", "ta_deepfool"])
def test_defaults_validate_and_build(name: str) -> None:
    attack = build(ADAPTERS[name])
    assert attack.norm in ("linf", "l2") and attack.eps > 0
    assert (ADAPTERS[name].__doc__ or "").startswith("torchattacks.")


@pytest.mark.parametrize("root_training", [True, False])
@pytest.mark.parametrize("name", ["ta_pgd", "ta_cw", "ta_deepfool"])
def test_conforms_on_a_mixed_mode_model(name: str, root_training: bool) -> None:
    fast: dict[str, dict[str, Any]] = {"ta_pgd": {"steps": 3}, "ta_cw": {"steps": 5, "eps": 1.0},
                                       "ta_deepfool": {"steps": 3, "eps": 1.0}}
    params = fast[name]
    model = mixed_model(root_training)
    x, _ = small_data(8)
    check_attack(ADAPTERS[name], params=params, model=model, inputs=x,
                 labels=torch.arange(8) % 10)


def test_autoattack_every_stage_on_a_mixed_mode_model() -> None:
    """A budget too small to break anything: APGD-CE, APGD-T, FAB-T and Square all run
    (about 5000 Square queries). Modes, BatchNorm statistics, gradients and the global RNG
    are left alone."""
    model = mixed_model(root_training=True)
    x, _ = small_data(3)
    with torch.no_grad():
        model.eval()
        y = model(x).argmax(dim=1)  # every point starts correctly classified
    model = mixed_model(root_training=True)
    before_modes, before_state = modes(model), {k: v.clone()
                                                for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = build(TaAutoAttack, eps=1e-4)(model, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert modes(model) == before_modes
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert float((out - x).abs().max()) <= 1e-4


# ------------------------------------------------------------------------------ parity


def test_ta_pgd_matches_torchattacks_pgd(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    seed = 3
    adv = build(TaPGD, eps=0.1, alpha=0.02, steps=10, seed=seed)(model, x, y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=10, random_start=True)(x, y)
    clean, robust = accuracy(model, x, y), accuracy(model, adv, y)
    assert clean > 0.85 and robust < clean - 0.2  # a meaningful comparison
    assert robust == accuracy(model, ref, y)
    assert float((adv - ref).abs().max()) <= 1e-6


def test_ta_pgdl2_matches_torchattacks_pgdl2(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    adv = build(TaPGDL2, eps=1.0, alpha=0.2, steps=10, seed=5)(model, x, y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ref = torchattacks.PGDL2(model, eps=1.0, alpha=0.2, steps=10)(x, y)
    assert accuracy(model, adv, y) == accuracy(model, ref, y) < accuracy(model, x, y)
    assert float((adv - ref).abs().max()) <= 1e-6


def test_successive_calls_differ_and_are_reproducible(
        digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    a, b = build(TaPGD, steps=1, seed=7), build(TaPGD, steps=1, seed=7)
    a1, a2 = a(model, x, y), a(model, x, y)
    b1, b2 = b(model, x, y), b(model, x, y)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    assert call_seed(7, 0) == 7 and len({call_seed(7, k) for k in range(100)}) == 100
    c1 = build(TaPGD, steps=1)(model, x, y)  # seed None: the run's seed (0)
    assert torch.equal(c1, build(TaPGD, steps=1, seed=0)(model, x, y))


# ------------------------------------------------------- torchattacks' contract problems


def test_global_rng_untouched_though_torchattacks_uses_it(
        digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    state = torch.get_rng_state()
    torchattacks.PGD(model, eps=0.1, steps=1)(x, y)
    assert not torch.equal(torch.get_rng_state(), state)  # the problem
    state = torch.get_rng_state()
    build(TaPGD, eps=0.1, steps=1)(model, x, y)
    build(TaAutoAttack, eps=0.3)(model, x[:8], y[:8])  # its stages call manual_seed
    assert torch.equal(torch.get_rng_state(), state)


def test_mode_flags_restored_though_torchattacks_loses_them() -> None:
    x, _ = small_data(4)
    y = torch.arange(4)
    for root_training in (True, False):
        model = mixed_model(root_training)
        before = modes(model)
        torchattacks.PGD(model, steps=1)(x, y)
        assert modes(model) != before  # the problem
        model = mixed_model(root_training)
        build(TaPGD, steps=1)(model, x, y)
        assert modes(model) == before


def test_no_parameter_grads_though_torchattacks_leaves_them() -> None:
    model = small_model()
    x, _ = small_data(4)
    y = torch.arange(4)
    torchattacks.CW(model, steps=2)(x, y)
    assert any(p.grad is not None for p in model.parameters())  # the problem
    model = small_model()
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    for cls, params in ((TaCW, {"steps": 2}), (TaDeepFool, {"steps": 2, "eps": 1.0})):
        build(cls, **params)(model, x, y)
        assert all(p.grad is None for p in model.parameters())
        assert [p.requires_grad for p in model.parameters()][0] is False
        assert all(p.requires_grad for p in list(model.parameters())[1:])


class RobModel(nn.Module):
    """A model whose class name and mean/std make torchattacks normalise the inputs itself,
    although (like every pagctl model) it takes [0, 1] pixels."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.mean = torch.tensor([0.5])
        self.std = torch.tensor([0.25])

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x)
        return out


def test_torchattacks_normalisation_is_off(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    wrapped = RobModel(model)
    plain = build(TaPGD, eps=0.1, steps=3, seed=1)(model, x, y)
    assert torch.equal(build(TaPGD, eps=0.1, steps=3, seed=1)(wrapped, x, y), plain)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        direct = torchattacks.PGD(wrapped, eps=0.1, steps=3)(x, y)
    assert float((direct - plain).abs().max()) > 0.1  # the problem: it left pixel space


def test_works_under_no_grad(digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    with torch.no_grad():
        adv = build(TaPGD, eps=0.1, steps=3, seed=2)(model, x, y)
    assert accuracy(model, adv, y) < accuracy(model, x, y)
    assert not adv.requires_grad


@pytest.mark.parametrize("cls", [TaCW, TaDeepFool])
def test_minimum_norm_attacks_keep_only_points_within_eps(
        cls: Any, digits: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = digits
    x, y = x[:40], y[:40]
    params: dict[str, Any] = {"steps": 30} if cls is TaCW else {"steps": 20}
    loose = build(cls, eps=10.0, **params)(model, x, y)
    norms = (loose - x).flatten(1).norm(dim=1)
    moved = norms > 0
    with torch.no_grad():
        fooled = model(loose).argmax(dim=1) != y
    # CW returns the clean input where it failed; DeepFool its last iterate, which on these
    # images (most pixels at 0, where its linear steps are clipped) often is not adversarial.
    assert bool(fooled.any()) and bool(moved[fooled].all())
    tight_eps = float(norms[moved].min()) * 0.999
    tight = build(cls, eps=tight_eps, **params)(model, x, y)
    tnorms = (tight - x).flatten(1).norm(dim=1)
    assert bool((tnorms <= tight_eps).all())
    assert int((tnorms > 0).sum()) < int(moved.sum())  # points beyond eps became clean
    assert torch.equal(build(cls, eps=1e-6, **params)(model, x, y), x)


def test_tuple_results_and_non_finite_rows_are_handled() -> None:
    """DeepFool returns (images, target labels) in some torchattacks versions; a row with a
    NaN (a zero-norm division inside an attack) falls back to the clean input."""

    class Fake:
        def set_device(self, device: torch.device) -> None:
            pass

        def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            out = (x + 0.01).clamp(0, 1)
            out[0, 0, 0, 0] = float("nan")
            return out, y

    class FakeAdapter(TorchattacksAdapter):
        """torchattacks.Fake: a test double."""

        norm = "l2"

        class Params(TaPGDL2.Params):
            pass

        def make(self, model: nn.Module, seed: int) -> Any:
            return Fake()

    x, _ = small_data(3)
    out = build(FakeAdapter, eps=1.0)(small_model(), x, torch.arange(3))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1:], (x[1:] + 0.01).clamp(0, 1))


def test_empty_batch_and_eps_zero() -> None:
    model = small_model()
    x, _ = small_data(4)
    y = torch.arange(4)
    assert build(TaPGD)(model, x[:0], y[:0]).shape == (0, 1, 8, 8)
    assert torch.equal(build(TaPGD, eps=0)(model, x, y), x)


def test_autoattack_maps_norm_and_classes() -> None:
    attack = TaAutoAttack(TaAutoAttack.Params.model_validate({"norm": "l2", "eps": 0.5}),
                          small_context(classes=7))
    built = attack.make(small_model(classes=7), seed=3)
    assert (built.norm, built.eps, built.n_classes, built.seed) == ("L2", 0.5, 7, 3)
    assert attack.norm == "l2"


def test_params_reject_bad_values() -> None:
    from pydantic import ValidationError

    for cls, bad in ((TaPGD, {"alpha": 0}), (TaPGD, {"eps": -1}), (TaCW, {"c": 0}),
                     (TaAutoAttack, {"norm": "L3"}), (TaAutoAttack, {"version": "fast"}),
                     (TaDeepFool, {"steps": 0}), (TaPGDL2, {"bogus": 1})):
        with pytest.raises(ValidationError):
            cls.Params.model_validate(bad)
    assert TaPGD.Params.model_validate({"eps": "8/255"}).eps == pytest.approx(8 / 255)
    # torchattacks' own spelling of a norm is accepted, in any case
    assert TaAutoAttack.Params.model_validate({"norm": "Linf"}).norm == "linf"
    assert TaAutoAttack.Params.model_validate({"norm": "L2"}).norm == "l2"


# ---------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_entry_point_is_discoverable(name: str) -> None:
    from pagctl import registry

    names = {ep.name for ep in metadata.entry_points(group="pagctl.attacks")}
    if name not in names:
        pytest.skip(f"pagctl-torchattacks is not installed (pip install -e "
                    f"plugins/pagctl-torchattacks): no '{name}' entry point")
    if registry.autoload_disabled():
        pytest.skip(f"{registry.AUTOLOAD_ENV} is set: entry points are not loaded")
    registry.attacks.refresh()
    try:
        assert registry.attacks.get(name) is ADAPTERS[name]
    finally:
        registry.attacks.refresh()
