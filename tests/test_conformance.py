"""Every built-in plugin passes the conformance checks third-party plugins use, and the
checks catch each broken rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pagctl import registry
from pagctl.protocols import PluginParams
from pagctl.testing import check_attack, check_target_gradient_source, small_context

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = {  # keep the built-ins fast; defaults are checked for validity regardless
    "apgd_ce": {"steps": 5}, "apgd_dlr": {"steps": 5}, "apgd_t": {"steps": 5},
    "autoattack": {"steps": 3, "square_queries": 10}, "fab": {"steps": 5},
    "fab_t": {"steps": 5}, "square": {"queries": 20}, "cw_l2": {"steps": 5},
    "pgd_l2": {"steps": 3}, "pgd_linf": {"steps": 3},
}


WITH_L1 = {"apgd_ce", "apgd_dlr", "apgd_t", "autoattack", "fab", "fab_t", "square"}


@pytest.mark.parametrize("name", sorted(registry.BUILTIN_ATTACKS))
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_builtin_attacks_conform(name: str, norm: str) -> None:
    factory = registry.attacks.get(name)
    params = dict(QUICK.get(name, {}))
    if "norm" in factory.Params.model_fields:
        if norm == "l1" and name not in WITH_L1:
            pytest.skip(f"{name} has no L1")
        params["norm"] = norm
        params["eps"] = {"l2": 0.5, "linf": 0.1, "l1": 2.0}[norm]
    elif norm != "l2":
        pytest.skip(f"{name} has one norm")
    check_attack(factory, params=params)


NEEDS_A_FILE = {  # sources whose required params name a trained model or a bank on disk
    "sbg": "tests/test_score.py", "precomputed": "tests/test_banks.py",
    "toy_score": "tests/test_toy_score.py",
}


@pytest.mark.parametrize("name", sorted(registry.BUILTIN_TARGET_GRADIENTS))
def test_builtin_sources_conform(name: str, tmp_path: Path) -> None:
    if name in NEEDS_A_FILE:
        pytest.skip(f"{name} needs a trained model, a bank or the toy data; "
                    f"{NEEDS_A_FILE[name]} runs the same checks on one")
    check_target_gradient_source(registry.target_gradients.get(name),
                                 ctx=small_context(cache_dir=tmp_path))


def test_the_sources_that_need_files_are_checked_elsewhere() -> None:
    for name, path in NEEDS_A_FILE.items():
        if name in registry.BUILTIN_TARGET_GRADIENTS:
            text = (Path(__file__).parent.parent / path).read_text(encoding="utf-8")
            assert "check_target_gradient_source" in text, (name, path)


# ------------------------------------------------------------------ the checks can fail


class _Good:
    class Params(PluginParams):
        eps: float = 0.1
        norm: str = "linf"

    def __init__(self, params: Any, ctx: Any) -> None:
        self.params = params
        self.gen = torch.Generator().manual_seed(ctx.seed)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        noise = torch.rand(x.shape, generator=self.gen) * 2 - 1
        return (x + self.params.eps * noise).clamp(0, 1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.perturb(model, x, y)


def _variant(name: str, call: Any, params: type[Any] | None = None) -> type[Any]:
    attrs: dict[str, Any] = {"__call__": call}
    if params is not None:
        attrs["Params"] = params
    return type(name, (_Good,), attrs)


class _Open(PluginParams):
    model_config = {"extra": "allow"}  # type: ignore[assignment]
    eps: float = 0.1


class _Infinite(PluginParams):
    model_config = {"frozen": True, "extra": "forbid", "allow_inf_nan": True}  # type: ignore[assignment]
    eps: float | None = 0.1


def _in_place(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x.add_(0.0).clamp_(0, 0.5)
    return x.clone()


def _train_mode(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    model.train()
    return x.clone()


def _bn_update(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    model.train()
    model(x)
    model.eval()
    return x.clone()


def _global_rng(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (x + 0.05 * torch.rand_like(x)).clamp(0, 1)


def _grad_left(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    model(x.requires_grad_(True)).sum().backward()
    x.requires_grad_(False)
    return x.detach().clone()


CASES = [
    (_variant("Outside", lambda s, m, x, y: x + 0.05), "outside \\[0, 1\\]"),
    (_variant("OverBudget", lambda s, m, x, y: (x + 0.3).clamp(0, 1)), "exceeds eps"),
    (_variant("NaNs", lambda s, m, x, y: x * float("nan")), "NaN"),
    (_variant("Shape", lambda s, m, x, y: x[:-1].clone()), "shape"),
    (_variant("Double", lambda s, m, x, y: x.double()), "float64"),
    (_variant("InPlace", _in_place), "in place"),
    (_variant("TrainMode", _train_mode), "train/eval mode"),
    (_variant("BNUpdate", _bn_update), "buffer"),
    (_variant("GlobalRNG", _global_rng), "global RNG"),
    (_variant("GradLeft", _grad_left), ".grad"),
    (_variant("Unseeded", lambda s, m, x, y: (x + 0.01 * torch.rand(
        x.shape, generator=torch.Generator().manual_seed(id(s) % 1000))).clamp(0, 1)),
     "different outputs"),
    (_variant("OpenParams", _Good.__call__, _Open), "unknown key"),
    (_variant("InfiniteParams", _Good.__call__, _Infinite), "eps=nan; floats must be finite"),
]


def test_a_good_plugin_passes() -> None:
    out = check_attack(_Good)
    assert out.shape == (12, 1, 8, 8)


@pytest.mark.parametrize(("factory", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_each_broken_rule_is_caught(factory: type[Any], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_attack(factory)


def test_source_checks_catch_shape_and_nan() -> None:
    class Flat:
        class Params(PluginParams):
            pass

        def __init__(self, params: Any, ctx: Any) -> None:
            pass

        def __call__(self, x: Tensor, y: Tensor, c: Tensor, *, index: Any = None) -> Tensor:
            return torch.zeros(x.shape[0], *x.shape[1:])

    class NaN(Flat):
        def __call__(self, x: Tensor, y: Tensor, c: Tensor, *, index: Any = None) -> Tensor:
            return torch.full((x.shape[0], c.shape[1], *x.shape[1:]), float("nan"))

    with pytest.raises(AssertionError, match="shape"):
        check_target_gradient_source(Flat)
    with pytest.raises(AssertionError, match="NaN"):
        check_target_gradient_source(NaN)
