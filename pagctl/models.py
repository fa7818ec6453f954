"""Architectures by timm name, wrapped with the input normalisation.

Importing this module registers three small architectures in timm's registry, so that plain
``timm.create_model(name)`` finds them afterwards:

- ``pagctl_small_cnn``: conv 32 → conv 64 → pool → conv 128 → pool → GAP → linear
  (3×3 convs, BatchNorm, ReLU); the digits recipe of the paper digest §9;
- ``pagctl_cifar_resnet18``: the CIFAR-style ResNet-18 of the official code (3×3 stride-1
  stem, no max-pool, BasicBlocks [2, 2, 2, 2], widths 64–512), 11,173,962 parameters for
  10 classes;
- ``pagctl_mlp``: flatten → Linear → ReLU → Linear → ReLU → Linear, for the 2-D toy data.

None of them uses in-place operations, so they work with double backpropagation and
``torch.func``. timm's own ResNet is not used for the CIFAR ResNet-18: it cannot build a
3×3 stride-1 stem without max-pool, and its blocks use in-place ReLU and ``x += shortcut``.

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
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models._builder import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._registry import generate_default_cfgs
from torch import Tensor, nn

from pagctl.errors import CheckpointError, SpecError
from pagctl.spec import ModelSpec

__all__ = [
    "CifarResNet",
    "MLP",
    "NormalizedModel",
    "SmallCNN",
    "build_model",
    "rebuild_from_config",
    "timm_config",
]

_SOURCE_PREFIXES = ("hf-hub:", "local-dir:")  # timm model sources; timm resolves those itself
_RESERVED_KWARGS = ("num_classes", "in_chans")


# ---------------------------------------------------------------------------------------
# architectures


class _ClassifierHead:
    """timm's head interface, shared by the pagctl architectures.

    A head is dropout (functional, not in-place) then ``fc``; ``num_classes=0`` gives an
    identity head (timm's convention for feature extractors).
    """

    num_classes: int
    num_features: int
    drop_rate: float
    fc: nn.Module
    training: bool

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Shape: features (N, F) or (N, F, H, W) -> logits (N, num_classes) or (N, F)."""
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the last layer with a fresh one for ``num_classes`` (0: identity)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = _linear(self.num_features, num_classes)


def _linear(in_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def _conv_bn_relu(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=False),
        bn=nn.BatchNorm2d(out_chs),
        act=nn.ReLU(),
    ))


