"""Squeeze-and-Excitation (Hu et al. 2018) in every residual block."""

from __future__ import annotations

from typing import Literal

from finebench.methods.block_attention import BlockAttention, ReductionOptions
from finebench.methods.registry import register
from finebench.models.plugins import SqueezeExcite


class SEOptions(ReductionOptions):
    kind: Literal["se"]


class SE(BlockAttention):
    kind = "se"
    description = "Squeeze-and-Excitation in every residual block"
    Options = SEOptions
    layer = SqueezeExcite


METHOD = register(SE())
