"""Bilinear CNN (Lin et al., ICCV 2015): the outer product of the last feature map with itself,
averaged over positions, square-rooted, L2-normalised and classified by one linear layer.

The authors' code is MatConvNet; the PyTorch port most papers run is HaoMood/bilinear-cnn
(``bcc2883``), whose square root is ``sqrt(x + 1e-5)`` (unsigned: its VGG-16 features are
post-ReLU). The paper's signed square root is the default here and the port's is
``sqrt = "haomood"`` (tests/test_bcnn.py checks it against golden tensors from the port). The
optional 1x1 reduction has no official counterpart: it keeps a 2048-channel ResNet's classifier at
512² inputs instead of 2048² (4M per class).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from finebench.methods.base import Method, MethodOptions, check_tap
from finebench.methods.registry import register
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier
from finebench.models.output import ModelOutput

HAOMOOD_SHIFT = 1e-5
"""The port's ``sqrt(x + 1e-5)`` (``src/bilinear_cnn_all.py`` forward)."""
SIGNED_EPS = 1e-12
"""Keeps the signed root's gradient finite next to zero (the paper's sign(x)·sqrt(|x|))."""


class BCNNOptions(MethodOptions):
    kind: Literal["bcnn"]
    sqrt: Literal["signed", "haomood"] = "signed"
    """``signed``: the paper's sign(x)·sqrt(|x|); ``haomood``: the PyTorch port's sqrt(x + 1e-5)."""
    reduce: Annotated[int, Field(ge=1)] | None = None
    """Channels of a 1x1 convolution (+ BatchNorm + ReLU) before pooling; None pools the backbone's
    last map as it is (512 is the usual choice on a 2048-channel ResNet)."""
    tap: str | None = None
    """The backbone tap pooled; None: the deepest. The paper's VGG-16 setting pools relu5_3, before
    the last max-pool (``torchvision:vgg16``'s ``features.29``; its deepest tap is pool5)."""


class BilinearHead(nn.Module):
    """Bilinear pooling + square root + L2 normalisation + linear classifier on one feature map.

    Pooling runs in float32 even under autocast: the C² sums overflow half precision."""

    def __init__(self, channels: int, num_classes: int, sqrt: str = "signed", reduce: int | None = None) -> None:
        super().__init__()
        self.reduce = (
            nn.Sequential(nn.Conv2d(channels, reduce, 1, bias=False), nn.BatchNorm2d(reduce), nn.ReLU(inplace=True))
            if reduce is not None else nn.Identity()
        )
        self.channels = reduce if reduce is not None else channels
        self.sqrt = sqrt
        self.fc = nn.Linear(self.channels**2, num_classes)
        # The port's fc initialisation (bilinear_cnn_fc.py): Kaiming normal, zero bias.
        nn.init.kaiming_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The normalised bilinear vector (B × C²) of a B × C × H × W map."""
        features = self.reduce(features)
        with torch.autocast(features.device.type, enabled=False):
            x = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
            x = x.flatten(2)
            gram = torch.bmm(x, x.transpose(1, 2)).flatten(1) / x.shape[2]
            if self.sqrt == "haomood":
                gram = torch.sqrt(gram + HAOMOOD_SHIFT)
            else:
                gram = torch.sign(gram) * torch.sqrt(gram.abs() + SIGNED_EPS)
            return F.normalize(gram)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(features))


class BCNNClassifier(ImageClassifier):
    """The backbone's last feature map (its deepest tap) through ``BilinearHead``."""

    def __init__(self, backbone: Backbone, num_classes: int, options: BCNNOptions) -> None:
        super().__init__(backbone, num_classes)
        pooled = backbone.tap_point(options.tap) if options.tap is not None else backbone.tap_points[-1]
        self.tap = pooled.name
        self.backbone_taps_read = (self.tap,)
        del self.classifier  # the bilinear head's fc replaces it
        self.head = BilinearHead(pooled.channels, num_classes, options.sqrt, options.reduce)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        _, taps = self.backbone(images, [self.tap], stop_after_taps=True)
        logits = self.head(taps[self.tap])
        return ModelOutput(F.log_softmax(logits.float(), dim=1), logits)


class BCNN(Method):
    kind = "bcnn"
    description = "bilinear pooling of the last feature map, square root, L2 norm, linear classifier (Lin et al. 2015)"
    Options = BCNNOptions
    options_added_later = ("tap",)

    def table_name(self, options: BCNNOptions) -> str:  # type: ignore[override]
        name = self.kind if options.sqrt == "signed" else f"{self.kind}-{options.sqrt}"
        name = name if options.reduce is None else f"{name}-r{options.reduce}"
        return name if options.tap is None else f"{name}-{options.tap}"

    def attach(self, backbone: Backbone, num_classes: int, options: BCNNOptions) -> ImageClassifier:  # type: ignore[override]
        check_tap(self.kind, backbone, options.tap)
        return BCNNClassifier(backbone, num_classes, options)


METHOD = register(BCNN())
