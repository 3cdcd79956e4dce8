"""CIFAR-style ResNeXt (Xie et al. 2017), e.g. ResNeXt-29 8x64d: depth 9n+2, three stages.

Stem conv3x3 3->64 + BN + ReLU; stages of 256/512/1024 output channels (strides 1/2/2) made of
post-activation bottlenecks (1x1, grouped 3x3, 1x1) whose inner width is
cardinality x base_width x 2^stage; global average pool. Taps are the stage outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finebench.errors import FinebenchError
from finebench.models.base import Backbone, TapPoint

STAGE_OUT_CHANNELS = (256, 512, 1024)


class ResNeXtBottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, inner: int, cardinality: int, stride: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(inner)
        self.conv_grouped = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn_grouped = nn.BatchNorm2d(inner)
        self.conv_expand = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.plugin: nn.Module = nn.Identity()
        self.plugin_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn_reduce(self.conv_reduce(x)))
        y = F.relu(self.bn_grouped(self.conv_grouped(y)))
        y = self.plugin(self.bn_expand(self.conv_expand(y)))
        return F.relu(y + self.shortcut(x))


class CifarResNeXt(Backbone):
    """ResNeXt-depth (cardinality x base_width d); taps ``stage0..stage2`` are the stage outputs."""

    def __init__(self, depth: int = 29, cardinality: int = 8, base_width: int = 64) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise FinebenchError(f"resnext_cifar depth={depth} is invalid: expected 9n+2 with n >= 1 (11, 20, 29)")
        if cardinality < 1 or base_width < 1:
            raise FinebenchError(
                f"resnext_cifar cardinality={cardinality}, base_width={base_width} are invalid: expected integers >= 1"
            )
        blocks_per_stage = (depth - 2) // 9
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.stages = nn.ModuleList()
        in_channels = 64
        for stage, out_channels in enumerate(STAGE_OUT_CHANNELS):
            inner = cardinality * base_width * 2**stage
            stride = 1 if stage == 0 else 2
            self.stages.append(
                nn.Sequential(
                    *(
                        ResNeXtBottleneck(
                            in_channels if i == 0 else out_channels, out_channels, inner, cardinality,
                            stride if i == 0 else 1,
                        )
                        for i in range(blocks_per_stage)
                    )
                )
            )
            in_channels = out_channels
        self.out_channels = STAGE_OUT_CHANNELS[-1]
        self.tap_points = tuple(
            TapPoint(f"stage{s}", c, 2**s, f"stage {s} output") for s, c in enumerate(STAGE_OUT_CHANNELS)
        )
        self.attention_candidates = ("stage2", "stage1", "stage0")
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def residual_blocks(self) -> list[nn.Module]:
        return [block for stage in self.stages for block in stage]

    def forward(
        self, x: torch.Tensor, taps: Sequence[str] = (), stop_after_taps: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        wanted = set(taps)
        found: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if f"stage{index}" in wanted:
                found[f"stage{index}"] = x
                if stop_after_taps and wanted.issubset(found):
                    return None, found
        return x.mean((2, 3)), found
