"""Every registered attack, one suite: the contract and the behaviour all attacks share,
checked with `pagctl.testing`'s kit (the checks third-party plugins run on theirs).

Parametrised from the registry (autoload off: the built-ins), in every norm each attack
takes, with fast parameters per attack in `CASES` (a new built-in fails
`test_every_registered_attack_has_cases` until it is listed there). What one attack alone
promises (parity with a reference implementation, an analytic case, a step's geometry, its
parameters' defaults) stays in its own file: test_attacks.py (steps, PGD, FGSM),
test_pgd_modes.py (targeted PGD, EOT-PGD, MI-FGSM), test_apgd.py, test_fab.py,
test_square.py, test_cw.py, test_sparse_rs.py.

Per case:

- the contract on a mixed-mode BatchNorm model (`check_attack`: Params, outputs, budget,
  inputs, model modes and buffers, gradients, global RNG, two builds agree), the budget
  without tolerance, something moved, the same points under ``torch.no_grad()``, the budget
  declared as given; attacks that skip misclassified points return them unchanged, and
  minimum-norm attacks change only points they make adversarial;
- determinism given a seed, per batch (`check_attack_seeding`: what a resumed or sharded
  ``pagctl attack`` relies on);
- an empty batch and ``eps = 0`` (`check_attack_edge_cases`);
- a float64 model in train mode (`check_attack_in_train_mode`);
- breaking an undefended digits model (`check_attack_breaks`).
"""

from __future__ import annotations

import typing
from typing import Any

import pytest
import torch
from attack_kit import SHAPE, bn_model, box_inputs, norms, train_digits_mlp
from torch import Tensor, nn

from pagctl import registry
from pagctl.protocols import Attack, BuildContext, declared_budget
from pagctl.testing import (
    check_attack,
    check_attack_breaks,
    check_attack_edge_cases,
    check_attack_in_train_mode,
    check_attack_seeding,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _ctx(seed: int = 0) -> BuildContext:
    return BuildContext(num_classes=10, input_shape=SHAPE, device=CPU, seed=seed)


def attack_norms(factory: Any) -> list[str]:
    """The norms an attack takes: its ``norm`` parameter's choices, else its fixed norm."""
    field = factory.Params.model_fields.get("norm")
    if field is None:
        return [factory.norm]
    annotation = field.annotation
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return list(typing.get_args(annotation))


# Budgets on attack_kit's BatchNorm model: some points broken, some not.
APGD_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 2.0}
FAB_EPS = {"linf": 0.1, "l2": 1.0, "l1": 1.0}


def _each_norm(eps: dict[str, float], **params: Any) -> list[dict[str, Any]]:
    return [{"norm": norm, "eps": size, **params} for norm, size in eps.items()]


def _apgd(**params: Any) -> list[dict[str, Any]]:
    fast = {"steps": 8, "restarts": 2, **params}
    return [*_each_norm(APGD_EPS, **fast), {"norm": "l1", "eps": 2.0, "large_eps": True, **fast}]


CASES: dict[str, list[dict[str, Any]]] = {
    "apgd_ce": _apgd(),
    "apgd_dlr": _apgd(),
    "apgd_t": _apgd(n_target_classes=3),
    "autoattack": _each_norm(APGD_EPS, steps=3, square_queries=10),
    "cw_l2": [{"eps": 0.3, "steps": 30, "binary_search_steps": 3, "target": "random"},
              {"steps": 20, "binary_search_steps": 2}],
    "cw_linf": [{"eps": "8/255", "steps": 5},
                {"eps": 0.1, "steps": 3, "restarts": 2, "step_size": 0.05, "confidence": 5}],
    "deepfool": [{"eps": 0.5, "steps": 10},
                 {"norm": "linf", "eps": 0.05, "steps": 10, "candidates": 3}],
    "eot_pgd": [{"eps": "8/255", "steps": 3, "eot_iter": 2},
                {"norm": "l2", "eps": 0.5, "steps": 3, "eot_iter": 2, "restarts": 2,
                 "target": "next"}],
    "fab": _each_norm(FAB_EPS, steps=10, restarts=2),
    "fab_t": _each_norm(FAB_EPS, steps=10, restarts=2, n_target_classes=3),
    "fgsm": [{"eps": "8/255"}, {"eps": 0.5, "norm": "l2"}],
    "mifgsm": [{"eps": "8/255", "steps": 5}],
    "pgd_l1": [{"eps": 2.0, "steps": 5},
               {"eps": 1.0, "steps": 3, "step_size": 0.5, "quantile": 0.9}],
    "pgd_l2": [{"eps": 0.5, "steps": 5}, {"eps": 1.0, "steps": 3, "restarts": 3},
               {"eps": 0.5, "steps": 5, "target": "least_likely"}],
    "pgd_linf": [{"eps": "8/255", "steps": 5},
                 {"eps": 0.1, "steps": 3, "restarts": 2, "step_size": 0.05},
                 {"eps": 0.1, "steps": 3, "restarts": 2, "target": "random"}],
    "sparse_rs": [{"eps": 3, "queries": 30},
                  {"eps": 2, "queries": 20, "restarts": 2, "p_init": 0.5}],
    "square": _each_norm(APGD_EPS, queries=30),
}
"""Fast parameters per attack: one case per entry, covering every norm it takes."""