class SmallCNN(_ClassifierHead, nn.Module):
    """conv 32 → conv 64 → max-pool → conv 128 → max-pool → global average pool → linear.

    Every conv is 3×3 (padding 1) + BatchNorm + ReLU; ``width`` scales the three widths.
    Shape: (N, C, H, W) with H, W >= 4 (8×8 digits, 28×28, 32×32, 96×96) -> (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        c1, c2, c3 = (max(1, round(c * width)) for c in (32, 64, 128))
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = c3
        self.conv1 = _conv_bn_relu(in_chans, c1)
        self.conv2 = _conv_bn_relu(c1, c2)
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = _conv_bn_relu(c2, c3)
        self.pool2 = nn.MaxPool2d(2)
        self.fc = _linear(c3, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Shape: (N, C, H, W) -> (N, num_features, H/4, W/4)."""
        x = self.pool1(self.conv2(self.conv1(x)))
        return self.pool2(self.conv3(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class _BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN) shortcut; no in-place ops."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + shortcut)


class CifarResNet(_ClassifierHead, nn.Module):
    """CIFAR-style ResNet with BasicBlocks: 3×3 stride-1 stem, no max-pool, four stages
    (strides 1, 2, 2, 2), global average pool, linear. PyTorch default initialisation
    (as the official code's model).

    Shape: (N, C, H, W) -> (N, num_classes); 32×32 inputs give 4×4 final feature maps.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3,
                 layers: Sequence[int] = (2, 2, 2, 2),
                 channels: Sequence[int] = (64, 128, 256, 512), drop_rate: float = 0.0) -> None:
        super().__init__()
        if len(layers) != 4 or len(channels) != 4:
            raise ValueError("layers and channels must have 4 entries each")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = int(channels[-1])
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU()
        in_chs = int(channels[0])
        stages: list[nn.Sequential] = []
        for i, (depth, out_chs) in enumerate(zip(layers, channels, strict=True)):
            blocks = []
            for j in range(int(depth)):
                blocks.append(_BasicBlock(in_chs, int(out_chs), 2 if (i > 0 and j == 0) else 1))
                in_chs = int(out_chs)
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = _linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Shape: (N, C, H, W) -> (N, num_features, H/8, W/8)."""
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class MLP(_ClassifierHead, nn.Module):
    """flatten → Linear(in_features, hidden) → ReLU → Linear(hidden, hidden) → ReLU → Linear.

    ``in_features`` defaults to ``in_chans`` (inputs shaped (C, 1, 1), as the toy data);
    give it explicitly for larger images (C·H·W).
    Shape: (N, C, H, W) with C·H·W == in_features -> (N, num_classes).
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 2, in_features: int | None = None,
                 hidden: int = 64, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.in_features = in_chans if in_features is None else in_features
        self.drop_rate = drop_rate
        self.num_features = hidden
        self.fc1 = nn.Linear(self.in_features, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.fc = _linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Shape: (N, C, H, W) -> (N, hidden)."""
        return self.act2(self.fc2(self.act1(self.fc1(x.flatten(1)))))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(input_size: tuple[int, int, int], num_classes: int, first_conv: str | None,
         ) -> dict[str, Any]:
    return {
        "input_size": input_size, "num_classes": num_classes, "mean": (0.5,) * input_size[0],
        "std": (0.5,) * input_size[0], "interpolation": "bilinear", "crop_pct": 1.0,
        "first_conv": first_conv, "classifier": "fc", "license": "mit",
    }


# timm looks these up by entry-point name at registration (no weights: no url / hub id).
default_cfgs = generate_default_cfgs({
    "pagctl_small_cnn": _cfg((3, 32, 32), 10, "conv1.conv"),
    "pagctl_cifar_resnet18": _cfg((3, 32, 32), 10, "conv1"),
    "pagctl_mlp": _cfg((2, 1, 1), 2, None),
})


def _create(cls: type[nn.Module], variant: str, pretrained: bool, kwargs: dict[str, Any],
            ) -> Any:
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"),
                                     kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.has_weights or cfg.state_dict is not None):
            raise ValueError(
                f"{variant} has no pretrained weights; use pretrained=False, or load a pagctl "
                "run folder with timm.create_model('local-dir:RUN_DIR', pretrained=True)"
            )
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


@register_model
def pagctl_small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """Small CNN of the digits recipe; kwargs: num_classes, in_chans, width, drop_rate."""
    model: SmallCNN = _create(SmallCNN, "pagctl_small_cnn", pretrained, kwargs)
    return model


@register_model
def pagctl_cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-18 (11.17 M parameters for 10 classes); kwargs: num_classes, in_chans,
    channels, drop_rate."""
    kwargs.setdefault("layers", (2, 2, 2, 2))
    model: CifarResNet = _create(CifarResNet, "pagctl_cifar_resnet18", pretrained, kwargs)
    return model


@register_model
def pagctl_mlp(pretrained: bool = False, **kwargs: Any) -> MLP:
    """Three-layer ReLU MLP for low-dimensional inputs; kwargs: num_classes, in_chans,
    in_features, hidden, drop_rate."""
    model: MLP = _create(MLP, "pagctl_mlp", pretrained, kwargs)
    return model


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
        return int(getattr(self.net, "num_classes"))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)  # type: ignore[no-any-return]


def _unknown_arch_message(arch: str) -> str:
    close = difflib.get_close_matches(arch, timm.list_models(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (f"model.arch: unknown architecture '{arch}'{hint} "
            "(any timm name, e.g. pagctl_small_cnn)")


def build_model(spec: ModelSpec, *, num_classes: int, in_chans: int,
                default_mean: Sequence[float], default_std: Sequence[float]) -> NormalizedModel:
    """Create ``spec.arch`` with timm for the data's classes and channels, wrapped with the
    normalisation ``spec.mean``/``spec.std`` (or the dataset's defaults when null).

    Raises `SpecError` (one line, dotted path) for an unknown architecture, bad kwargs, or
    mean/std whose length does not match the data's channels.
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
    try:
        net = timm.create_model(spec.arch, num_classes=num_classes, in_chans=in_chans,
                                **spec.kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"model.kwargs: {spec.arch} rejected {dict(spec.kwargs)!r}: {detail}") \
            from exc
    return NormalizedModel(net, mean, std)


# ---------------------------------------------------------------------------------------
# timm-compatible config


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
