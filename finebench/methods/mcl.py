"""Mutual-Channel Loss (Chang et al., IEEE TIP 2020; PRIS-CV/Mutual-Channel-Loss ``befb369``).

The last feature map is split into ``xi`` contiguous channels per class (class k owns channels
k·xi ... k·xi + xi - 1, as the official cross-channel max pool groups them). Two terms train it
beside the classifier's cross-entropy:

* discriminality: a random channel mask (``drop`` of each class's ``xi`` channels zeroed, the same
  mask for the whole batch, no rescaling), the max over each class's channels, averaged over
  positions, is a class score vector trained with cross-entropy;
* diversity: each channel's softmax over positions, the max over each class's channels, summed over
  positions; ``1 - mean / xi`` (the official form of the paper's −L_div).

Loss = CE(logits) + ``alpha``·L_dis + ``beta``·L_div (official HEAD: 1.5 and 20). The mask is
drawn from Python ``random`` exactly as the official ``Mask`` does (one in-place shuffle of one
list per class), so a seeded run draws the official masks. Where the official code hard-codes
200 classes and a 14×14 map (at 448 px its L_dis pooling silently yields 800 scores),
this module averages over the map's positions whatever its size and class count. Where the
backbone's last stage does not have ``xi × classes`` channels, a 1x1 convolution (+ BatchNorm +
ReLU, keeping the map non-negative as the official post-ReLU features are) maps it there first.
The classifier reads the average-pooled MC feature map through one linear layer (finebench's
common head; the official VGG/ResNet-18 heads are 2-layer MLPs on max-pooled maps).
"""

from __future__ import annotations

import random
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from finebench.methods.base import Method, MethodOptions
from finebench.methods.registry import register
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier
from finebench.models.output import ModelOutput


class MCLOptions(MethodOptions):
    kind: Literal["mcl"]
    xi: Annotated[int, Field(ge=1)] = 3
    """Channels per class (ξ, the official ``cnum``)."""
    drop: Annotated[int, Field(ge=0)] = 1
    """Channels of each class's ``xi`` zeroed by the random mask (official: one of three)."""
    alpha: Annotated[float, Field(ge=0)] = 1.5
    """Weight of the discriminality term (official HEAD; 2.0 before commit 1c1ff52)."""
    beta: Annotated[float, Field(ge=0)] = 20.0
    """Weight of the diversity term."""

    @model_validator(mode="after")
    def _drop_below_xi(self) -> MCLOptions:
        if self.drop >= self.xi:
            raise ValueError(f"drop={self.drop} must be below xi={self.xi} (a class needs a channel left)")
        return self


def draw_channel_mask(num_classes: int, xi: int, drop: int) -> torch.Tensor:
    """The discriminality mask (``num_classes·xi`` zeros and ones) drawn from Python ``random``:
    one list of ``xi - drop`` ones then ``drop`` zeros, shuffled in place once per class and
    appended, so the draws equal the official ``Mask``'s for the same seed."""
    cell = [1] * (xi - drop) + [0] * drop
    values: list[int] = []
    for _ in range(num_classes):
        random.shuffle(cell)
        values += cell
    return torch.tensor(values, dtype=torch.float32)


def group_max(flat: torch.Tensor, xi: int) -> torch.Tensor:
    """B × N × L: the max over each class's ``xi`` contiguous channels of a B × (N·xi) × L map.

    A max pool over the channel axis, not ``amax``: at ties (zeros of post-ReLU maps, masked
    channels) the pool sends the gradient to the first maximal channel as the official
    cross-channel pool does, where ``amax`` would split it."""
    return F.max_pool1d(flat.transpose(1, 2), xi).transpose(1, 2)


def diversity_loss(features: torch.Tensor, xi: int) -> torch.Tensor:
    """L_div of a B × (N·xi) × H × W map: 1 − mean over images and classes of the summed
    per-position max (over the class's channels) of each channel's spatial softmax, over xi."""
    spread = group_max(F.softmax(features.flatten(2), dim=2), xi)
    return 1.0 - spread.sum(2).mean() / xi


def discriminality_scores(features: torch.Tensor, xi: int, mask: torch.Tensor) -> torch.Tensor:
    """B × N class scores of L_dis: the masked map's max over each class's channels, averaged over
    positions (``mask``: N·xi entries shared by the batch, no rescaling)."""
    masked = features.flatten(2) * mask.to(features).view(1, -1, 1)
    return group_max(masked, xi).mean(2)


class MCLClassifier(ImageClassifier):
    """Backbone → (1x1 conv to N·xi channels where needed) → MC feature map → GAP → linear.

    In training, ``reg_loss`` is beta·L_div and ``aux`` is (the B × N discriminality scores,):
    ``MCL.loss`` adds alpha·CE(scores, labels), the one term needing labels, with alpha from the
    variant's options (the method is bound to them)."""

    def __init__(self, backbone: Backbone, num_classes: int, options: MCLOptions) -> None:
        super().__init__(backbone, num_classes)
        last = backbone.tap_points[-1]
        self.tap = last.name
        self.backbone_taps_read = (self.tap,)
        channels = num_classes * options.xi
        self.project = (
            nn.Sequential(nn.Conv2d(last.channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                          nn.ReLU(inplace=True))
            if last.channels != channels else nn.Identity()
        )
        self.classifier = nn.Linear(channels, num_classes)
        backbone.init_classifier(self.classifier)
        self.xi, self.drop, self.beta = options.xi, options.drop, options.beta

    def forward(self, images: torch.Tensor, channel_mask: torch.Tensor | None = None) -> ModelOutput:
        """``channel_mask`` replaces the random draw (golden tests feed the official one in)."""
        _, taps = self.backbone(images, [self.tap], stop_after_taps=True)
        features = self.project(taps[self.tap])
        logits = self.classifier(features.mean((2, 3)))
        log_probs = F.log_softmax(logits.float(), dim=1)
        if not self.training:
            return ModelOutput(log_probs, logits)
        if channel_mask is None:
            channel_mask = draw_channel_mask(self.num_classes, self.xi, self.drop)
        features = features.float()
        scores = discriminality_scores(features, self.xi, channel_mask)
        return ModelOutput(log_probs, logits, reg_loss=self.beta * diversity_loss(features, self.xi),
                           aux=(scores,))


class MCL(Method):
    kind = "mcl"
    description = "Mutual-Channel Loss: xi channels per class, discriminality + diversity terms (Chang et al. 2020)"
    Options = MCLOptions

    def table_name(self, options: MCLOptions) -> str:  # type: ignore[override]
        default = MCLOptions(kind="mcl")
        parts = [f"{key}{getattr(options, key):g}" for key in ("xi", "drop", "alpha", "beta")
                 if getattr(options, key) != getattr(default, key)]
        return "-".join([self.kind, *parts])

    def attach(self, backbone: Backbone, num_classes: int, options: MCLOptions) -> ImageClassifier:  # type: ignore[override]
        return MCLClassifier(backbone, num_classes, options)

    def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """CE + beta·L_div (the default loss: the model's ``reg_loss``) + alpha·L_dis in training."""
        loss = super().loss(output, labels, label_smoothing=label_smoothing)
        if output.aux:
            (scores,) = output.aux
            loss = loss + self.options.alpha * F.cross_entropy(scores.float(), labels)
        return loss


METHOD = register(MCL())
