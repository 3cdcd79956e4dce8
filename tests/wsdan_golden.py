"""What the WS-DAN and CAL golden tests share: tools/golden/ws_dan.py's stand-in trunk as a finebench
backbone, its inputs, the official state-dict names, and the backbone families every peer attaches to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finebench.models.base import Backbone, TapPoint

TINY = {"depth": 10, "width": 1}
FAMILIES = [("wrn", TINY), ("resnext_cifar", {"depth": 11, "cardinality": 2, "base_width": 4}),
            ("timm:resnet10t", None), ("torchvision:resnet18", None)]


class SmallTrunk(Backbone):
    """tools/golden/ws_dan.py's stand-in trunk as a finebench backbone (one tap: its output)."""

    tap_points = (TapPoint("out", 32, 16, "the trunk's output"),)
    out_channels = 32
    attention_candidates = ()

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 4, stride=4, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(16, 32, 4, stride=4, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(inplace=True))

    def forward(self, x, taps=(), stop_after_taps=False):
        return None, {"out": self.trunk(x)}


def official_name(name: str) -> str:
    """finebench's state-dict name → the official WSDAN's."""
    if name.startswith("backbone.trunk."):
        return "features." + name.removeprefix("backbone.trunk.")
    if name.startswith("attentions."):
        index, rest = name.removeprefix("attentions.").split(".", 1)
        return f"attentions.{'conv' if index == '0' else 'bn'}.{rest}"
    return name


def golden_images(dtype: torch.dtype) -> torch.Tensor:
    noise = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return F.interpolate(noise, size=(224, 224), mode="bilinear", align_corners=False).to(dtype)
