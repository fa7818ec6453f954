"""Third-party plugins that misbehave are stopped with one error naming the plugin and its
distribution: raising inside a call, wrong shape, NaNs, values outside [0, 1], changing the
model's mode; and `pagctl plugins NAME` shows a plugin's parameters."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import envelope_records
from torch import Tensor, nn

from pagctl import cli, registry
from pagctl.data import TensorImageDataset
from pagctl.errors import PluginContractError, PluginRuntimeError
from pagctl.protocols import PluginParams
from pagctl.registry import GuardedSource, Registry
from pagctl.robustness.engine import run_attack
from pagctl.testing import small_context, small_data, small_model

DIST = "acme-plugins 1.2.3"


class _Dist:
    name, version = "acme-plugins", "1.2.3"


class _EP:
    def __init__(self, name: str, value: str) -> None:
        self.name, self.value, self.dist = name, value, _Dist()


class _Base:
    """A misbehaving test attack."""

    class Params(PluginParams):
        eps: float = 0.1
        norm: str = "linf"

    def __init__(self, params: Any, ctx: Any) -> None:
        self.params = params


class Raises(_Base):
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise RuntimeError("CUDA out of memory (simulated)")


class WrongShape(_Base):
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x[:, :, :4].clone()


class NaNs(_Base):
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return torch.full_like(x, float("nan"))


class OutOfRange(_Base):
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return x * 0 + 1.05


class ModeChange(_Base):
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        model.train()
        return x.clone()


class SourceRaises:
    """A misbehaving test source."""

    class Params(PluginParams):
        pass

    def __init__(self, params: Any, ctx: Any) -> None:
        pass

    def __call__(self, x: Tensor, y: Tensor, c: Tensor, *, index: Any = None) -> Tensor:
        raise KeyError("missing table")


class SourceShape(SourceRaises):
    def __call__(self, x: Tensor, y: Tensor, c: Tensor, *, index: Any = None) -> Tensor:
        return torch.zeros_like(x)


class SourceNaN(SourceRaises):
    def __call__(self, x: Tensor, y: Tensor, c: Tensor, *, index: Any = None) -> Tensor:
        return torch.full((x.shape[0], c.shape[1], *x.shape[1:]), float("nan"))


class BuildFails(SourceRaises):
    def __init__(self, params: Any, ctx: Any) -> None:
        raise OSError("teacher weights unreadable")


ATTACKS = {"raises": Raises, "wrong_shape": WrongShape, "nans": NaNs,
           "out_of_range": OutOfRange, "mode_change": ModeChange}
SOURCES = {"source_raises": SourceRaises, "source_shape": SourceShape,
           "source_nan": SourceNaN, "build_fails": BuildFails}


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> tuple[Registry, Registry]:
    monkeypatch.delenv("PAGCTL_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    attacks = Registry("pagctl.attacks", registry.BUILTIN_ATTACKS, entry_points=lambda g: [
        _EP(n, f"{__name__}:{c.__name__}") for n, c in ATTACKS.items()])  # type: ignore[arg-type,misc]
    sources = Registry("pagctl.target_gradients", registry.BUILTIN_TARGET_GRADIENTS,
                       entry_points=lambda g: [  # type: ignore[arg-type,misc]
                           _EP(n, f"{__name__}:{c.__name__}") for n, c in SOURCES.items()],
                       wrap=GuardedSource)
    monkeypatch.setattr(registry, "attacks", attacks)
    monkeypatch.setattr(registry, "target_gradients", sources)
    monkeypatch.setitem(registry.REGISTRIES, "attacks", attacks)
    monkeypatch.setitem(registry.REGISTRIES, "target_gradients", sources)
    return attacks, sources


@pytest.mark.parametrize(("name", "error", "message"), [
    ("raises", PluginRuntimeError, "raised RuntimeError: CUDA out of memory"),
    ("wrong_shape", PluginContractError, "expected (12, 1, 8, 8)"),
    ("nans", PluginContractError, "non-finite"),
    ("out_of_range", PluginContractError, "outside [0, 1]"),
    ("mode_change", PluginContractError, "train/eval mode"),
])
def test_misbehaving_attacks_are_named(plugins: tuple[Registry, Registry], name: str,
                                       error: type[Exception], message: str) -> None:
    attacks, _ = plugins
    model = small_model()
    x, _ = small_data(12)
    with torch.no_grad():
        y = model(x).argmax(1)
    params = attacks.validate_params(name, {}, "--param")
    attack = attacks.instantiate(name, params, small_context(), "--param")
    with pytest.raises(error) as info:
        run_attack(model, attack, TensorImageDataset(x, y), torch.arange(12), name=name,
                   params=params, origin=attacks.origin(name))
    text = str(info.value)
    assert f"'{name}'" in text and DIST in text and message in text, text
    assert len(text.splitlines()) == 1


@pytest.mark.parametrize(("name", "error", "message"), [
    ("source_raises", PluginRuntimeError, "raised KeyError"),
    ("source_shape", PluginContractError, "(N, K, C, H, W)"),
    ("source_nan", PluginContractError, "NaN or infinite"),
])
def test_misbehaving_sources_are_named(plugins: tuple[Registry, Registry], name: str,
                                       error: type[Exception], message: str) -> None:
    _, sources = plugins
    params = sources.validate_params(name, {}, "target_gradients")
    source = sources.instantiate(name, params, small_context(), "target_gradients")
    x, y = small_data(4)
    with pytest.raises(error) as info:
        source(x, y, torch.zeros(4, 2, dtype=torch.int64))
    text = str(info.value)
    assert f"'{name}'" in text and DIST in text and message in text, text


def test_a_source_failing_to_build_is_named(plugins: tuple[Registry, Registry]) -> None:
    _, sources = plugins
    params = sources.validate_params("build_fails", {}, "target_gradients")
    with pytest.raises(PluginRuntimeError, match="acme-plugins 1.2.3.*failed to build: OSError"):
        sources.instantiate("build_fails", params, small_context(), "target_gradients")


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_name_shows_the_params_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["plugins", "pgd_l2", "--format", "json"], capsys)
    assert code == 0, err
    [info] = envelope_records(out, "plugins")
    assert info["group"] == "pagctl.attacks" and info["provided_by"] == "built-in"
    props = info["params"]["properties"]
    assert props["steps"]["default"] == 10 and "description" in props["steps"]
    code, out, err = _cli(["plugins", "nearest_neighbor"], capsys)
    assert code == 0, err
    assert "pool_size" in out and "target-gradient source" in out


def test_plugins_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["plugins", "autoatack"], capsys)
    assert code == 2 and err.count("\n") == 1 and "did you mean 'autoattack'" in err.lower()


def test_plugin_names_complete_in_the_shell() -> None:
    from pagctl.cli.common import complete_plugins

    complete = complete_plugins("attacks")
    assert complete("apgd") == ["apgd_ce", "apgd_dlr", "apgd_t"]
    assert "nearest_neighbor" in complete_plugins(None)("near")
