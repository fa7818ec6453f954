"""Plugin registry: one loader for built-ins and third-party entry points.

Groups ``pagctl.target_gradients`` and ``pagctl.attacks`` (plugin factories with a pydantic
``Params``, called as ``factory(params, ctx)``) and ``pagctl.models`` (model providers:
architectures by name, called as ``factory(num_classes=..., in_chans=..., **kwargs)`` and
returning an ``nn.Module``; see `pagctl.models.create_network`). Built-ins are a table of
``"module:attr"`` strings loaded lazily through the same path as entry points, so they work
from a source checkout and are listed next to third-party plugins. Two providers of one name
are a conflict, raised only when that name is asked for; a built-in is never silently
replaced. ``PAGCTL_DISABLE_PLUGIN_AUTOLOAD=1`` restricts every group to the built-ins.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from difflib import get_close_matches
from importlib import metadata
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from pagctl.errors import (
    FieldError,
    PagctlError,
    PluginConflictError,
    PluginLoadError,
    PluginRuntimeError,
    SpecError,
    UnknownPluginError,
)
from pagctl.protocols import (
    check_source_output,
    disables_pag,
    first_line,
    raised,
    requires_index,
    reseed_source,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pagctl.protocols import BuildContext
    from pagctl.spec import PluginRef

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
AUTOLOAD_ENV = "PAGCTL_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DIST = "pagctl"

BUILTIN_TARGET_GRADIENTS = {
    "none": "pagctl.target_gradients.none:NoSource",
    "one_image": "pagctl.target_gradients.one_image:OneImage",
    "class_mean": "pagctl.target_gradients.class_mean:ClassMean",
    "nearest_neighbor": "pagctl.target_gradients.nearest_neighbor:NearestNeighbor",
    "precomputed": "pagctl.target_gradients.precomputed:Precomputed",
    "sbg": "pagctl.target_gradients.sbg:SBG",
    "toy_score": "pagctl.target_gradients.toy_score:ToyScore",
}
BUILTIN_ATTACKS = {
    "apgd_ce": "pagctl.attacks.apgd:APGDCE",
    "apgd_dlr": "pagctl.attacks.apgd:APGDDLR",
    "apgd_t": "pagctl.attacks.apgd:APGDT",
    "autoattack": "pagctl.attacks.autoattack:AutoAttack",
    "cw_l2": "pagctl.attacks.cw:CWL2",
    "cw_linf": "pagctl.attacks.cw_linf:CWLinf",
    "deepfool": "pagctl.attacks.deepfool:DeepFool",
    "eot_pgd": "pagctl.attacks.pgd:EOTPGD",
    "fab": "pagctl.attacks.fab:FAB",
    "fab_t": "pagctl.attacks.fab:FABT",
    "fgsm": "pagctl.attacks.fgsm:FGSM",
    "mifgsm": "pagctl.attacks.mifgsm:MIFGSM",
    "pgd_l1": "pagctl.attacks.pgd_l1:PGDL1",
    "pgd_l2": "pagctl.attacks.pgd:PGDL2",
    "pgd_linf": "pagctl.attacks.pgd:PGDLinf",
    "sparse_rs": "pagctl.attacks.sparse_rs:SparseRS",
    "square": "pagctl.attacks.square:Square",
}
BUILTIN_MODELS = {
    "pagctl_cifar_resnet18": "pagctl.architectures:pagctl_cifar_resnet18",
    "pagctl_mlp": "pagctl.architectures:pagctl_mlp",
    "pagctl_small_cnn": "pagctl.architectures:pagctl_small_cnn",
}


@dataclass(frozen=True)
class _Entry:
    name: str
    value: str  # "module:attr"
    distribution: str
    version: str


@dataclass(frozen=True)
class PluginInfo:
    """One row of ``pagctl plugins``."""

    name: str
    group: str
    distribution: str
    version: str
    status: str  # "ok" | "broken" | "conflict"
    error: str | None
    summary: str


def autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _pagctl_version() -> str:
    from pagctl import __version__

    return __version__


def load_value(value: str) -> Any:
    """The object an entry-point value ``package.module:attr.sub`` names (imports the
    module; ImportError or AttributeError when it is not there)."""
    module_name, _, attr = value.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def _summary(obj: Any) -> str:
    """The docstring's first paragraph on one line (what ``pagctl plugins`` shows)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    first = doc.split("\n\n", 1)[0]
    return " ".join(line.strip() for line in first.splitlines())


