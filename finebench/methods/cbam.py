"""CBAM (Woo et al. 2018): channel then spatial attention in every residual block."""

from __future__ import annotations

from typing import Literal

from finebench.methods.block_attention import BlockAttention, ReductionOptions
from finebench.methods.registry import register
from finebench.models.plugins import CBAM as CBAMLayer


class CBAMOptions(ReductionOptions):
    kind: Literal["cbam"]


class CBAM(BlockAttention):
    kind = "cbam"
    description = "CBAM in every residual block"
    Options = CBAMOptions
    layer = CBAMLayer


METHOD = register(CBAM())
