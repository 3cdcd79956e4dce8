"""What the WS-DAN and CAL golden tests share: tools/golden/ws_dan.py's stand-in trunk as a finebench
backbone, its inputs, the official state-dict names, and the backbone families every peer attaches to."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from float_tolerance import FLOAT32_UNIT_ROUNDOFF, STRICT_FLOAT64, float32_atol
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


PRECISIONS = ("f64", "f32")
"""Both golden tests run in float64 (strict) and float32 (within the accumulation bounds below)."""

TRAIN_FORWARD_TERMS = 3 * 4 * 4 + 3 * 56 * 56 + 16 * 4 * 4 + 3 * 14 * 14 + 32 + 3 * 14 * 14 + 14 * 14 + 128 + 128
"""The longest accumulation chain from an image to the logits (tests/float_tolerance.py): the first
convolution, its BatchNorm's batch statistics over B·56·56 positions, the second convolution and its
statistics, the 1×1 attention convolution and its statistics, bilinear attention pooling over 14·14
positions, its L2 norm over M·C = 128 features, the classifier. It bounds every output of a step
and of the test prediction (the eval path has fewer terms)."""
IMAGE_TERMS = 4
"""A crop or drop image's pixel: bilinear resampling of four pixels (the box itself is compared exactly,
through the rows it produces)."""
IMAGE_SUM_TERMS = IMAGE_TERMS + 3 * 224 * 224
"""... summed over an image's 3·224·224 values."""
UPDATE_TERMS = TRAIN_FORWARD_TERMS + 3 * 3 * 56 * 56
"""Two optimiser steps' weight change: back through the chain above, then the first convolution's
weight gradient summed over three passes' B·56·56 positions (the longest weight-gradient sum)."""


def assert_weights_agree(value: torch.Tensor, initial: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Weights after the optimiser steps: float64 strictly; float32 through their change, whose error the
    gradients' accumulation bounds, plus one rounding of the stored weights themselves."""
    if not value.is_floating_point():
        assert torch.equal(value, expected), msg
    elif value.dtype == torch.float64:
        torch.testing.assert_close(value, expected, **STRICT_FLOAT64, msg=msg)
    else:
        atol = float32_atol(expected - initial, UPDATE_TERMS) + 2 * FLOAT32_UNIT_ROUNDOFF * expected.abs().max().item()
        torch.testing.assert_close(value - initial, expected - initial, rtol=0.0, atol=atol, msg=msg)


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
