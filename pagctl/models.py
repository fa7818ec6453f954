"""Architectures by name, wrapped with the input normalisation.

An architecture name (``model.arch``) is one of, in this order (`create_network`):

- ``package.module:factory``: any callable returning an ``nn.Module`` (a RobustBench-style
  class, a function in a script), imported as Python would from the current folder;
- a model provider of the ``pagctl.models`` entry-point group (`pagctl.registry.models`):
  pagctl's own ``pagctl_small_cnn``, ``pagctl_cifar_resnet18``, ``pagctl_mlp`` and whatever
  installed packages provide;
- a RobustBench zoo entry, ``robustbench:<name>`` with ``dataset`` and ``threat_model`` in
  ``model.kwargs`` (`pagctl.robustbench_zoo`), built by the installed ``robustbench``
  package;
- a timm name (``resnet18``, ``hf-hub:…``, ``local-dir:…``).

Factories get ``num_classes`` and ``in_chans`` when their signature names them (or takes
``**kwargs``), and ``model.kwargs``. Importing this module also registers pagctl's three
architectures in timm's registry, so that plain ``timm.create_model(name)`` finds them.

Inputs are always pixels in [0, 1]; the per-channel normalisation lives inside
`NormalizedModel`, so attacks and target-gradient sources never see normalised tensors.
A run saves ``model.net.state_dict()`` (safetensors) and `timm_config` (config.json), from
which plain timm rebuilds the network: ``timm.create_model(cfg["architecture"],
num_classes=cfg["num_classes"], **cfg["model_args"])``; or, with both files in one folder,
``timm.create_model("local-dir:RUN_DIR", pretrained=True)``. The ``pagctl_*`` names need
``import pagctl.models`` first; every other timm architecture needs only timm.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import timm
import torch
from torch import Tensor, nn

from pagctl.architectures import (
    MLP,
    CifarResNet,
    SmallCNN,
    pagctl_cifar_resnet18,
    pagctl_mlp,
    pagctl_small_cnn,
)
from pagctl.errors import CheckpointError, PagctlError, SpecError, UntrustedCodeError
from pagctl.spec import ModelSpec
from pagctl.trust import TIMM_SOURCES, UNTRUSTED, CodeTrust, is_import_path

# the pagctl_* entry points are listed last, where timm's register_model used to append them
__all__ = [
    "PRECISIONS",
    "CifarResNet",
    "LowPrecision",
    "MLP",
    "NormalizedModel",
    "SmallCNN",
    "build_model",
    "check_finite_outputs",
    "create_network",
    "eval_mode",
    "import_factory",
    "rebuild_from_config",
    "timm_config",
    "pagctl_small_cnn",
    "pagctl_cifar_resnet18",
    "pagctl_mlp",
]

_RESERVED_KWARGS = ("num_classes", "in_chans")
_WEIGHT_LOADING_KWARGS = ("pretrained", "pretrained_cfg_overlay", "checkpoint_path",
                          "cache_dir")
"""timm keywords that fetch or read weights: left out when a run folder's network is rebuilt,
whose weights come from its own safetensors file."""


# ---------------------------------------------------------------------------------------
# normalisation wrapper


class NormalizedModel(nn.Module):
    """``net((x - mean) / std)``: a timm model behind per-channel input normalisation.

    Shape: inputs (N, C, H, W) pixels in [0, 1] -> logits (N, num_classes).
    ``mean`` and ``std`` are non-persistent buffers shaped (1, C, 1, 1): they follow
    ``.to(device)`` but are not part of ``state_dict()``; a run stores them in config.json
    and the weights are ``net.state_dict()``.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} entries but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"every std entry must be > 0, got {tuple(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1),
                             persistent=False)

    @property
    def num_classes(self) -> int:
        value: Any = self.net.num_classes  # a plain int attribute of timm models
        return int(value)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net((x - self.mean) / self.std)
        return logits


PRECISIONS = ("float32", "bfloat16")
"""What an evaluation computes the model's forward in: float32 (the default), or bfloat16
autocast (`LowPrecision`, opt-in, marked in the record)."""


