"""Architectures by timm name, wrapped with the input normalisation.

Importing this module registers the three small architectures of `pagctl.architectures`
(``pagctl_small_cnn``, ``pagctl_cifar_resnet18``, ``pagctl_mlp``) in timm's registry, so
that plain ``timm.create_model(name)`` finds them afterwards.

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
import re
from collections.abc import Iterator, Mapping, Sequence
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
from pagctl.errors import CheckpointError, SpecError
from pagctl.spec import ModelSpec

# the pagctl_* entry points are listed last, where timm's register_model used to append them
__all__ = [
    "CifarResNet",
    "MLP",
    "NormalizedModel",
    "SmallCNN",
    "build_model",
    "check_finite_outputs",
    "eval_mode",
    "rebuild_from_config",
    "timm_config",
    "pagctl_small_cnn",
    "pagctl_cifar_resnet18",
    "pagctl_mlp",
]

_SOURCE_PREFIXES = ("hf-hub:", "local-dir:")  # timm model sources; timm resolves those itself
_RESERVED_KWARGS = ("num_classes", "in_chans")


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


def _unknown_arch_message(arch: str) -> str:
    close = difflib.get_close_matches(arch, timm.list_models(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (f"model.arch: unknown architecture '{arch}'{hint} "
            "(any timm name, e.g. pagctl_small_cnn)")


def build_model(spec: ModelSpec, *, num_classes: int, in_chans: int,
                default_mean: Sequence[float], default_std: Sequence[float],
                allow_download: bool = False) -> NormalizedModel:
    """Create ``spec.arch`` with timm for the data's classes and channels, wrapped with the
    normalisation ``spec.mean``/``spec.std`` (or the dataset's defaults when null).

    Pretrained weights (``kwargs.pretrained``) come from the network unless
    ``kwargs.pretrained_cfg_overlay`` names a local ``file``; nothing reaches the network
    unless ``allow_download`` (``--download``) says so.

    Raises `SpecError` (one line, dotted path) for an unknown architecture, bad kwargs, a
    download not allowed, or mean/std whose length does not match the data's channels.
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
    base = spec.arch.split(".", 1)[0]
    if not spec.arch.startswith(_SOURCE_PREFIXES) and not timm.is_model(base):
        raise SpecError(_unknown_arch_message(spec.arch))
    overlay = spec.kwargs.get("pretrained_cfg_overlay")
    local = isinstance(overlay, dict) and bool(overlay.get("file"))
    if (spec.kwargs.get("pretrained") or spec.arch.startswith("hf-hub:")) and not local \
            and not allow_download:
        raise SpecError(f"model.kwargs.pretrained: {spec.arch}'s pretrained weights come from "
                        "the network; pass --download to allow it, or name a local file with "
                        "model.kwargs.pretrained_cfg_overlay={file: PATH}")
    try:
        net = timm.create_model(spec.arch, num_classes=num_classes, in_chans=in_chans,
                                **spec.kwargs)
    except TypeError as exc:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if bad is not None:
            raise SpecError(f"model.kwargs.{bad.group(1)}: not an argument of {spec.arch}; "
                            "remove it (see the architecture's signature in timm)") from exc
        raise SpecError(f"model.kwargs: {spec.arch} rejected {_short(dict(spec.kwargs))}: "
                        f"{_first(exc)}") from exc
    except (ValueError, AssertionError, RuntimeError, KeyError, OSError) as exc:
        raise SpecError(f"model.kwargs: {spec.arch} rejected {_short(dict(spec.kwargs))}: "
                        f"{_first(exc)}") from exc
    return NormalizedModel(net, mean, std)


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


def rebuild_from_config(cfg: Mapping[str, Any], state_dict: Mapping[str, Tensor],
                        ) -> NormalizedModel:
    """Rebuild a `NormalizedModel` from `timm_config`'s dict and ``net``'s weights, in eval
    mode. Raises `CheckpointError` when the config is malformed or the weights do not fit."""
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
    if not timm.is_model(arch.split(".", 1)[0]):
        raise CheckpointError(f"config.json: {_unknown_arch_message(arch)}")
    try:
        net = timm.create_model(arch, num_classes=num_classes, **model_args)
        net.load_state_dict(dict(state_dict), strict=True)
        model = NormalizedModel(net, mean, std)
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"config.json: cannot rebuild {arch} from its weights: {first}") \
            from exc
    return model.eval()


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


def check_finite_outputs(outputs: Tensor, where: str) -> None:
    """ModelError naming ``where`` when a model's outputs hold NaN or infinite values: every
    number measured on them (accuracies, gradients, alignments) would be meaningless.
    Shape: (N, num_classes)."""
    from pagctl.errors import ModelError

    bad = ~torch.isfinite(outputs).all(dim=1)
    if bool(bad.any()):
        raise ModelError(f"{where}: the model's outputs are NaN or infinite for "
                         f"{int(bad.sum())} of {outputs.shape[0]} points; its weights are "
                         "broken (check the run, or retrain with a lower train.lr)")