def plugin_factory_problem(factory: Any) -> str | None:
    """What keeps ``factory`` from being a source or attack plugin (None when it is one)."""
    params = getattr(factory, "Params", None)
    if callable(factory) and isinstance(params, type) and issubclass(params, BaseModel):
        return None
    return ("is not a plugin factory: it needs a pydantic 'Params' class and must be "
            "callable as factory(params, ctx).")


def model_provider_problem(factory: Any) -> str | None:
    """What keeps ``factory`` from being a model provider (None when it is one)."""
    if callable(factory):
        return None
    return ("is not a model provider: it must be callable as factory(num_classes=..., "
            "in_chans=..., **kwargs) and return a torch.nn.Module.")


Wrap = Callable[[Any, str, str], Any]
"""``wrap(built, name, origin)``: what `Registry.instantiate` hands back for a plugin built
as ``built`` (``origin`` as `Registry.origin` gives it), e.g. :class:`GuardedSource`."""


class Registry:
    """Plugins of one entry-point group, keyed by name. ``contract`` says what keeps a
    loaded object from being one of this group's plugins (None when nothing does);
    ``wrap``, when given, wraps every plugin `instantiate` builds (the target-gradient
    sources come back as :class:`GuardedSource`). Both are parameters, not branches on the
    group's name, so a registry's behaviour is read off its construction at the bottom of
    this module and a test's registry of any group behaves as it is built."""

    def __init__(
        self,
        group: str,
        builtins: dict[str, str],
        entry_points: Callable[[str], Iterable[metadata.EntryPoint]] | None = None,
        contract: Callable[[Any], str | None] = plugin_factory_problem,
        wrap: Wrap | None = None,
    ) -> None:
        self.group = group
        self.contract = contract
        self.wrap = wrap
        self._builtins = dict(builtins)
        self._entry_points = entry_points or (lambda g: metadata.entry_points(group=g))
        self._entries: dict[str, list[_Entry]] | None = None
        self._bad_names: list[PluginInfo] = []
        self._loaded: dict[str, Any] = {}

    @property
    def short_group(self) -> str:
        return self.group.split(".", 1)[1]

    def refresh(self) -> None:
        """Forget discovered entry points and loaded factories."""
        self._entries = None
        self._bad_names = []
        self._loaded.clear()

    def _discover(self) -> dict[str, list[_Entry]]:
        if self._entries is not None:
            return self._entries
        entries: dict[str, list[_Entry]] = {
            name: [_Entry(name, value, BUILTIN_DIST, _pagctl_version())]
            for name, value in self._builtins.items()
        }
        self._bad_names = []
        if not autoload_disabled():
            for ep in self._entry_points(self.group):
                dist = getattr(ep, "dist", None)
                dist_name = getattr(dist, "name", None) or "unknown distribution"
                version = getattr(dist, "version", None) or "?"
                if not NAME_RE.match(ep.name):
                    self._bad_names.append(PluginInfo(
                        ep.name, self.group, dist_name, version, "broken",
                        "invalid name: plugin names must match ^[a-z][a-z0-9_]*$", ""))
                    continue
                current = entries.setdefault(ep.name, [])
                if any(e.distribution == dist_name and e.value == ep.value for e in current):
                    continue  # the same distribution seen twice on sys.path
                current.append(_Entry(ep.name, ep.value, dist_name, version))
        self._entries = entries
        return entries

    def names(self) -> list[str]:
        return sorted(self._discover())

    def _resolve(self, name: str) -> _Entry:
        entries = self._discover()
        if name not in entries:
            names = sorted(entries)
            close = get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UnknownPluginError(
                f"unknown {self.short_group} plugin '{name}'.{hint} Available: "
                f"{', '.join(names)}. Install a package that provides it, or run "
                "'pagctl plugins' to list what is installed."
            )
        found = entries[name]
        if len(found) > 1:
            who = " and ".join(f"'{e.distribution}' ({e.value})" for e in found)
            raise PluginConflictError(
                f"{self.short_group} plugin '{name}' is provided by {who}; uninstall one of "
                "them (a built-in is never replaced silently)."
            )
        return found[0]

    def get(self, name: str) -> Any:
        """The factory registered as ``name`` (imported on first use)."""
        if name in self._loaded:
            return self._loaded[name]
        entry = self._resolve(name)
        try:
            factory = load_value(entry.value)
        except Exception as exc:  # any import-time failure of third-party code
            raise PluginLoadError(
                f"{self.short_group} plugin '{name}' from '{entry.distribution}' failed to "
                f"load ({type(exc).__name__}: {exc}); reinstall or fix that package."
            ) from exc
        problem = self.contract(factory)
        if problem is not None:
            raise PluginLoadError(
                f"{self.short_group} plugin '{name}' from '{entry.distribution}' ({entry.value})"
                f" {problem}")
        self._loaded[name] = factory
        return factory

    def validate_params(self, name: str, params: dict[str, Any], where: str) -> BaseModel:
        """Validate ``params`` against the plugin's ``Params``; errors name ``where.params.x``
        (``params.x`` when ``where`` is the parameters themselves, as in the Python API)."""
        from pagctl.spec import format_validation_error

        factory = self.get(name)
        prefix = where if where.rsplit(".", 1)[-1] == "params" else f"{where}.params"
        try:
            result: BaseModel = factory.Params.model_validate(params)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, prefix=prefix,
                                                    schema=f"pagctl plugins {name}",
                                                    model=factory.Params)) from None
        return result

    def build(self, ref: PluginRef, ctx: BuildContext, where: str) -> Any:
        """Validate the reference's params and build the plugin."""
        params = self.validate_params(ref.name, ref.params, where)
        return self.instantiate(ref.name, params, ctx, where)

    def origin(self, name: str) -> str:
        """Who provides ``name``: "built-in", or "distribution version"."""
        entry = self._resolve(name)
        if entry.distribution == BUILTIN_DIST:
            return "built-in"
        return f"{entry.distribution} {entry.version}"

    def instantiate(self, name: str, params: BaseModel, ctx: BuildContext, where: str) -> Any:
        """Call the factory once with already validated ``params``. A ``ValueError`` from
        the factory (e.g. "needs the training set") becomes a `FieldError` of ``where`` (the
        field or option that chose the plugin);
        any other exception a PluginRuntimeError naming the distribution. The plugin comes
        back through the registry's ``wrap`` when it has one (the target-gradient sources:
        :class:`GuardedSource`)."""
        factory = self.get(name)
        try:
            built = factory(params, ctx)
        except PagctlError as exc:
            if str(exc).startswith(where):
                raise
            raise type(exc)(f"{where}: {name}: {exc}") from None  # name the spec field
        except ValueError as exc:
            raise FieldError(where, f"{name}: {exc}") from None
        except Exception as exc:
            raise PluginRuntimeError(
                f"{self.short_group} plugin '{name}' ({self.origin(name)}) failed to build: "
                f"{type(exc).__name__}: {first_line(exc)}") from exc
        return built if self.wrap is None else self.wrap(built, name, self.origin(name))

    def info(self) -> list[PluginInfo]:
        """Every known plugin with its status; loads each one to check it."""
        rows: list[PluginInfo] = []
        for name, found in sorted(self._discover().items()):
            for entry in found:
                status, error, summary = "ok", None, ""
                if len(found) > 1:
                    others = ", ".join(e.distribution for e in found if e is not entry)
                    status, error = "conflict", f"also provided by {others}"
                else:
                    try:
                        summary = _summary(self.get(name))
                    except PluginLoadError as exc:
                        status, error = "broken", str(exc)
                rows.append(PluginInfo(name, self.group, entry.distribution, entry.version,
                                       status, error, summary))
        return rows + list(self._bad_names)


