"""One plugin contract, one implementation: the conformance suite (`pagctl.testing`) and the
engine behind ``pagctl attack`` judge every attack the same way, so a plugin that passes
``check_attack`` can never exceed its budget in ``pagctl attack``, and one that exceeds it
fails both.

Each case is an attack that moves every input by exactly ``factor`` times its budget, with
the budget declared in each way the contract allows (``Params`` fields, attributes of the
built object, or a mix) and in every norm the contract knows (``l0``: that many pixels,
rounded up, set to the far corner of the box), plus a norm it cannot check (``l3``).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pagctl import registry
from pagctl.attacks.steps import fit_to_budget
from pagctl.data import DataBundle, TensorImageDataset
from pagctl.errors import PluginContractError
from pagctl.evaluation.request import EvaluationRequest
from pagctl.protocols import NORMS, PluginParams, check_attack_output, perturbation_norms
from pagctl.registry import Registry
from pagctl.robustness.budget import box_radius, implausible_budget
from pagctl.robustness.evaluate import AttackJob, evaluate_attack
from pagctl.robustness.reliability import Verdict, attack_probes
from pagctl.testing import check_attack, small_data, small_model

EPS = {"l1": 2.0, "l2": 0.5, "linf": 0.1, "l0": 3.0, "l3": 3.0}
FACTORS = (0.5, 1.0 - 1e-7, 1.0 + 1e-4, 1.5)


class _Dist:
    name, version = "contract-tests", "0.0.1"


class _EP:
    def __init__(self, name: str, value: str) -> None:
        self.name, self.value, self.dist = name, value, _Dist()


def _with_pixels_changed(x: Tensor, count: int) -> Tensor:
    """``x`` with every channel of its first ``count`` pixels (row-major) moved to the far
    corner of the box."""
    _, _, h, w = x.shape
    first = (torch.arange(h * w) < count).reshape(1, 1, h, w)
    return torch.where(first, (x < 0.5).to(x.dtype), x)


def _toward_centre(x: Tensor, norm: str, size: float) -> Tensor:
    """x moved toward 0.5 by exactly ``size`` in ``norm`` (deterministic, inside [0, 1]);
    in ``l0`` its first ⌈size⌉ pixels (row-major) moved to the far corner of the box."""
    if norm == "l0":
        return _with_pixels_changed(x, math.ceil(size))
    u = 0.5 - x
    scale = perturbation_norms(u, norm if norm in NORMS else "l2")
    return x + u * (size / scale).view(-1, 1, 1, 1)


def _factory(how: str, norm: str, factor: float) -> type[Any]:
    """An attack class whose budget is declared ``how``: "params" (eps and norm in Params),
    "attributes" (eps and norm on the built object only) or "mixed" (eps in Params, norm as
    an attribute)."""
    eps = EPS[norm]

    class Params(PluginParams):
        pass

    fields: dict[str, Any] = {}
    if how in ("params", "mixed"):
        fields["eps"] = (float, eps)
    if how == "params":
        fields["norm"] = (str, norm)
    if fields:
        from pydantic import create_model

        Params = create_model("Params", __base__=PluginParams, **fields)  # type: ignore[call-overload]  # noqa: N806

    class Scaled:
        def __init__(self, params: Any, ctx: Any) -> None:
            self.params = params
            if how != "params":
                self.norm = norm
            if how == "attributes":
                self.eps = eps

        def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
            return _toward_centre(inputs.detach(), norm, factor * eps)

    Scaled.Params = Params  # type: ignore[attr-defined]
    Scaled.__qualname__ = Scaled.__name__ = f"Scaled_{how}_{norm}_{str(factor).replace('.', '_')}"
    return Scaled


CASES = [(how, norm, factor) for how in ("params", "attributes", "mixed")
         for norm in ("l0", "l1", "l2", "linf", "l3") for factor in FACTORS]


def _conforms(factory: type[Any]) -> str | None:
    try:
        check_attack(factory)
    except AssertionError as exc:
        return str(exc)
    return None


def _in_pagctl_attack(factory: type[Any], monkeypatch: pytest.MonkeyPatch) -> tuple[str | None,
                                                                                     Any]:
    """Run the plugin as ``pagctl attack`` does: found by name in the registry, built per
    batch, evaluated by `evaluate_attack` (probes off)."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, factory.__name__, factory, raising=False)
    monkeypatch.delenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    attacks = Registry("pagctl.attacks", registry.BUILTIN_ATTACKS, entry_points=lambda g: [
        _EP("scaled", f"{__name__}:{factory.__name__}")])  # type: ignore[list-item,return-value]
    monkeypatch.setattr(registry, "attacks", attacks)
    model = small_model()
    x, _ = small_data(12)
    with torch.no_grad():
        y = model(x).argmax(1)
    data = TensorImageDataset(x, y)
    bundle = DataBundle(train=data, test=data, num_classes=10, input_shape=(1, 8, 8),
                        mean=(0.0,), std=(1.0,), name="t",
                        class_names=tuple(map(str, range(10))))
    params = attacks.validate_params("scaled", {}, "--param")
    try:
        reports, _ = evaluate_attack(model, bundle, AttackJob("scaled", params, probes=False),
                                     EvaluationRequest(batch_size=5))
    except PluginContractError as exc:
        return str(exc), None
    return None, reports[0]


