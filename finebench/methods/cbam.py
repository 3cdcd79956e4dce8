"""CBAM (Woo et al. 2018): channel then spatial attention in every residual block."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from finebench.methods.base import MethodOptions
from finebench.methods.block_attention import BlockAttention
from finebench.methods.registry import register
from finebench.models.plugins import CBAM as CBAMLayer


class CBAMOptions(MethodOptions):
    kind: Literal["cbam"]
    reduction: Annotated[int, Field(ge=1)] = 16
    """Channel reduction of the channel gate's MLP."""


class CBAM(BlockAttention):
    kind = "cbam"
    description = "CBAM in every residual block"
    Options = CBAMOptions
    layer = CBAMLayer


METHOD = register(CBAM())
