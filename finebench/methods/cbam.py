"""CBAM (Woo et al. 2018): channel then spatial attention in every residual block."""

from __future__ import annotations

from finebench.methods.block_attention import ReductionOptions, block_attention_method
from finebench.models.plugins import CBAM

METHOD = block_attention_method("cbam", "CBAM in every residual block", CBAM, ReductionOptions)
