"""Bilinear CNN (Lin, RoyChowdhury and Maji, ICCV 2015): the outer product of the last feature map
with itself, averaged over positions, square-rooted, L2-normalised and classified linearly.

The authors' code is MatConvNet; the PyTorch port most papers run is HaoMood/bilinear-cnn
(bcc2883). The paper's signed square root ``sign(x)·sqrt(|x|)`` is the default; the port's
``sqrt(x + 1e-5)`` (which floors every entry at about 0.0032 before the normalisation) is
``sqrt = "plus_eps"``, and equals the port's head to float64 rounding (tests/test_bcnn.py, golden
tensors written by tools/golden/bcnn.py from a checkout). ``reduction = 512`` first maps the last
stage to 512 channels with a 1x1 convolution (with BatchNorm and ReLU), so a 2048-channel ResNet
does not need a 4M-wide classifier: an extension without an official counterpart.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from finebench.methods.base import Method, MethodOptions
from finebench.methods.registry import register
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier
from finebench.models.output import ModelOutput

PORT_EPS = 1e-5
"""HaoMood's ``torch.sqrt(X + 1e-5)`` (``sqrt = "plus_eps"``)."""
SIGNED_FLOOR = 1e-12
"""The signed root's |x| is clamped here: sqrt's gradient is infinite at 0, and entries below it
are rounding noise next to the normalised vector (values change by at most 1e-6)."""


class BilinearOptions(MethodOptions):
    kind: Literal["bcnn"]
    sqrt: Literal["signed", "plus_eps"] = "signed"
    """``signed``: the paper's sign(x)·sqrt(|x|); ``plus_eps``: the HaoMood port's sqrt(x + 1e-5),
    which assumes non-negative features (VGG's relu5_3) and gives NaN on a backbone whose last
    stage ends without a ReLU, as the port would."""
    reduction: Annotated[int, Field(ge=0)] = 0
    """Channels of a 1x1 convolution (+ BatchNorm + ReLU) before the pooling; 0 = none (the paper)."""


def bilinear_pool(features: torch.Tensor, sqrt: str) -> torch.Tensor:
    """B×C×H×W -> B×C² : mean over positions of x·xᵀ, square root, L2 normalisation (in float32 or
    float64: the C² entries are summed in the norm)."""
    flat = features.flatten(2)
    flat = flat if flat.dtype == torch.float64 else flat.float()
    gram = torch.bmm(flat, flat.mT) / flat.shape[2]
    vector = gram.flatten(1)
    if sqrt == "plus_eps":
        vector = torch.sqrt(vector + PORT_EPS)
    else:
        vector = torch.sign(vector) * torch.sqrt(vector.abs().clamp_min(SIGNED_FLOOR))
    return F.normalize(vector, dim=1)


class BilinearClassifier(ImageClassifier):
    """The backbone up to its last stage, bilinear pooling and one linear classifier on C² features."""

    def __init__(self, backbone: Backbone, num_classes: int, options: BilinearOptions) -> None:
        super().__init__(backbone, num_classes)
        self.final_tap = backbone.tap_points[-1].name
        channels = backbone.tap_point(self.final_tap).channels
        self.reduce: nn.Module | None = None
        if options.reduction:
            self.reduce = nn.Sequential(
                nn.Conv2d(channels, options.reduction, 1, bias=False), nn.BatchNorm2d(options.reduction), nn.ReLU()
            )
            channels = options.reduction
        self.sqrt = options.sqrt
        self.classifier = nn.Linear(channels * channels, num_classes)
        # the port's initialisation (Kaiming normal, fan-in; bias 0)
        nn.init.kaiming_normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def bilinear_features(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (reduced if asked): the backbone stops there, unpooled."""
        _, taps = self.backbone(images, [self.final_tap], stop_after_taps=True)
        features = taps[self.final_tap]
        return self.reduce(features) if self.reduce is not None else features

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a feature map (what the golden test compares with the port's head)."""
        return self.classifier(bilinear_pool(features, self.sqrt).to(self.classifier.weight.dtype))

    def forward(self, images: torch.Tensor) -> ModelOutput:
        logits = self.head(self.bilinear_features(images))
        return ModelOutput(F.log_softmax(logits.float(), dim=1), logits)


class BilinearCNN(Method):
    kind = "bcnn"
    description = "bilinear pooling of the last feature map (Lin et al., ICCV 2015)"
    Options = BilinearOptions

    def table_name(self, options: BilinearOptions) -> str:  # type: ignore[override]
        name = self.kind
        if options.reduction:
            name += f"-r{options.reduction}"
        if options.sqrt != "signed":
            name += f"-{options.sqrt}"
        return name

    def settings(self, options: BilinearOptions) -> str:  # type: ignore[override]
        reduction = f"1x1 to {options.reduction} channels" if options.reduction else "no reduction"
        return f"sqrt {options.sqrt} · {reduction}"

    def attach(self, backbone: Backbone, num_classes: int, options: BilinearOptions) -> ImageClassifier:  # type: ignore[override]
        return BilinearClassifier(backbone, num_classes, options)


METHOD = register(BilinearCNN())
