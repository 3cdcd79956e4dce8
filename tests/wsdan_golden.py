"""What the WS-DAN and CAL golden tests share: tools/golden/ws_dan.py's stand-in trunk as a finebench
backbone, its inputs, the official state-dict names, and the backbone families every peer attaches to."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from finebench.methods import parse_options
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


TOLERANCES = [
    ("f64", {"rtol": 1e-10, "atol": 1e-12}, {"rtol": 1e-10, "atol": 1e-12}),
    ("f32", {"rtol": 1e-5, "atol": 1e-6}, {"rtol": 1e-4, "atol": 1e-6}),
]
"""(precision, tolerance of a step's outputs, tolerance after two optimiser steps) for both golden tests."""


def step_tensors(golden: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The golden tensors of one training step, their ``step<N>.`` prefix removed."""
    prefix = f"step{step}."
    return {key.removeprefix(prefix): value for key, value in golden.items() if key.startswith(prefix)}


class GoldenStart(NamedTuple):
    golden: dict[str, torch.Tensor]
    """One precision's tensors, its prefix removed."""
    model: Any
    images: torch.Tensor
    labels: torch.Tensor
    optimizer: torch.optim.Optimizer


def golden_start(path: Path, precision: str, classifier: type, kind: str) -> GoldenStart:
    """Where both golden tests start: the official initial weights in a finebench model on the stand-in
    trunk (M 4, 5 classes; the centres stay finebench's zeros), the inputs, and the official optimiser."""
    everything = load_file(path)
    golden = {k.removeprefix(f"{precision}."): v for k, v in everything.items() if k.startswith(f"{precision}.")}
    dtype = torch.float64 if precision == "f64" else torch.float32
    model = classifier(SmallTrunk(), 5, parse_options(kind, {"attentions": 4})).to(dtype)
    state = model.state_dict()
    model.load_state_dict({name: golden[f"init.{official_name(name)}"] if name != "centres" else state[name]
                           for name in state})
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-5)
    model.train()
    return GoldenStart(golden, model, golden_images(dtype), everything["labels"], optimizer)
