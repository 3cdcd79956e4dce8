"""Squeeze-and-Excitation (Hu et al. 2018) in every residual block."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from finebench.methods.base import MethodOptions
from finebench.methods.block_attention import BlockAttention
from finebench.methods.registry import register
from finebench.models.plugins import SqueezeExcite


class SEOptions(MethodOptions):
    kind: Literal["se"]
    reduction: Annotated[int, Field(ge=1)] = 16
    """Channel reduction of the bottleneck MLP."""


class SE(BlockAttention):
    kind = "se"
    description = "Squeeze-and-Excitation in every residual block"
    Options = SEOptions
    layer = SqueezeExcite


METHOD = register(SE())
