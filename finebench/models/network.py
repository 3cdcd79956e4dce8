"""The one model class every variant is: backbone + linear classifier (+ Attend and Rectify)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finebench.models.attention import AttendAndRectify
from finebench.models.base import PARAMETER_PROBE_SIZE, Backbone
from finebench.models.output import ModelOutput


class ImageClassifier(nn.Module):
    """Classifies images with a backbone; Attend and Rectify, when present, rectifies the output.

    Block plug-ins (SE, CBAM) live inside the backbone's blocks; this class does not need to know.
    """

    backbone_taps_read: tuple[str, ...] | None = None
    """The taps after which every forward of the model stops reading its backbone (a method pooling
    one feature map; PMG's three stages); None: the whole backbone, to its pooled features."""

    each_backward_reaches_every_parameter: bool = True
    """False where the method's step backpropagates losses of one head at a time (PMG's progressive
    steps): the other heads then get no gradient in that backward, and DDP must look for them at
    each backward (``find_unused_parameters``) or it stops at the next step waiting for them."""

    def __init__(self, backbone: Backbone, num_classes: int, attention: AttendAndRectify | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.out_channels, num_classes)
        backbone.init_classifier(self.classifier)
        self.attention = attention
        self.num_classes = num_classes
        self._unused_parameter_names: list[str] | None = None

    def unused_parameter_names(self, input_size: int | None = None) -> list[str]:
        """Backbone parameters no forward of this model reads: those past ``backbone_taps_read``
        (VGG-16's fc6/fc7 under B-CNN, Inception's Mixed_7 under WS-DAN at Mixed_6e) or off the
        path to the pooled features (Inception's auxiliary head). They stay in the state dict
        (weights load as before, checkpoints keep their keys) but are left out of the parameter
        count and of DDP's all-reduce, which would otherwise stop at the second step waiting for
        their gradients. Found once, on first use (costing, DDP), not at every build, by a probe
        at ``input_size``, the run's images (a ViT takes no other size); None, where the caller
        knows no size (DDP wrapping): what an earlier call found, else a probe at
        ``PARAMETER_PROBE_SIZE``."""
        if self._unused_parameter_names is None:
            size = PARAMETER_PROBE_SIZE if input_size is None else input_size
            unread = self.backbone.parameters_unread(self.backbone_taps_read, size)
            self._unused_parameter_names = [f"backbone.{name}" for name in unread]
        return list(self._unused_parameter_names)

    @property
    def attention_taps(self) -> list[str]:
        """Tap names in the order of ``ModelOutput.module_logits`` (deepest first); empty without attention."""
        return list(self.attention.taps) if self.attention is not None else []

    def tap_summary(self) -> list[dict[str, Any]]:
        """Where each attention module reads, from the backbone's own tap declarations, in module
        order: ``{"module", "tap", "channels", "stride"}`` (``summary.json``'s ``taps``). Without
        attention, the taps a head pools (``backbone_taps_read``: B-CNN at relu5_3, PMG's three
        stages) as module "head"; empty for a model reading the pooled features."""
        if self.attention is None:
            return [self.tap_entry("head", tap) for tap in self.backbone_taps_read or ()]
        return [self.tap_entry(f"attention.attention_modules.{index}", tap)
                for index, tap in enumerate(self.attention.taps)]

    def tap_entry(self, module: str, tap: str) -> dict[str, Any]:
        """One ``tap_summary`` entry: the module reading ``tap``, and the tap as the backbone declares it."""
        point = self.backbone.tap_point(tap)
        return {"module": module, "tap": tap, "channels": point.channels, "stride": point.stride}

    def forward(self, images: torch.Tensor) -> ModelOutput:
        pooled, taps = self.backbone(images, self.attention_taps)
        assert pooled is not None
        logits = self.classifier(pooled)
        if self.attention is None:
            return ModelOutput(F.log_softmax(logits.float(), dim=1), logits)
        return self.attention(taps, pooled, logits)

    def early_prediction(self, images: torch.Tensor, tap: str) -> torch.Tensor:
        """Logits of the attention module on ``tap`` alone, running the backbone only up to that tap."""
        if self.attention is None or tap not in self.attention.taps:
            raise ValueError(f"no attention module on tap {tap!r}; modules are on {self.attention_taps}")
        _, taps = self.backbone(images, [tap], stop_after_taps=True)
        return self.attention.attention_modules[self.attention.taps.index(tap)](taps[tap])[0]


class EarlyPrediction(nn.Module):
    """``ImageClassifier.early_prediction`` on one tap as a module (what profiling traces)."""

    def __init__(self, model: ImageClassifier, tap: str) -> None:
        super().__init__()
        self.model = model
        self.tap = tap

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.early_prediction(images, self.tap)


def unwrap(model: nn.Module) -> nn.Module:
    """The ImageClassifier inside DDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while not isinstance(model, ImageClassifier):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"{type(model).__name__} is not a finebench model")
        model = inner
    return model


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split parameters into "backbone" (what ImageNet weights initialise, for a reduced lr) and
    "head" (classifier, Attend and Rectify and every block plug-in: new weights, full lr)."""
    classifier = unwrap(model)
    plugin_ids = {id(p) for m in classifier.backbone.plugin_modules() for p in m.parameters()}
    backbone = [p for p in classifier.backbone.parameters() if id(p) not in plugin_ids]
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in classifier.parameters() if id(p) not in backbone_ids]
    return {"backbone": backbone, "head": head}


def used_parameter_count(model: nn.Module, input_size: int | None = None) -> int:
    """Parameters a finebench model's forward on ``input_size`` images reads
    (``ImageClassifier.unused_parameter_names`` left out); any other module: all of its parameters."""
    try:
        classifier = unwrap(model)
    except TypeError:  # not a finebench model
        return sum(p.numel() for p in model.parameters())
    unused = set(classifier.unused_parameter_names(input_size))
    return sum(p.numel() for name, p in classifier.named_parameters() if name not in unused)


def drop_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Keep ``parameters`` out of the next optimiser step: torch's optimisers skip a parameter whose
    gradient is None (no update, no weight decay, no momentum), unlike a zero gradient, which
    still decays and moves with momentum. Used for the backbone's head-only epochs."""
    for parameter in parameters:
        parameter.grad = None
