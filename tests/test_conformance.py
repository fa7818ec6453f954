"""Every built-in source passes the conformance checks third-party plugins use, and the
checks catch each broken rule (the built-in attacks run them in test_attack_suite.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pagctl import registry
from pagctl.protocols import PluginParams
from pagctl.testing import (
    check_attack,
    check_attack_breaks,
    check_attack_edge_cases,
    check_attack_in_train_mode,
    check_attack_seeding,
    check_target_gradient_source,
    small_context,
    small_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")

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


def _with_grad(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return x + 0 * model(x).sum()


def _flags_input(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x.requires_grad_(True)
    return x.detach().clone()


@pytest.mark.parametrize(("call", "message"), [
    (_with_grad, "requires grad; return a detached result"),
    (_flags_input, "changed requires_grad of its input tensor #0"),
], ids=["output_requires_grad", "input_flag_changed"])
def test_check_attack_catches_autograd_leaks(call: Any, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_attack(_variant("Leaky", call))


_SHARED = torch.Generator().manual_seed(0)


class _Seeded(_Good):
    class Params(PluginParams):
        eps: float = 0.1
        norm: str = "linf"
        seed: int | None = None

    def __init__(self, params: Any, ctx: Any) -> None:
        self.params = params
        self.gen = torch.Generator().manual_seed(ctx.seed if params.seed is None else params.seed)


class _SharedStream(_Good):
    """Draws from one module-level generator: two instances with one seed disagree."""

    def __init__(self, params: Any, ctx: Any) -> None:
        self.params = params
        self.gen = _SHARED


class _IgnoresSeedParam(_Seeded):
    def __init__(self, params: Any, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.gen = torch.Generator().manual_seed(ctx.seed)


class _Fixed(_Good):
    """The same noise whatever the seed."""

    def __init__(self, params: Any, ctx: Any) -> None:
        self.params = params
        self.gen = torch.Generator().manual_seed(7)


@pytest.mark.parametrize(("factory", "random", "message"), [
    (_SharedStream, True, "another instance had drawn"),
    (_IgnoresSeedParam, True, "the seed parameter must win"),
    (_Fixed, True, "gave the same output"),
    (_Seeded, False, "two calls of one deterministic attack"),
], ids=["shared_stream", "seed_param_ignored", "seed_unused", "not_deterministic"])
def test_check_attack_seeding_catches(factory: type[Any], random: bool, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_attack_seeding(factory, random=random)
    check_attack_seeding(_Seeded)
    check_attack_seeding(_Seeded, random=None)


def _empty_wrong(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return x.clone() if len(x) else torch.zeros(1, *x.shape[1:])


def _same_object(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return x if self.params.eps == 0 else x.clone()


def _moves_anyway(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (x + 1e-3).clamp(0, 1)


@pytest.mark.parametrize(("call", "message"), [
    (_empty_wrong, "an empty batch"), (_same_object, "returned the inputs tensor itself"),
    (_moves_anyway, "with eps=0 it did not return the inputs unchanged"),
], ids=["empty_batch", "same_object", "moves_at_eps_0"])
def test_check_attack_edge_cases_catches(call: Any, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_attack_edge_cases(_variant("Edgy", call))
    check_attack_edge_cases(_variant("Fine", lambda s, m, x, y: x.clone()))


def _to_eval(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    model.eval()
    return x.clone()


def _backward(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    model(x).sum().backward()
    return x.clone()


@pytest.mark.parametrize(("call", "message"), [
    (_to_eval, "train/eval mode"), (_backward, "left a .grad"),
    (_global_rng, "global RNG"),
], ids=["to_eval", "backward", "global_rng"])
def test_check_attack_in_train_mode_catches(call: Any, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_attack_in_train_mode(_variant("Trainee", call))
    # BatchNorm statistics may change in train mode: the caller chose the mode
    model = small_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def forward_in_train_mode(self: Any, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            model(x)
        return x.clone()

    check_attack_in_train_mode(_variant("Runs", forward_in_train_mode), model=model)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_check_attack_breaks_catches_an_attack_that_breaks_nothing() -> None:
    with pytest.raises(AssertionError, match="robust accuracy 1 is not below the clean"):
        check_attack_breaks(_variant("Idle", lambda s, m, x, y: x.clone()))
    clean, robust = check_attack_breaks(_Good, params={"eps": 0.5})
    assert clean == 1.0 and robust < 1.0


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