@pytest.mark.parametrize(("how", "norm", "factor"), CASES,
                         ids=[f"{h}-{n}-{f}" for h, n, f in CASES])
def test_conformance_and_pagctl_attack_agree_on_the_budget(
        how: str, norm: str, factor: float, monkeypatch: pytest.MonkeyPatch) -> None:
    factory = _factory(how, norm, factor)
    conformance = _conforms(factory)
    engine, report = _in_pagctl_attack(factory, monkeypatch)
    assert (conformance is None) == (engine is None), (conformance, engine)
    if norm == "l3":  # a norm pagctl cannot measure is refused by both, never trusted
        assert conformance is not None and "cannot be checked" in conformance
        assert engine is not None and "cannot be checked" in engine
    elif factor > 1:
        assert conformance is not None and "exceeds eps" in conformance
        assert engine is not None and "exceeds eps" in engine
    else:
        assert report.norm == norm and report.eps == pytest.approx(EPS[norm])
        if norm == "l0":  # the report's maximum counts pixels too
            assert report.max_l0 == math.ceil(factor * EPS[norm])
        x, _ = small_data(12)
        worst = float(perturbation_norms(_toward_centre(x, norm, factor * EPS[norm]) - x,
                                         norm).max())
        assert worst <= EPS[norm] * (1 + 1e-6) + 1e-7


def test_the_engine_and_the_suite_share_one_implementation() -> None:
    """The checks the engine and the guard call are the ones the suite calls: no private
    copy of a rule remains in either."""
    import inspect

    from pagctl import protocols, testing
    from pagctl.robustness import engine

    for module in (engine, testing):
        text = inspect.getsource(module)
        assert "check_attack_output(" in text and "declared_budget(" in text
        assert "vector_norm" not in text and "exceeds eps" not in text
    assert "check_source_output(" in inspect.getsource(registry)
    assert "check_source_output(" in inspect.getsource(testing)
    assert set(NORMS) == {"l0", "l1", "l2", "linf"}
    assert protocols.check_attack_output is testing.check_attack_output  # type: ignore[attr-defined]
    assert protocols.check_attack_output is engine.check_attack_output  # type: ignore[attr-defined]



# ------------------------------------------------------------------ the L0 budget (pixels)


def test_l0_counts_a_pixel_once_whatever_its_channels() -> None:
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    adv = _with_pixels_changed(x, 3)
    adv[1, 0, 3, 3] = 1.0 - adv[1, 0, 3, 3]  # one more pixel, one channel only
    assert perturbation_norms(adv - x, "l0").tolist() == [3.0, 4.0]
    check_attack_output("k=4", x, adv, "l0", 4.0)  # within: no error
    with pytest.raises(PluginContractError, match=r"l0 norm 4 \(pixels changed\) exceeds eps 3"):
        check_attack_output("k=3", x, adv, "l0", 3.0)


def test_fit_to_budget_keeps_the_k_largest_pixel_changes() -> None:
    x = torch.full((2, 2, 2, 2), 0.5)
    adv = x.clone()
    adv[0, :, 0, 0] = 0.6  # change 0.1 per channel
    adv[0, 0, 0, 1] = 1.0  # 0.5, one channel
    adv[0, :, 1, 1] = 0.0  # 0.5 per channel: the largest
    adv[1, :, 1, 0] = 1.0  # one pixel only: inside a budget of 2
    fitted = fit_to_budget(x, adv, "l0", 2.0)
    assert torch.equal(fitted[1], adv[1])
    assert torch.equal(fitted[0, :, 1, 1], adv[0, :, 1, 1])
    assert torch.equal(fitted[0, :, 0, 1], adv[0, :, 0, 1])
    assert torch.equal(fitted[0, :, 0, 0], x[0, :, 0, 0])  # the smallest change undone
    assert torch.equal(fit_to_budget(x, adv, "l0", 0.0), x)


def test_an_l0_budget_of_every_pixel_is_implausible() -> None:
    assert box_radius("l0", (3, 8, 8)) == 64.0
    assert implausible_budget("l0", 63.0, (3, 8, 8)) is None
    why = implausible_budget("l0", 64.0, (3, 8, 8))
    assert why is not None and "64 pixels" in why and "/255" not in why


def test_the_attacking_probes_skip_an_l0_budget_saying_so() -> None:
    model = small_model()
    x, _ = small_data(4)
    with torch.no_grad():
        y = model(x).argmax(1)
    verdict = Verdict()
    attack_probes(model, x, y, torch.ones(4, dtype=torch.bool), norm="l0", eps=3.0, seed=0,
                  white_box_only=True, verdict=verdict)
    assert verdict.reasons == []
    assert verdict.measured == {"attack_probes": "skipped: the sweep, more-effort and "
                                "black-box probes attack in linf, l2, l1, not l0"}
