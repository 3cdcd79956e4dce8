"""What SE, CBAM and ECA share: a layer in every residual block, attached in one of two ways.

On a registered backbone (wrn, resnext_cifar, resnet..., wide_resnet...) finebench's own layer goes
into each block (``Backbone.insert_plugins``); on ``timm:<name>`` timm builds its own layer of the
same name into its blocks (``TimmBackbone(block_attention=...)``), so timm's pretrained weights
load around them. ``torchvision:<name>`` graphs have no block to put a layer into.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, create_model
from torch import nn

from finebench.methods.base import Method, MethodOptions, incompatible
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier
from finebench.models.registry import BACKBONES, build_backbone, family_of
from finebench.methods.registry import register
from finebench.models.timm_backbone import TimmBackbone


class ReductionOptions(MethodOptions):
    """Options of a block layer with a bottleneck MLP (SE, CBAM); subclasses narrow ``kind``."""

    reduction: Annotated[int, Field(ge=1)] = 16
    """Channel reduction of the layer's bottleneck MLP (CBAM: of its channel gate)."""


class BlockAttention(Method):
    """Base of the block-attention methods: ``layer`` is finebench's own module (None: timm only)."""

    layer: ClassVar[Callable[..., nn.Module] | None] = None

    def reduction(self, options: MethodOptions) -> int | None:
        """The layer's bottleneck reduction; None for a layer without one (ECA)."""
        return getattr(options, "reduction", None)

    def table_name(self, options: MethodOptions) -> str:
        reduction = getattr(options, "reduction", None)
        return f"{self.kind}-r{reduction}" if reduction is not None and reduction != 16 else self.kind

    def check_backbone(self, backbone: str, options: MethodOptions) -> None:
        family = family_of(backbone)
        if family is not None and family.builds_block_attention:
            return
        if self.layer is None:
            raise incompatible(self.kind, backbone, "expected a timm backbone (timm:<name>)")
        if family is not None:
            raise incompatible(self.kind, backbone, "its layers need a registered backbone or a timm model "
                               f"(timm:<name>); torchvision: graphs have no blocks to put them in ({', '.join(BACKBONES)} do)")

    def build_backbone(self, backbone: str, backbone_options: Mapping[str, Any] | None,
                       options: MethodOptions) -> Backbone:
        self.check_backbone(backbone, options)
        if family_of(backbone) is not None:  # timm: its own layers, built in before its weights load
            return build_backbone(backbone, backbone_options, (self.kind, self.reduction(options)))
        return build_backbone(backbone, backbone_options)

    def attach(self, backbone: Backbone, num_classes: int, options: MethodOptions) -> ImageClassifier:
        if not isinstance(backbone, TimmBackbone):
            assert self.layer is not None
            backbone.insert_plugins(partial(self.layer, **options.options()))
        return ImageClassifier(backbone, num_classes)


def block_attention_method(kind: str, description: str, layer: Callable[..., nn.Module] | None,
                           options: type[MethodOptions] = MethodOptions) -> BlockAttention:
    """Declare and register a block-attention method: its options are ``options`` with ``kind``
    narrowed to ``Literal[kind]``. SE, CBAM and ECA differ only in name, layer and options, so
    each module is this one call rather than two near-identical classes."""
    options_class = create_model(f"{kind.upper()}Options", __base__=options,
                                 kind=(Literal[kind], ...))  # type: ignore[call-overload, valid-type]
    method_class = type(kind.upper(), (BlockAttention,), {
        "kind": kind, "description": description, "Options": options_class, "layer": layer,
        "__doc__": description, "__module__": f"finebench.methods.{kind}",
    })
    return register(method_class())