class LowPrecision(nn.Module):
    """``model`` run under bfloat16 autocast, its logits returned as float32: opt-in
    mixed-precision evaluation (``pagctl attack --precision bfloat16``). The attacks, their
    steps and the budget checks stay float32; only the model's forward (and the backward
    through it) is in bfloat16.

    Shape: (N, C, H, W) -> (N, num_classes) float32.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            logits: Tensor = self.model(x)
        return logits.float()


def _unknown_arch_message(arch: str) -> str:
    from pagctl import registry

    close = difflib.get_close_matches(arch, registry.models.names() + timm.list_models(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (f"model.arch: unknown architecture {arch!r}{hint} (a timm name, a model provider "
            "listed by 'pagctl plugins', or package.module:factory)")


def import_factory(path: str, where: str = "model.arch") -> Callable[..., Any]:
    """The callable that ``package.module:attr`` names (`pagctl.registry.load_value`, as
    entry points are loaded). The module is imported as ``python`` would find it from the
    current folder (which is appended to ``sys.path``, after the installed packages, so it
    never shadows them). SpecError naming ``where`` when the module cannot be imported,
    lacks the name, or the name is not callable."""
    from pagctl.registry import load_value

    module_name, _, attr = path.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        obj = load_value(path)
    except ModuleNotFoundError as exc:
        raise SpecError(f"{where}: cannot import '{module_name}' ({exc}); install it, or run "
                        f"from the folder that holds {module_name.replace('.', '/')}.py") from None
    except AttributeError as exc:
        raise SpecError(f"{where}: '{module_name}' has no '{attr}' ({_first(exc)}); check the "
                        "name after the colon") from None
    except Exception as exc:  # the module's own code failed
        raise SpecError(f"{where}: importing '{module_name}' failed: "
                        f"{type(exc).__name__}: {_first(exc)}") from exc
    if not callable(obj):
        raise SpecError(f"{where}: '{path}' is not callable; name a function or class that "
                        "returns an nn.Module")
    return obj  # type: ignore[no-any-return]


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def create_network(arch: str, *, num_classes: int, in_chans: int,
                   kwargs: Mapping[str, Any], trust: CodeTrust = UNTRUSTED,
                   where: str = "model.arch",
                   folder: str | None = None) -> nn.Module:
    """The bare network ``arch`` names (see the module docstring for the four routes).
    A ``package.module:factory`` is imported only when ``trust`` allows it
    (`pagctl.trust`; UntrustedCodeError naming ``where``, and ``folder`` when the name was
    read from a run folder). Errors are the factory's own (TypeError for a keyword it does
    not take, ...), except SpecError for a name that is none of the three or a factory that
    returns no module."""
    from pagctl import registry
    from pagctl.robustbench_zoo import create_zoo_network, is_zoo_name

    if is_zoo_name(arch):
        return create_zoo_network(arch, kwargs)
    if is_import_path(arch):
        trust.require(arch, where, folder=folder)
        factory = import_factory(arch)
    elif arch in registry.models.names():
        origin = registry.models.origin(arch)
        if origin != "built-in" and timm.is_model(arch):
            raise SpecError(f"model.arch: '{arch}' is both a timm architecture and a model "
                            f"provider of {origin}; that package must rename its provider")
        factory = registry.models.get(arch)
    else:
        if not arch.startswith(TIMM_SOURCES) and not timm.is_model(arch.split(".", 1)[0]):
            raise SpecError(_unknown_arch_message(arch))
        net: nn.Module = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans,
                                           **kwargs)
        return net
    given = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if _accepts(factory, key):
            given[key] = value
    built = factory(**given)
    if not isinstance(built, nn.Module):
        raise SpecError(f"model.arch: {arch} returned {type(built).__name__}, not a "
                        "torch.nn.Module")
    return built


def build_model(spec: ModelSpec, *, num_classes: int, in_chans: int,
                default_mean: Sequence[float], default_std: Sequence[float],
                trust: CodeTrust = UNTRUSTED, allow_download: bool = False,
                ) -> NormalizedModel:
    """Create ``spec.arch`` with timm for the data's classes and channels, wrapped with the
    normalisation ``spec.mean``/``spec.std`` (or the dataset's defaults when null).

    Pretrained weights (``kwargs.pretrained``) come from the network unless
    ``kwargs.pretrained_cfg_overlay`` names a local ``file``; nothing reaches the network
    unless ``allow_download`` (``--download``) says so.

    ``trust``: whether a ``package.module:factory`` architecture may be imported
    (`pagctl.trust`). Raises `SpecError` (one line, dotted path) for an unknown or untrusted
    architecture, bad kwargs, a download not allowed, mean/std whose length does not match
    the data's channels, or an architecture whose own code fails (`_build_error` says
    whether that is a keyword's fault or the code's).
    """
    mean = tuple(spec.mean) if spec.mean is not None else tuple(default_mean)
    std = tuple(spec.std) if spec.std is not None else tuple(default_std)
    for field, values, given in (("mean", mean, spec.mean), ("std", std, spec.std)):
        if len(values) != in_chans:
            where = "" if given is not None else " (the dataset's default)"
            raise SpecError(f"model.{field}: has {len(values)} entries{where} but the data has "
                            f"{in_chans} channel(s); give {in_chans} values or null")
    for key in _RESERVED_KWARGS:
        if key in spec.kwargs:
            raise SpecError(f"model.kwargs.{key}: set from the dataset ({num_classes} classes, "
                            f"{in_chans} channels); remove it")
    overlay = spec.kwargs.get("pretrained_cfg_overlay")
    local = isinstance(overlay, dict) and bool(overlay.get("file"))
    if (spec.kwargs.get("pretrained") or spec.arch.startswith("hf-hub:")) and not local \
            and not allow_download:
        raise SpecError(f"model.kwargs.pretrained: {spec.arch}'s pretrained weights come from "
                        "the network; pass --download to allow it, or name a local file with "
                        "model.kwargs.pretrained_cfg_overlay={file: PATH}")
    try:
        net = create_network(spec.arch, num_classes=num_classes, in_chans=in_chans,
                             kwargs=spec.kwargs, trust=trust)
    except PagctlError:
        raise
    except Exception as exc:  # the architecture's own code (a factory, timm) failed
        raise _build_error(spec, exc) from exc
    return NormalizedModel(net, mean, std)


def _build_error(spec: ModelSpec, exc: Exception) -> SpecError:
    """The one-line error for ``spec.arch`` failing to build. It names a keyword of
    ``model.kwargs`` only when the failure is about that keyword: one the architecture does
    not take (a TypeError naming a keyword the user gave), or one it needs and was not given;
    anything else the architecture's own code raised is blamed on ``model.arch`` (a
    factory's bug is not its keywords' fault), with the keywords it was given, if any."""
    text = str(exc)
    if isinstance(exc, TypeError):
        bad = re.search(r"unexpected keyword argument '(\w+)'", text)
        if bad is not None and bad.group(1) in spec.kwargs:
            return SpecError(f"model.kwargs.{bad.group(1)}: not an argument of {spec.arch}; "
                             "remove it (see the architecture's signature)")
        need = re.search(r"missing \d+ required (?:positional |keyword-only )?arguments?: "
                         r"'(\w+)'", text)
        if need is not None and need.group(1) not in spec.kwargs:
            name = need.group(1)
            return SpecError(f"model.kwargs.{name}: {spec.arch} needs it ({_first(exc)}); "
                             f"give it with --set model.kwargs.{name}=VALUE")
    given = f" (given model.kwargs {_short(dict(spec.kwargs))})" if spec.kwargs else ""
    return SpecError(f"model.arch: {spec.arch} raised {type(exc).__name__}: {_first(exc)}"
                     f"{given}; the architecture's own code failed: fix it, or what it is "
                     "given")


# ---------------------------------------------------------------------------------------
# timm-compatible config


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:119] + "…"


def _short_float(value: float) -> float:
    """The shortest decimal that round-trips the float32 value (0.4914, not 0.49139998...)."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))


