"""CIFAR-style pre-activation Wide ResNet WRN-d-k, laid out as in the Attend and Rectify code.

Layout: stem conv 3->16 + BN + ReLU; three groups of 16k/32k/64k channels (strides 1/2/2) of
pre-activation blocks; final BN-ReLU, global average pool. The projection shortcut takes the
block's raw input (not its pre-activated one), as the authors' released code does, and each group's
pre-activated output (the next group's first BN-ReLU) is the tap Attend and Rectify reads.

The options ``stem``, ``shortcut`` and ``classifier_init`` and ``separate_tap_norms`` rebuild the
code that produced the authors' logs, which differed from their release (docs/MECHANISM.md §4):
the CIFAR baselines (painless-attention 844c4f8) and the first attention runs (ea7d4af, 1bf9ecf)
had a conv-only stem, a projection shortcut on the pre-activated input and PyTorch's default
classifier init; their attention taps on groups 0/1 were ``relu(BatchNorm_i(group output))``
with BatchNorms of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finebench.errors import FinebenchError
from finebench.models.base import Backbone, TapPoint

GROUP_WIDTHS = (16, 32, 64)
STEMS = ("bn_relu", "conv")
"""``bn_relu``: conv + BN + ReLU (released code); ``conv``: the convolution alone (844c4f8 to 1bf9ecf)."""
SHORTCUTS = ("input", "preactivated")
"""What the 1x1 projection shortcut reads: the block's raw input (released code) or its
pre-activated input, ``conv_reduce(relu(bn0(x)))`` (844c4f8 to 1bf9ecf)."""
CLASSIFIER_INITS = ("kaiming", "default")
"""``kaiming``: Kaiming-normal weight (finebench's choice, as their fine-tuning code does);
``default``: PyTorch's own ``nn.Linear`` init, which every logged CIFAR run kept."""


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-[channel dropout]-conv3x3, plus a shortcut; returns its pre-activation too."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, dropout: float, shortcut: str = "input"
    ) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut_reads_preactivated = shortcut == "preactivated"
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
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(preactivated if self.shortcut_reads_preactivated else x)
        return y + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.preactivate(x))


class WideResNet(Backbone):
    """WRN-depth-width; taps ``group0..group2`` are the pre-activated outputs of the three groups."""

    def __init__(
        self, depth: int = 28, width: float = 10, dropout: float = 0.0,
        stem: str = "bn_relu", shortcut: str = "input", classifier_init: str = "kaiming",
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise FinebenchError(f"wrn depth={depth} is invalid: expected 6n+4 with n >= 1 (10, 16, 22, 28, 40)")
        if width < 1 and not (width > 0 and all(float(w * width).is_integer() for w in GROUP_WIDTHS)):
            # fractional widths with whole group widths (0.25: 4/8/16 channels) serve the golden tests
            raise FinebenchError(f"wrn width={width} is invalid: expected an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise FinebenchError(f"wrn dropout={dropout} is invalid: expected 0 <= dropout < 1")
        for option, value, allowed in (("stem", stem, STEMS), ("shortcut", shortcut, SHORTCUTS),
                                       ("classifier_init", classifier_init, CLASSIFIER_INITS)):
            if value not in allowed:
                raise FinebenchError(f"wrn {option}={value!r} is invalid: expected one of {', '.join(allowed)}")
        self.classifier_init = classifier_init
        blocks_per_group = (depth - 4) // 6
        widths = [int(w * width) for w in GROUP_WIDTHS]
        self.stem_conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16) if stem == "bn_relu" else None
        self.groups = nn.ModuleList()
        in_channels = 16
        for channels, stride in zip(widths, (1, 2, 2), strict=True):
            group = nn.ModuleList(
                PreActBlock(in_channels if i == 0 else channels, channels, stride if i == 0 else 1, dropout, shortcut)
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
        self.tap_norms = nn.ModuleDict()
        """``separate_tap_norms``: tap name -> the BatchNorm that tap reads the raw group output through."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def init_classifier(self, classifier: nn.Linear) -> None:
        if self.classifier_init == "kaiming":
            nn.init.kaiming_normal_(classifier.weight)

    def separate_tap_norms(self, taps: Sequence[str]) -> None:
        """Give the taps ``group0``/``group1`` among ``taps`` BatchNorms of their own: the tap becomes
        ``relu(bn(group output))`` instead of the next block's pre-activation, as in the code of the
        authors' first CIFAR attention runs (``pre_bn0``/``pre_bn1``, painless-attention ea7d4af).
        ``group2`` keeps the final BN-ReLU, which their code also used for that tap."""
        for tap in taps:
            if tap in ("group0", "group1"):
                self.tap_norms[tap] = nn.BatchNorm2d(self.tap_point(tap).channels)

    def residual_blocks(self) -> list[nn.Module]:
        return [block for group in self.groups for block in group]

    def forward(
        self, x: torch.Tensor, taps: Sequence[str] = (), stop_after_taps: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        wanted = set(taps)
        found: dict[str, torch.Tensor] = {}

        def done() -> bool:
            return stop_after_taps and wanted.issubset(found)

        x = self.stem_conv(x)
        if self.stem_bn is not None:
            x = F.relu(self.stem_bn(x))
        for group_index, group in enumerate(self.groups):
            for block_index, block in enumerate(group):
                preactivated = block.preactivate(x)
                previous = f"group{group_index - 1}"
                if block_index == 0 and previous in wanted:
                    norm = self.tap_norms[previous] if previous in self.tap_norms else None
                    found[previous] = preactivated if norm is None else F.relu(norm(x))
                    if done():
                        return None, found
                x = block.residual(x, preactivated)
        x = F.relu(self.final_bn(x))
        if "group2" in wanted:
            found["group2"] = x
        if done():
            return None, found
        return x.mean((2, 3)), found
