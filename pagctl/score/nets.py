"""The networks inside a score model: a small U-Net for images and a residual MLP.

`pagctl.score.model.ScoreModel` wraps one of them with the EDM preconditioning. Both take
the preconditioned input and one embedding per example (the noise level's `NoiseEmbedding`
plus the class embedding, summed) that every block adds to its features. Output layers start
at zero, so an untrained model predicts ε̂ = σ·c_in²·x̃.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def _zeroed(module: M) -> M:
    """``module`` with every parameter set to 0 (an output layer that starts silent)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def _groups(channels: int) -> int:
    """GroupNorm groups: the largest of 32, 16, 8, 4, 2 that leaves ≥ 4 channels a group."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise = log(σ)/4 at fixed geometric frequencies, then an MLP.
    Shape: (N,) -> (N, dim)."""

    freqs: Tensor

    def __init__(self, dim: int, features: int = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(64.0), features)),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))  # type: ignore[no-any-return]


class _ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + embedding, GroupNorm → SiLU → dropout → conv, + skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zeroed(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip: nn.Module = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h  # type: ignore[no-any-return]


class ScoreUNet(nn.Module):
    """A DDPM-style U-Net: per level ``blocks`` residual blocks, stride-2 conv down,
    nearest-neighbour + conv up, skip connections by concatenation."""

    def __init__(self, channels: int, width: int, mult: Sequence[int], blocks: int,
                 emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [width]
        ch = width
        for level, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(_ResBlock(ch, width * m, emb_dim, dropout))
                ch = width * m
                skips.append(ch)
            if level < len(mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([_ResBlock(ch, ch, emb_dim, dropout),
                                  _ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            for _ in range(blocks + 1):
                self.up.append(_ResBlock(ch + skips.pop(), width * mult[level], emb_dim,
                                         dropout))
                ch = width * mult[level]
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = _zeroed(nn.Conv2d(ch, channels, 3, padding=1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for layer in self.up:
            if isinstance(layer, _ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # type: ignore[no-any-return]


class _MLPBlock(nn.Module):
    """h + fc2(dropout(SiLU(fc1(SiLU(LayerNorm(h))) + emb)))."""

    def __init__(self, width: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        out: Tensor = h + self.fc2(self.drop(F.silu(z)))
        return out


class ScoreMLP(nn.Module):
    """A residual MLP on the flattened input: ``blocks`` layers, embedding added in each."""

    def __init__(self, dim: int, width: int, blocks: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.layers = nn.ModuleList(_MLPBlock(width, emb_dim, dropout) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(width)
        self.out = _zeroed(nn.Linear(width, dim))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.inp(x.flatten(1))
        for layer in self.layers:
            h = layer(h, emb)
        out: Tensor = self.out(F.silu(self.norm_out(h)))
        return out.reshape(x.shape)