def timm_config(model: NormalizedModel, spec: ModelSpec, num_classes: int, in_chans: int,
                input_size: Sequence[int], *,
                class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """A timm ``config.json`` for ``model.net``'s weights.

    Plain timm rebuilds the network with ``timm.create_model(cfg["architecture"],
    num_classes=cfg["num_classes"], **cfg["model_args"])`` and ``load_state_dict`` of the
    saved ``model.net.state_dict()``; the normalisation is ``pretrained_cfg.mean/std``.
    ``input_size`` is (C, H, W); ``spec.kwargs`` must be JSON-serialisable (they come from
    a YAML/JSON spec).
    """
    size = [int(s) for s in input_size]
    if len(size) != 3 or size[0] != in_chans:
        raise ValueError(f"input_size must be (C={in_chans}, H, W), got {tuple(input_size)}")
    own = dict(getattr(model.net, "pretrained_cfg", None) or {})
    pretrained_cfg: dict[str, Any] = {
        "input_size": size,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [_short_float(v) for v in model.mean.flatten().tolist()],
        "std": [_short_float(v) for v in model.std.flatten().tolist()],
        "num_classes": num_classes,
    }
    for key in ("first_conv", "classifier", "fixed_input_size"):
        if own.get(key) is not None:
            pretrained_cfg[key] = own[key]
    if class_names is not None:
        pretrained_cfg["label_names"] = list(class_names)
    cfg: dict[str, Any] = {"architecture": spec.arch, "num_classes": num_classes}
    num_features = getattr(model.net, "num_features", None)
    if isinstance(num_features, int):
        cfg["num_features"] = num_features
    cfg["model_args"] = {"in_chans": in_chans, **spec.kwargs}
    cfg["pretrained_cfg"] = pretrained_cfg
    return cfg


def rebuild_from_config(cfg: Mapping[str, Any], state_dict: Mapping[str, Tensor], *,
                        trust: CodeTrust = UNTRUSTED, folder: str = "the run folder",
                        ) -> NormalizedModel:
    """Rebuild a `NormalizedModel` from `timm_config`'s dict (read from the run folder
    ``folder``) and ``net``'s weights, in eval mode. The weights are these: timm keywords
    that would fetch or read others (``pretrained``, ``checkpoint_path``, ...) are left
    out. A ``package.module:factory`` architecture is imported only when ``trust`` allows
    it. Raises `CheckpointError` when the config is malformed or the weights do not fit,
    UntrustedCodeError for code the user has not trusted."""
    try:
        arch = str(cfg["architecture"])
        num_classes = int(cfg["num_classes"])
        model_args = dict(cfg.get("model_args", {}))
        mean = [float(v) for v in cfg["pretrained_cfg"]["mean"]]
        std = [float(v) for v in cfg["pretrained_cfg"]["std"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: malformed timm config ({exc!r}); "
                              "expected architecture, num_classes, model_args, "
                              "pretrained_cfg.mean/std") from exc
    in_chans = int(model_args.pop("in_chans", 3))
    for key in _WEIGHT_LOADING_KWARGS:
        model_args.pop(key, None)
    _check_source(arch, trust, folder)
    try:
        net = create_network(arch, num_classes=num_classes, in_chans=in_chans,
                             kwargs=model_args, trust=trust,
                             where=f"{folder}/config.json: architecture", folder=folder)
        net.load_state_dict(dict(state_dict), strict=True)
        model = NormalizedModel(net, mean, std)
    except UntrustedCodeError:
        raise
    except SpecError as exc:  # the architecture cannot be found or built
        raise CheckpointError(f"config.json: {str(exc).removeprefix('model.arch: ')}") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"config.json: cannot rebuild {arch} from its weights: {first}") \
            from exc
    return model.eval()


def _check_source(arch: str, trust: CodeTrust, folder: str) -> None:
    """A run folder's architecture that reaches outside it (timm's ``hf-hub:``, which fetches
    its configuration from the network, or ``local-dir:`` a folder elsewhere, whose
    config.json timm reads) is followed only under ``--trust-code``: what a folder from
    elsewhere names is data, and so is where it would send pagctl."""
    if trust.everything:
        return
    where = f"{folder}/config.json: architecture {arch!r}"
    if arch.startswith("hf-hub:"):
        raise UntrustedCodeError(
            f"{where} makes timm fetch its configuration from the Hugging Face Hub; pagctl "
            "reaches the network for a run folder only when asked: pass --trust-code "
            "(trust_code=True in the Python API) if you trust its source")
    if arch.startswith("local-dir:"):
        from pathlib import Path

        target = Path(arch.removeprefix("local-dir:")).expanduser().resolve()
        if not target.is_relative_to(Path(folder).resolve()):
            raise UntrustedCodeError(
                f"{where} makes timm read {target}, outside the run folder; pass "
                "--trust-code (trust_code=True in the Python API) if you trust its source")


def twice_differentiable(model: nn.Module) -> int:
    """Switch off fused attention (timm's ``fused_attn``, torch's
    ``scaled_dot_product_attention``) in every module that has the switch, and return how
    many were switched. The fused CPU and flash kernels have no second derivative, which the
    PAG loss needs (it differentiates input gradients); the unfused path computes the same
    softmax(QKᵀ/√d)·V step by step. Nothing else changes: not the weights, not the saved
    model."""
    count = 0
    for module in model.modules():
        if getattr(module, "fused_attn", None) is True:
            setattr(module, "fused_attn", False)  # noqa: B010 - a plain attribute, not a Module
            count += 1
    return count


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode; restore each module's own flag afterwards (attacks,
    alignment scores and probes evaluate a model without changing how the caller left it)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


_TRAINED_HINT = "its weights are broken (check the run, or retrain with a lower train.lr)"
"""`check_finite_outputs`' advice for a model pagctl trained."""


def check_finite_outputs(outputs: Tensor, where: str, hint: str = _TRAINED_HINT) -> None:
    """ModelError naming ``where`` when a model's outputs hold NaN or infinite values: every
    number measured on them (accuracies, gradients, alignments) would be meaningless.
    ``hint``: what to do, which depends on where the weights came from (a run trained with
    too large a learning rate, by default; an imported checkpoint for ``pagctl import``).
    Shape: (N, num_classes)."""
    from pagctl.errors import ModelError

    bad = ~torch.isfinite(outputs).all(dim=1)
    if bool(bad.any()):
        raise ModelError(f"{where}: the model's outputs are NaN or infinite for "
                         f"{int(bad.sum())} of {outputs.shape[0]} points; {hint}")
