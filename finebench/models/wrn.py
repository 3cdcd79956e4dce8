"""CIFAR-style pre-activation Wide ResNet WRN-d-k, laid out as in the Attend and Rectify code.

Layout: stem conv 3->16 + BN + ReLU; three groups of 16k/32k/64k channels (strides 1/2/2) of
pre-activation blocks; final BN-ReLU, global average pool. The projection shortcut takes the
block's raw input (not its pre-activated one), as the authors' code does, and each group's
pre-activated output (the next group's first BN-ReLU) is the tap Attend and Rectify reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finebench.errors import FinebenchError
from finebench.models.base import Backbone, TapPoint

GROUP_WIDTHS = (16, 32, 64)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-[channel dropout]-conv3x3, plus a shortcut; returns its pre-activation too."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.plugin: nn.Module = nn.Identity()
        self.plugin_channels = out_channels

    def preactivate(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn0(x))

    def residual(self, x: torch.Tensor, preactivated: torch.Tensor) -> torch.Tensor:
        """The rest of the block; split from ``preactivate`` so a pass can stop right at a tap."""
        y = F.relu(self.bn1(self.conv0(preactivated)))
        if self.dropout > 0:
            y = F.dropout2d(y, self.dropout, training=self.training)
        y = self.plugin(self.conv1(y))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return y + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.preactivate(x))


class WideResNet(Backbone):
    """WRN-depth-width; taps ``group0..group2`` are the pre-activated outputs of the three groups."""

    def __init__(self, depth: int = 28, width: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise FinebenchError(f"wrn depth={depth} is invalid: expected 6n+4 with n >= 1 (10, 16, 22, 28, 40)")
        if width < 1:
            raise FinebenchError(f"wrn width={width} is invalid: expected an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise FinebenchError(f"wrn dropout={dropout} is invalid: expected 0 <= dropout < 1")
        blocks_per_group = (depth - 4) // 6
        widths = [int(w * width) for w in GROUP_WIDTHS]
        self.stem_conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.groups = nn.ModuleList()
        in_channels = 16
        for channels, stride in zip(widths, (1, 2, 2), strict=True):
            group = nn.ModuleList(
                PreActBlock(in_channels if i == 0 else channels, channels, stride if i == 0 else 1, dropout)
                for i in range(blocks_per_group)
            )
            self.groups.append(group)
            in_channels = channels
        self.final_bn = nn.BatchNorm2d(widths[2])
        self.out_channels = widths[2]
        self.tap_points = tuple(
            TapPoint(f"group{g}", widths[g], 2**g, f"group {g} output after BN-ReLU") for g in range(3)
        )
        self.attention_candidates = ("group2", "group1", "group0")
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def init_classifier(self, classifier: nn.Linear) -> None:
        nn.init.kaiming_normal_(classifier.weight)

    def residual_blocks(self) -> list[nn.Module]:
        return [block for group in self.groups for block in group]

    def forward(
        self, x: torch.Tensor, taps: Sequence[str] = (), stop_after_taps: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        wanted = set(taps)
        found: dict[str, torch.Tensor] = {}

        def done() -> bool:
            return stop_after_taps and wanted.issubset(found)

        x = F.relu(self.stem_bn(self.stem_conv(x)))
        for group_index, group in enumerate(self.groups):
            for block_index, block in enumerate(group):
                preactivated = block.preactivate(x)
                previous = f"group{group_index - 1}"
                if block_index == 0 and previous in wanted:
                    found[previous] = preactivated
                    if done():
                        return None, found
                x = block.residual(x, preactivated)
        x = F.relu(self.final_bn(x))
        if "group2" in wanted:
            found["group2"] = x
        if done():
            return None, found
        return x.mean((2, 3)), found