DETERMINISTIC = {"deepfool", "fgsm", "mifgsm", "pgd_l1"}
"""Attacks that draw no randomness with their case's parameters."""
SEED_UNSEEN = {"cw_l2", "fab", "fab_t"}
"""Attacks whose random draws (FAB's restarts, CW's random targets) change no point on
these inputs: another seed is not required to give other points (test_fab and test_cw
show their seeds at work where they do)."""
KEEP_MISCLASSIFIED = {"apgd_ce", "apgd_dlr", "apgd_t", "autoattack", "cw_l2", "deepfool", "fab",
                      "fab_t", "mifgsm", "sparse_rs", "square"}
"""Attacks that return the points the model already misclassifies unchanged."""
MINIMUM_NORM = {"cw_l2", "deepfool", "fab", "fab_t"}
"""Attacks that return a point only where they found an adversarial one within eps."""


def _case_id(name: str, params: dict[str, Any]) -> str:
    parts = [name, str(params.get("norm", ""))]
    parts += [key for key in ("large_eps", "restarts", "step_size", "target") if key in params]
    return "-".join(p for p in parts if p)


ALL_CASES = [pytest.param(name, params, id=_case_id(name, params))
             for name in registry.attacks.names() for params in CASES.get(name, [])]
NAME_NORMS = [pytest.param(name, norm, id=f"{name}-{norm}") for name in registry.attacks.names()
              for norm in attack_norms(registry.attacks.get(name))]
"""Every registered attack in every norm it takes."""


def _setup(name: str, params: dict[str, Any]) -> tuple[Any, str, float]:
    factory = registry.attacks.get(name)
    validated = factory.Params.model_validate(params)
    norm, eps = declared_budget(factory(validated, _ctx()), validated)
    assert norm is not None and eps is not None
    return factory, norm, eps


def _mixed_model() -> nn.Module:
    """attack_kit's BatchNorm model in eval mode with its first module in train mode: the
    attack must keep every module's flag."""
    model = bn_model().eval()
    next(model.children()).train()
    return model


def _inputs(model: nn.Module, n: int = 12) -> tuple[Tensor, Tensor]:
    """Inputs on the box faces labelled with the model's predictions, but for the first two
    (misclassified points)."""
    x, _ = box_inputs(n)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 10
    return x, y


def test_every_registered_attack_has_cases() -> None:
    """Every registered attack is listed in CASES, with a case in every norm it takes."""
    for name in registry.attacks.names():
        assert name in CASES, f"{name}: add fast parameters to CASES"
        covered = {_setup(name, params)[1] for params in CASES[name]}
        assert covered == set(attack_norms(registry.attacks.get(name))), name


@pytest.mark.parametrize(("name", "params"), ALL_CASES)
def test_contract_on_a_mixed_mode_model(name: str, params: dict[str, Any]) -> None:
    factory, norm, eps = _setup(name, params)
    model = _mixed_model()
    x, y = _inputs(model)
    attack = factory(factory.Params.model_validate(params), _ctx())
    assert isinstance(attack, Attack)
    assert (attack.norm, attack.eps) == (norm, eps)  # the budget, declared as given

    adv = check_attack(factory, params=params, ctx=_ctx(), model=model, inputs=x, labels=y)

    assert bool((norms(adv - x, norm) <= eps).all())  # no tolerance: fit_to_budget's promise
    assert not torch.equal(adv, x)
    with torch.no_grad():  # the caller may have disabled gradients
        assert torch.equal(factory(factory.Params.model_validate(params), _ctx())(model, x, y),
                           adv)
    if name in KEEP_MISCLASSIFIED:
        assert torch.equal(adv[:2], x[:2])
    changed = (adv != x).flatten(1).any(1)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    if name in MINIMUM_NORM:
        assert bool(changed.any()) and not bool(changed.all())  # the budget binds for some
        assert bool(fooled[changed].all())  # a changed point is adversarial within eps
    if name == "cw_l2" and "target" in params:  # the budget binds: some broken, not all
        assert bool(fooled[2:].any()) and not bool(fooled[2:].all())


