"""ECA (Wang et al. 2020) in every block, through timm's own layer: timm backbones only."""

from __future__ import annotations

from typing import Literal

from finebench.methods.base import MethodOptions
from finebench.methods.block_attention import BlockAttention
from finebench.methods.registry import register


class ECAOptions(MethodOptions):
    """ECA has no bottleneck: its 1-D kernel size follows the channel count, so no options."""

    kind: Literal["eca"]


class ECA(BlockAttention):
    kind = "eca"
    description = "ECA in every block (timm's EcaModule; timm backbones)"
    Options = ECAOptions
    layer = None


METHOD = register(ECA())
