"""The three small architectures pagctl registers in timm's registry.

Importing this module (``import pagctl.models`` does) registers them, so that plain
``timm.create_model(name)`` finds them afterwards:

- ``pagctl_small_cnn``: conv 32 → conv 64 → pool → conv 128 → pool → GAP → linear
  (3×3 convs, BatchNorm, ReLU); the calibration recipe for the embedded digits;
- ``pagctl_cifar_resnet18``: the CIFAR-style ResNet-18 of the official code (3×3 stride-1
  stem, no max-pool, BasicBlocks [2, 2, 2, 2], widths 64–512), 11,173,962 parameters for
  10 classes;
- ``pagctl_mlp``: flatten → Linear → ReLU → Linear → ReLU → Linear, for the 2-D toy data.

None of them uses in-place operations, so they work with double backpropagation and
``torch.func``. timm's own ResNet is not used for the CIFAR ResNet-18: it cannot build a
3×3 stride-1 stem without max-pool, and its blocks use in-place ReLU and ``x += shortcut``.
They share timm's head interface (``forward_head``, ``get_classifier``,
``reset_classifier``) and have no pretrained weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from timm.models import register_model
from timm.models._builder import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._registry import generate_default_cfgs
from torch import Tensor, nn

__all__ = ["CifarResNet", "MLP", "SmallCNN"]


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
        out: Tensor = self.pool2(self.conv3(x))
        return out

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
        result: Tensor = self.act2(out + shortcut)
        return result


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
        out: Tensor = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return out

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
        out: Tensor = self.act2(self.fc2(self.act1(self.fc1(x.flatten(1)))))
        return out

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


@register_model  # type: ignore[untyped-decorator, unused-ignore]  # untyped in timm < 1.0.10
def pagctl_small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """Small CNN of the digits recipe; kwargs: num_classes, in_chans, width, drop_rate."""
    model: SmallCNN = _create(SmallCNN, "pagctl_small_cnn", pretrained, kwargs)
    return model


@register_model  # type: ignore[untyped-decorator, unused-ignore]  # untyped in timm < 1.0.10
def pagctl_cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-18 (11.17 M parameters for 10 classes); kwargs: num_classes, in_chans,
    channels, drop_rate."""
    kwargs.setdefault("layers", (2, 2, 2, 2))
    model: CifarResNet = _create(CifarResNet, "pagctl_cifar_resnet18", pretrained, kwargs)
    return model


@register_model  # type: ignore[untyped-decorator, unused-ignore]  # untyped in timm < 1.0.10
def pagctl_mlp(pretrained: bool = False, **kwargs: Any) -> MLP:
    """Three-layer ReLU MLP for low-dimensional inputs; kwargs: num_classes, in_chans,
    in_features, hidden, drop_rate."""
    model: MLP = _create(MLP, "pagctl_mlp", pretrained, kwargs)
    return model