@pytest.mark.parametrize(("name", "params"), ALL_CASES)
def test_seeded_and_deterministic_per_batch(name: str, params: dict[str, Any]) -> None:
    model = bn_model().eval()
    x, y = _inputs(model)
    random = False if name in DETERMINISTIC else None if name in SEED_UNSEEN else True
    check_attack_seeding(registry.attacks.get(name), params=params, ctx=_ctx(seed=3),
                         model=model, inputs=x, labels=y, random=random)


@pytest.mark.parametrize(("name", "params"), ALL_CASES)
def test_empty_batch_and_zero_budget(name: str, params: dict[str, Any]) -> None:
    model = bn_model().eval()
    x, y = _inputs(model, 4)
    check_attack_edge_cases(registry.attacks.get(name), params=params, ctx=_ctx(), model=model,
                            inputs=x, labels=y)


@pytest.mark.parametrize(("name", "params"), ALL_CASES)
def test_float64_model_in_train_mode(name: str, params: dict[str, Any]) -> None:
    factory, norm, eps = _setup(name, params)
    model = bn_model().double().train()
    x, y = box_inputs(8)
    adv = check_attack_in_train_mode(factory, params=params, ctx=_ctx(), model=model,
                                     inputs=x.double(), labels=y)
    assert adv.dtype == torch.float64 and all(m.training for m in model.modules())
    assert bool((norms(adv - x.double(), norm) <= eps).all())


# ------------------------------------------------------- the kit's own model and data


QUICK = {  # keep the built-ins fast; defaults are checked for validity regardless
    "apgd_ce": {"steps": 5}, "apgd_dlr": {"steps": 5}, "apgd_t": {"steps": 5},
    "autoattack": {"steps": 3, "square_queries": 10}, "eot_pgd": {"steps": 3, "eot_iter": 2},
    "fab": {"steps": 5}, "fab_t": {"steps": 5}, "mifgsm": {"steps": 3},
    "square": {"queries": 20}, "sparse_rs": {"queries": 20}, "cw_l2": {"steps": 5},
    "cw_linf": {"steps": 3}, "deepfool": {"steps": 10}, "pgd_l1": {"steps": 3},
    "pgd_l2": {"steps": 3}, "pgd_linf": {"steps": 3},
}
KIT_EPS = {"l2": 0.5, "linf": 0.1, "l1": 2.0}


@pytest.mark.parametrize(("name", "norm"), NAME_NORMS)
def test_conforms_on_the_kits_defaults(name: str, norm: str) -> None:
    """`check_attack` with its own small model and data, as a plugin's tests call it."""
    factory = registry.attacks.get(name)
    params = dict(QUICK.get(name, {}))
    if "norm" in factory.Params.model_fields:
        params["norm"] = norm
        params["eps"] = KIT_EPS[norm]
    check_attack(factory, params=params)


# ----------------------------------------------------------- an undefended digits model


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, Tensor, Tensor]:
    """The shared digits MLP; 300 test points."""
    pytest.importorskip("sklearn.datasets")
    return train_digits_mlp(300)


DIGITS_EPS = {"linf": 0.05, "l2": 0.5, "l1": 1.0, "l0": 4}
"""Budgets the digits MLP is not robust to."""
DIGITS = {  # few iterations: breaking some points is enough
    "apgd_ce": {"steps": 10}, "apgd_dlr": {"steps": 10},
    "apgd_t": {"steps": 10, "n_target_classes": 3},
    "autoattack": {"steps": 3, "square_queries": 20},
    "cw_l2": {"steps": 20, "binary_search_steps": 3}, "eot_pgd": {"eot_iter": 2},
    "fab": {"steps": 10},
    "fab_t": {"steps": 10, "n_target_classes": 3}, "square": {"queries": 50},
    "sparse_rs": {"queries": 50},
}
DIGITS_EXACT = {  # (name, norm) -> the parameters, in full
    ("fgsm", "linf"): {"eps": 0.1}, ("fgsm", "l2"): {"eps": 0.5, "norm": "l2"},
    ("pgd_l2", "l2"): {"eps": 0.5}, ("pgd_linf", "linf"): {"eps": 0.05},
}


@pytest.mark.parametrize(("name", "norm"), NAME_NORMS)
def test_breaks_an_undefended_model(
    digits_model: tuple[nn.Module, Tensor, Tensor], name: str, norm: str,
) -> None:
    factory = registry.attacks.get(name)
    params = DIGITS_EXACT.get((name, norm))
    if params is None:
        params = {**DIGITS.get(name, {}), "eps": DIGITS_EPS[norm]}
        if "norm" in factory.Params.model_fields:
            params["norm"] = norm
    model, x, y = digits_model
    clean, _ = check_attack_breaks(factory, params=params, ctx=_ctx(), model=model, inputs=x,
                                   labels=y)
    assert clean > 0.9
