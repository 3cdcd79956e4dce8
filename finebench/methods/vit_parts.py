"""What the ViT methods (TransFG, IELT) share: the official way of fitting a pretrained ViT to another
input size, the attention maps their token selections read, and the checks of the backbone.

Both official codes build the network at the target size and resize the pretrained position grid
once, with SciPy's linear zoom (bilinear with aligned corners); timm's own resize at load is bicubic
without aligned corners, a different embedding. So ``ViTMethod`` builds the backbone at its
pretrained size (the ``img_size`` backbone option only names the target) and the method's ``attach``
resizes the grid (``resize_position_grid``) to the size ``target_size`` reads back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods.base import Method, MethodOptions, incompatible
from finebench.models.base import Backbone
from finebench.models.registry import build_backbone

WORKS = "expected a timm Vision Transformer with a class token (timm:vit_*, e.g. timm:vit_base_patch16_224)"


def attention_probabilities(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """B x heads x N x N softmaxed attention of a timm ViT block on its input (no residual), as its
    non-fused path computes them: the selection reads them, the block's own forward stays fused."""
    attention = block.attn
    batch, count, _ = tokens.shape
    qkv = attention.qkv(block.norm1(tokens)).reshape(batch, count, 3, attention.num_heads, attention.head_dim)
    query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    query, key = attention.q_norm(query), attention.k_norm(key)
    return ((query * attention.scale) @ key.transpose(-2, -1)).softmax(dim=-1)


def resize_position_grid(embedding: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """1 x (1 + old grid) x D → 1 x (1 + new grid) x D: the CLS entry kept, the grid resized
    bilinearly with aligned corners (the official SciPy linear zoom)."""
    if old == new:
        return embedding
    cls, grid = embedding[:, :1], embedding[:, 1:]
    grid = grid.reshape(1, *old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bilinear", align_corners=True)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1)


def token_grid(vit: Any, size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Tokens per side of the patch embedding at ``size`` with ``stride`` (the patch: no overlap)."""
    return tuple((side - p) // stride + 1 for side, p in zip(size, vit.patch_embed.patch_size, strict=True))


def fit_to_input(vit: Any, size: tuple[int, int], grid: tuple[int, int], stride: int, dropout: float) -> None:
    """Refit a ViT built at its pretrained size to the run's, as both official codes do: the
    patch stride, the position grid resized once (``resize_position_grid``), and their ViT-B/16
    config's dropout after the embedding and in each MLP (none after the attention)."""
    embed = vit.patch_embed
    with torch.no_grad():
        resized = resize_position_grid(vit.pos_embed.detach(), tuple(embed.grid_size), grid)
    vit.pos_embed = nn.Parameter(resized)
    embed.proj.stride = (stride, stride)
    embed.img_size, embed.grid_size, embed.num_patches = size, grid, grid[0] * grid[1]
    vit.pos_drop.p = dropout
    for block in vit.blocks:
        block.mlp.drop1.p = block.mlp.drop2.p = dropout
        block.attn.proj_drop.p = 0.0


def embed_tokens(vit: Any, images: torch.Tensor, input_size: tuple[int, int], method: str) -> torch.Tensor:
    """The CLS token and the patch tokens with their positions, as the ViT's own forward makes them,
    for the size the model was fitted to (another is a one-line error naming it)."""
    if tuple(images.shape[-2:]) != input_size:
        raise FinebenchError(f"variant {method!r}: input {tuple(images.shape[-2:])} but the model was built for "
                             f"{input_size} (the backbone option img_size); expected the recipe's input_size")
    tokens = vit.patch_embed(images)
    if tokens.dim() == 4:  # a dynamic-size ViT's embedding keeps the grid (NHWC); the size is fixed here
        tokens = tokens.flatten(1, 2)
    tokens = torch.cat([vit.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + vit.pos_embed
    return vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))


def official_part_block_init(block: nn.Module) -> None:
    """The official ``Block``'s own initialisation: PyTorch's Linear default for the attention's
    projections, Xavier-uniform weights and N(0, 1e-6) biases in the MLP, LayerNorms at 1 and 0."""
    block.attn.qkv.reset_parameters()
    block.attn.proj.reset_parameters()
    for linear in (block.mlp.fc1, block.mlp.fc2):
        nn.init.xavier_uniform_(linear.weight)
        nn.init.normal_(linear.bias, std=1e-6)
    block.norm1.reset_parameters()
    block.norm2.reset_parameters()


def vision_transformer(backbone: Backbone, name: str = "the backbone", method: str = "transfg",
                       min_blocks: int = 3) -> Any:
    """The timm ViT inside a finebench backbone, or a one-line error saying what works (also IELT's)."""
    model = getattr(backbone, "model", None)
    needed = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")
    if model is None or not all(hasattr(model, n) for n in needed) or getattr(model, "cls_token", None) is None:
        raise incompatible(method, name, WORKS)
    if getattr(model, "num_reg_tokens", 0) or getattr(model, "no_embed_class", False) or len(model.blocks) < min_blocks:
        raise incompatible(method, name, WORKS + f" without register tokens, with at least {min_blocks} blocks")
    return model


def is_timm_vision_transformer(backbone: str) -> bool:
    """A ``timm:`` name built by timm's vision_transformer module (vit_*, test_vit, ...), or a name
    timm does not know (building it then gives timm's own one-line error)."""
    if not backbone.startswith("timm:"):
        return False
    import timm

    name = backbone.removeprefix("timm:").split(".", 1)[0]
    return not timm.models.is_model(name) or \
        timm.models.model_entrypoint(name).__module__ == "timm.models.vision_transformer"


class ViTMethod(Method):
    """A method on a timm ViT built at its pretrained size: the checks and the target size (module doc)."""

    def check_backbone(self, backbone: str, options: MethodOptions) -> None:
        """A timm model built by timm's vision_transformer module; ``attach`` checks the built model."""
        if not is_timm_vision_transformer(backbone):
            raise incompatible(self.kind, backbone, WORKS)

    def build_backbone(self, backbone: str, backbone_options: Mapping[str, Any] | None,
                       options: MethodOptions) -> Backbone:
        """At the pretrained size: ``attach`` resizes the position grid as the official loaders do."""
        kept = dict(backbone_options or {})
        target = kept.pop("img_size", None)
        net = build_backbone(backbone, kept or None)
        net.target_input_size = target  # read back by ``target_size``: the size the run feeds
        return net

    def target_size(self, backbone: Backbone) -> int | None:
        """The input size the run feeds (the ``img_size`` backbone option), None: the pretrained size."""
        target = getattr(backbone, "target_input_size", None)
        if target is not None and not isinstance(target, int):
            raise FinebenchError(f"variant {self.kind!r}: backbone option img_size={target!r}; expected one integer side")
        return target
