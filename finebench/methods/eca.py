"""ECA (Wang et al. 2020) in every block, through timm's own layer: timm backbones only.

ECA has no bottleneck (its 1-D kernel size follows the channel count), so it has no options."""

from __future__ import annotations

from finebench.methods.block_attention import block_attention_method

METHOD = block_attention_method("eca", "ECA in every block (timm's EcaModule; timm backbones)", None)
