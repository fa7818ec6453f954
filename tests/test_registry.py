from __future__ import annotations

from importlib import metadata
from typing import Any

import pytest
from pydantic import BaseModel

from pagctl import registry
from pagctl.errors import PluginConflictError, PluginLoadError, SpecError, UnknownPluginError
from pagctl.registry import Registry


class _Dist:
    def __init__(self, name: str) -> None:
        self.name, self.version = name, "1.2.3"


class _EP:
    """A stand-in for importlib.metadata.EntryPoint carrying a distribution."""

    def __init__(self, name: str, value: str, dist: str) -> None:
        self.name, self.value, self.dist = name, value, _Dist(dist)


class GoodFactory:
    """A test plugin."""

    class Params(BaseModel):
        model_config = {"extra": "forbid"}
        scale: float = 1.0

    def __init__(self, params: Any, ctx: Any) -> None:
        self.params = params


NotAFactory = 42


def _registry(eps: list[_EP], monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.delenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return Registry("pagctl.attacks", {"builtin_one": f"{__name__}:GoodFactory"},
                    entry_points=lambda group: eps)  # type: ignore[arg-type,return-value]


def test_builtins_load_through_the_same_loader() -> None:
    for reg in (registry.target_gradients, registry.attacks):
        for name in reg.names():
            factory = reg.get(name)
            assert issubclass(factory.Params, BaseModel), name
            fields = factory.Params.model_fields
            required = [k for k, f in fields.items() if f.is_required()]
            if not required:
                factory.Params()  # defaults validate
            for key in required:  # e.g. sbg's run folder, precomputed's bank path
                assert fields[key].description, (name, key)


def test_builtin_model_providers_build_networks() -> None:
    """pagctl's architectures are model providers, found by name without ``import
    pagctl.models``, and called with num_classes and in_chans."""
    from torch import nn

    assert {"pagctl_small_cnn", "pagctl_cifar_resnet18", "pagctl_mlp"} <= set(
        registry.models.names())
    net = registry.models.get("pagctl_small_cnn")(num_classes=7, in_chans=2)
    assert isinstance(net, nn.Module) and net.num_classes == 7


def test_a_model_provider_must_be_callable(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagctl.registry import model_provider_problem

    monkeypatch.delenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    eps = [_EP("not_callable", f"{__name__}:NOT_CALLABLE", "acme-models")]
    reg = Registry("pagctl.models", {}, entry_points=lambda group: eps,  # type: ignore[arg-type,return-value]
                   contract=model_provider_problem)
    with pytest.raises(PluginLoadError, match="is not a model provider"):
        reg.get("not_callable")


NOT_CALLABLE = 3


def test_third_party_plugin_is_found_and_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _registry([_EP("thirdparty", f"{__name__}:GoodFactory", "acme-attacks")], monkeypatch)
    assert reg.names() == ["builtin_one", "thirdparty"]
    assert reg.get("thirdparty") is GoodFactory
    rows = {r.name: r for r in reg.info()}
    assert rows["thirdparty"].distribution == "acme-attacks"
    assert rows["thirdparty"].status == "ok" and rows["thirdparty"].summary == "A test plugin."


def test_unknown_name_suggests_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _registry([], monkeypatch)
    with pytest.raises(UnknownPluginError, match="Did you mean 'builtin_one'.*Available"):
        reg.get("builtin_onr")


def test_conflict_names_both_distributions_only_when_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _registry([_EP("builtin_one", f"{__name__}:GoodFactory", "evil-dist"),
                     _EP("fine", f"{__name__}:GoodFactory", "ok-dist")], monkeypatch)
    assert reg.get("fine") is GoodFactory  # other names unaffected
    with pytest.raises(PluginConflictError, match="'pagctl'.*'evil-dist'"):
        reg.get("builtin_one")
    assert {r.status for r in reg.info() if r.name == "builtin_one"} == {"conflict"}


def test_broken_plugins_are_listed_and_raise_chained(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _registry([_EP("gone", "no_such_module_xyz:Thing", "broken-dist"),
                     _EP("notfactory", f"{__name__}:NotAFactory", "odd-dist"),
                     _EP("Bad-Name", f"{__name__}:GoodFactory", "odd-dist")], monkeypatch)
    with pytest.raises(PluginLoadError, match="broken-dist") as info:
        reg.get("gone")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(PluginLoadError, match="Params"):
        reg.get("notfactory")
    status = {r.name: r.status for r in reg.info()}
    assert status == {"builtin_one": "ok", "gone": "broken", "notfactory": "broken",
                      "Bad-Name": "broken"}


def test_autoload_switch_hides_third_party(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _registry([_EP("thirdparty", f"{__name__}:GoodFactory", "acme")], monkeypatch)
    monkeypatch.setenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert reg.names() == ["builtin_one"]
    reg.refresh()
    monkeypatch.delenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD")
    assert "thirdparty" in reg.names()


def test_params_errors_carry_the_dotted_path(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _registry([], monkeypatch)
    with pytest.raises(SpecError, match=r"eval\.attack\.params\.scale"):
        reg.validate_params("builtin_one", {"scale": "big"}, "eval.attack")
    with pytest.raises(SpecError, match=r"eval\.attack\.params\.nope: unknown key"):
        reg.validate_params("builtin_one", {"nope": 1}, "eval.attack")


def test_real_entry_points_api_is_used_by_default() -> None:
    reg = Registry("pagctl.nonexistent_group", {})
    assert reg.names() == []
    assert isinstance(metadata.entry_points(group="pagctl.nonexistent_group"),
                      metadata.EntryPoints)


def test_norm_names_are_case_insensitive_in_every_builtin_attack() -> None:
    """fra31/auto-attack's and torchattacks' spellings ('Linf', 'L2') name the same norms;
    a name that is no norm is still refused, naming the field."""

    with_norm = [name for name in registry.attacks.names()
                 if "norm" in registry.attacks.get(name).Params.model_fields]
    with_l1 = {"autoattack", "apgd_ce", "apgd_dlr", "apgd_t", "fab", "fab_t", "square"}
    assert with_l1 | {"fgsm"} <= set(with_norm)
    for name in with_norm:
        spellings = [("L2", "l2"), ("Linf", "linf"), ("LINF", "linf"), ("l2", "l2")]
        if name in with_l1:
            spellings.append(("L1", "l1"))
        for given, expected in spellings:
            params = registry.attacks.validate_params(name, {"norm": given}, "--param")
            assert params.norm == expected, (name, given)  # type: ignore[attr-defined]
        allowed = "'linf', 'l2' or 'l1'" if name in with_l1 else "'linf' or 'l2'"
        with pytest.raises(SpecError, match=rf"norm: Input should be {allowed} \(got 'L3'\)"):
            registry.attacks.validate_params(name, {"norm": "L3"}, "--param")
        if name not in with_l1:
            with pytest.raises(SpecError, match=rf"norm: Input should be {allowed}"):
                registry.attacks.validate_params(name, {"norm": "L1"}, "--param")


def test_a_third_party_model_provider_may_not_shadow_a_timm_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pagctl.models import create_network
    from pagctl.registry import model_provider_problem

    eps = [_EP("resnet18", "torch.nn:Identity", "acme-models"),
           _EP("acme_net", "torch.nn:Identity", "acme-models")]
    reg = Registry("pagctl.models", dict(registry.BUILTIN_MODELS),
                   entry_points=lambda group: eps,  # type: ignore[arg-type,return-value]
                   contract=model_provider_problem)
    monkeypatch.delenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setattr(registry, "models", reg)
    with pytest.raises(SpecError, match="both a timm architecture and a model provider"):
        create_network("resnet18", num_classes=10, in_chans=3, kwargs={})
    assert type(create_network("acme_net", num_classes=10, in_chans=3, kwargs={})).__name__ \
        == "Identity"


def test_wrapping_is_a_parameter_not_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """``instantiate`` hands back ``wrap(built, name, origin)`` when the registry was built
    with a ``wrap``, the built object itself otherwise, whatever the group is called; the
    sources' registry wraps in GuardedSource, the attacks' does not wrap."""
    from pagctl.spec import PluginRef
    from pagctl.testing import small_context

    monkeypatch.delenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    seen: list[tuple[Any, str, str]] = []

    def wrap(built: Any, name: str, origin: str) -> tuple[str, Any]:
        seen.append((built, name, origin))
        return ("wrapped", built)

    ref = PluginRef(name="builtin_one")
    for group in ("pagctl.attacks", "pagctl.target_gradients"):
        table = {"builtin_one": f"{__name__}:GoodFactory"}
        plain = Registry(group, table, entry_points=lambda g: [])
        assert isinstance(plain.build(ref, small_context(), "x"), GoodFactory), group
        wrapped = Registry(group, table, entry_points=lambda g: [], wrap=wrap)
        kind, built = wrapped.build(ref, small_context(), "x")
        assert kind == "wrapped" and isinstance(built, GoodFactory), group
        assert seen[-1] == (built, "builtin_one", "built-in")
    assert registry.target_gradients.wrap is registry.GuardedSource
    assert registry.attacks.wrap is None and registry.models.wrap is None