class GuardedSource:
    """A target-gradient source whose every call is checked against the contract
    (`pagctl.protocols.check_source_output`): an exception or a broken rule becomes one
    error naming the plugin and its distribution. ``requires_index``, ``disables_pag`` and
    ``reseed`` are the wrapped source's (`pagctl.protocols`)."""

    def __init__(self, inner: Any, name: str, origin: str) -> None:
        self._inner = inner
        self._who = f"target-gradient source '{name}' ({origin})"
        self.requires_index = requires_index(inner)
        self.disables_pag = disables_pag(inner)

    def __call__(self, inputs: Any, labels: Any, classes: Any, *, index: Any = None) -> Any:
        try:
            out = self._inner(inputs, labels, classes, index=index)
        except PagctlError:
            raise
        except Exception as exc:
            raise raised(self._who, exc) from exc
        check_source_output(self._who, inputs, classes, out)
        return out

    def reseed(self, seed: int) -> None:
        """The wrapped source's ``reseed``, if it has one (`pagctl.protocols.reseed_source`)."""
        try:
            reseed_source(self._inner, seed)
        except PagctlError:
            raise
        except Exception as exc:
            raise raised(self._who, exc) from exc


target_gradients = Registry("pagctl.target_gradients", BUILTIN_TARGET_GRADIENTS,
                            wrap=GuardedSource)
attacks = Registry("pagctl.attacks", BUILTIN_ATTACKS)
models = Registry("pagctl.models", BUILTIN_MODELS, contract=model_provider_problem)
REGISTRIES = {"target_gradients": target_gradients, "attacks": attacks, "models": models}
