"""Squeeze-and-Excitation (Hu et al. 2018) in every residual block."""

from __future__ import annotations

from finebench.methods.block_attention import ReductionOptions, block_attention_method
from finebench.models.plugins import SqueezeExcite

METHOD = block_attention_method("se", "Squeeze-and-Excitation in every residual block", SqueezeExcite,
                                ReductionOptions)
