"""Peer plug-ins that go into every residual block: Squeeze-and-Excitation and CBAM.

Each has the same constructor shape (channels first, keywords with defaults) and subclasses
``BlockPlugin``, which is how ``parameter_groups`` knows their weights belong to the head (the
part trained at the full learning rate) even though they sit inside the backbone.
"""

from __future__ import annotations

import torch
from torch import nn


def reduced_channels(channels: int, reduction: int) -> int:
    return max(1, channels // reduction)


class BlockPlugin(nn.Module):
    """Marker base class for modules inserted into residual blocks."""


class SqueezeExcite(BlockPlugin):
    """SE (Hu et al. 2018): channel weights from a bottleneck MLP on the global average."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = reduced_channels(channels, reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(weights)


class ChannelGate(nn.Module):
    """CBAM's channel attention: a shared MLP on both the average- and max-pooled vectors."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = reduced_channels(channels, reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        average = self.mlp(x.mean((2, 3), keepdim=True))
        maximum = self.mlp(x.amax((2, 3), keepdim=True))
        return x * torch.sigmoid(average + maximum)


class SpatialGate(nn.Module):
    """CBAM's spatial attention: a 7x7 conv over the channel mean and max maps."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(BlockPlugin):
    """CBAM (Woo et al. 2018): channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))

