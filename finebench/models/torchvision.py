"""ImageNet-style backbones built from torchvision's ResNet family, with optional ImageNet weights.

The architectures are torchvision's own (``torchvision.models.resnet.ResNet``) with block
subclasses that add the ``plugin`` slot, so torchvision's weight files load unchanged: the slot
is an ``nn.Identity`` with no state. No download is possible here: ImageNet weights are read
from the torch hub cache, and a missing file is reported with the exact path to place it at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from finebench.errors import FinebenchError
from finebench.models.base import Backbone, TapPoint


class PluginSlot(nn.Module):
    """The ``plugin`` slot both block subclasses add: applied to the residual branch (after the
    block's last BatchNorm, named ``plugin_bn``) before the sum with the identity path."""

    plugin_bn: str

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.plugin: nn.Module = nn.Identity()
        self.plugin_channels = getattr(self, self.plugin_bn).num_features

    def join(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """relu(plugin(branch) + identity(x)), the block's output."""
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.plugin(branch) + identity)


class PluggableBasicBlock(PluginSlot, BasicBlock):
    """torchvision's BasicBlock with a plug-in applied to the residual branch before the sum."""

    plugin_bn = "bn2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.join(x, self.bn2(self.conv2(y)))


class PluggableBottleneck(PluginSlot, Bottleneck):
    """torchvision's Bottleneck with a plug-in applied to the residual branch before the sum."""

    plugin_bn = "bn3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.join(x, self.bn3(self.conv3(y)))


@dataclass(frozen=True)
class Architecture:
    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int, int]
    groups: int
    width_per_group: int
    weights: tvm.WeightsEnum
    description: str


# "imagenet" means the IMAGENET1K_V1 weights: the original torchvision release the paper's
# fine-grained experiments started from.
ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture(PluggableBasicBlock, (2, 2, 2, 2), 1, 64, tvm.ResNet18_Weights.IMAGENET1K_V1,
                             "ResNet-18 (torchvision)"),
    "resnet50": Architecture(PluggableBottleneck, (3, 4, 6, 3), 1, 64, tvm.ResNet50_Weights.IMAGENET1K_V1,
                             "ResNet-50 (torchvision)"),
    "resnet101": Architecture(PluggableBottleneck, (3, 4, 23, 3), 1, 64, tvm.ResNet101_Weights.IMAGENET1K_V1,
                              "ResNet-101 (torchvision)"),
    "wide_resnet50_2": Architecture(PluggableBottleneck, (3, 4, 6, 3), 1, 128,
                                    tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1, "Wide ResNet-50-2 (torchvision)"),
    "resnext50_32x4d": Architecture(PluggableBottleneck, (3, 4, 6, 3), 32, 4,
                                    tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V1, "ResNeXt-50 32x4d (torchvision)"),
    "resnext101_32x8d": Architecture(PluggableBottleneck, (3, 4, 23, 3), 32, 8,
                                     tvm.ResNeXt101_32X8D_Weights.IMAGENET1K_V1, "ResNeXt-101 32x8d (torchvision)"),
}

STAGES = ("layer1", "layer2", "layer3", "layer4")

LAST_STRIDE = "last_stride"
"""The backbone option (``model.options = {last_stride = 1}``) that sets the stride of ``layer4``."""
LAST_STRIDES = (2, 1)
"""Its values, the default first: 2 is torchvision's ResNet (stride 32 at ``layer4``); 1 takes the
stride out of ``layer4``'s first block (its strided 3x3 and its 1x1 projection), without dilation, so
``layer4`` keeps ``layer3``'s resolution (stride 16: 28x28 maps at 448 px). That is the ResNet of
CAL's and WS-DAN's official code (raoyongming/CAL ``fgvc/models/resnet.py``: ``ResNet(..., stride=1)``
builds ``layer4`` with stride 1). A stride is no weight, so every parameter shape is unchanged and
torchvision's ImageNet weights load as they are; the last stage costs 4x its FLOPs."""


class TorchvisionResNet(Backbone):
    """A torchvision ResNet without its classifier; taps ``layer1..layer4`` are the stage outputs.

    Parameter names equal torchvision's (``conv1.weight``, ``layer1.0.bn3.running_mean``...), so
    torchvision state dicts load as they are.
    """

    def __init__(self, name: str, last_stride: int = LAST_STRIDES[0]) -> None:
        super().__init__()
        if last_stride not in LAST_STRIDES:
            raise FinebenchError(
                f"option {LAST_STRIDE}={last_stride!r} for backbone {name!r} is invalid: expected 2 "
                "(torchvision's ResNet) or 1 (a stride-1 last stage, as CAL's official ResNet)"
            )
        self.architecture_name = name
        arch = ARCHITECTURES[name]
        net = ResNet(arch.block, list(arch.layers), groups=arch.groups, width_per_group=arch.width_per_group)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if last_stride != LAST_STRIDES[0]:
            # torchvision strides the first block's 3x3 (conv2 of a Bottleneck, conv1 of a BasicBlock)
            # and its projection (downsample.0); a convolution's stride is read at forward time only.
            for conv in self.layer4[0].modules():
                if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1):
                    conv.stride = (last_stride, last_stride)
        expansion = arch.block.expansion
        strides = (4, 8, 16, 16 * last_stride)
        self.tap_points = tuple(
            TapPoint(stage, 64 * 2**i * expansion, stride, f"output of {stage}")
            for i, (stage, stride) in enumerate(zip(STAGES, strides, strict=True))
        )
        self.out_channels = self.tap_points[-1].channels
        # Deepest first, as the authors' WRN-50-2 (``att2`` on group2 = layer3 comes first) and the
        # CIFAR WRN: AD=1 is layer3, AD=2 layer2 + layer3, AD=3 layer1 + layer2 + layer3. The
        # shallowest tap is also the dearest (+51% FLOPs at N=200 for layer1 alone).
        self.attention_candidates = ("layer3", "layer2", "layer1")

    def residual_blocks(self) -> list[nn.Module]:
        return [block for stage in STAGES for block in getattr(self, stage)]

    def init_classifier(self, classifier: nn.Linear) -> None:
        """Kaiming-normal weight (bias left at torch's default), as the authors' ``finetune`` gives
        the new classifier of their ImageNet WRN-50-2 (docs/MECHANISM.md, "Equal to the released code")."""
        nn.init.kaiming_normal_(classifier.weight)

    def forward(
        self, x: torch.Tensor, taps: Sequence[str] = (), stop_after_taps: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        wanted = set(taps)
        found: dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in STAGES:
            x = getattr(self, stage)(x)
            if stage in wanted:
                found[stage] = x
                if stop_after_taps and wanted.issubset(found):
                    return None, found
        return x.mean((2, 3)), found

    def load_imagenet_weights(self) -> None:
        """Load torchvision's ImageNet weights from the torch hub cache; never download."""
        file = cached_imagenet_weights(ARCHITECTURES[self.architecture_name].weights, self.architecture_name)
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
        self.load_backbone_weights(state_dict, str(file))


def imagenet_weights_path(weights: tvm.WeightsEnum) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` looks for (and would store) these weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def cached_imagenet_weights(weights: tvm.WeightsEnum, label: str) -> Path:
    """The cached file of ``weights``; never downloads: a miss is one line saying where to put it."""
    file = imagenet_weights_path(weights)
    if not file.is_file():
        raise FinebenchError(
            f"ImageNet weights for {label} are not in the torch hub cache (no download happens): "
            f"place {file.name} (from {weights.url}) at {file}"
        )
    return file
