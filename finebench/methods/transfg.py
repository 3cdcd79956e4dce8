"""TransFG (He et al., AAAI 2022; TACJu/TransFG ``9336fba``, MIT): part selection on a ViT.

On any timm ViT with a class token (``timm:vit_*``), as the official ``models/modeling.py`` computes:

* overlapping patches: the patch embedding's stride becomes ``stride`` (default 3/4 of the patch,
  12 for 16: the official README's ``--split overlap``; the code's own default, non-overlapping, is
  ``stride`` = the patch), so 448 px gives 37 x 37 tokens;
* the position embedding is resized once, when the model is built, from the grid the pretrained
  weights were made for (14 x 14 for a 224 ViT) to the new one, bilinearly with the corners aligned
  (the official SciPy ``ndimage.zoom(order=1)``). The backbone is therefore built at its pretrained
  size and the ``img_size`` backbone option only names the target (timm's own resize at load, which
  the baseline gets, is bicubic without aligned corners: a different embedding);
* part selection: the softmaxed attention maps (CLS row and column included, per head) of every block
  but the last, multiplied later-on-the-left (A_{L-2} ... A_0); each head's most attended token in
  the CLS row; those tokens (duplicates kept) of the second-last block's output, after its CLS, go
  through the last block and the final norm (the official ``part_layer`` and ``part_norm``);
* the logits are the classifier on that CLS; the loss adds the contrastive term on it: cosine
  similarities of the L2-normalised CLS over the batch a forward pass sees (per device; under
  gradient accumulation per micro-batch), [sum over same-label pairs of (1 - s) + sum over
  different-label pairs of max(s - margin, 0)] / B^2, all ordered pairs and the diagonal included.

The selection is a choice of tokens (an argmax), so no gradient flows through it: the maps are
recomputed from each block's input under ``torch.no_grad`` and multiplied in place, while the blocks
themselves keep timm's fused attention for the forward and backward. The product costs
(L - 2) · heads · N^3 multiply-adds (N tokens), about twice a ViT-B forward at 448 px, as in the
official code; ``profile`` counts it.

The official loading leaves the last block randomly initialised (its ``load_from`` skips every child
named ``part*``) and gives the final norm the pretrained encoder norm: the default here, with the
official block's initialisation (PyTorch's Linear default for the attention, Xavier-uniform weights
and N(0, 1e-6) biases for the MLP); ``pretrained_part_block = true`` keeps the pretrained block.
The official ViT-B/16 config drops 0.1 after the embedding and in each MLP and nothing in the
attention: ``dropout`` (default 0.1) sets those same places on the timm model.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from finebench.errors import FinebenchError
from finebench.methods.base import MethodOptions, rows_of
from finebench.methods.registry import register
from finebench.methods.vit_parts import (
    ViTMethod,
    attention_probabilities,
    embed_tokens,
    fit_to_input,
    official_part_block_init,
    token_grid,
    vision_transformer,
)
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier
from finebench.models.output import ModelOutput


class TransFGOptions(MethodOptions):
    kind: Literal["transfg"]
    stride: Annotated[int, Field(ge=1)] | None = None
    """Patch stride; unset: 3/4 of the patch (12 for 16, the official ``--split overlap``)."""
    margin: Annotated[float, Field(ge=-1, le=1)] = 0.4
    """Cosine margin of the contrastive term for pairs of different labels."""
    contrastive_weight: Annotated[float, Field(ge=0)] = 1.0
    """Weight of the contrastive term beside the cross-entropy (official: 1)."""
    pretrained_part_block: bool = False
    """Keep the pretrained last block (official: randomly initialised, the loader skips it)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout after the embedding and in each MLP (official ViT-B/16 config; none in attention)."""


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, margin: float | torch.Tensor) -> torch.Tensor:
    """The official ``con_loss``: over all ordered pairs of the batch (the diagonal included),
    1 - cosine for equal labels, max(cosine - margin, 0) for different ones, summed and over B^2."""
    normalised = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)))  # fp16 → fp32
    cosine = normalised @ normalised.t()
    same = (labels[:, None] == labels[None, :]).to(cosine.dtype)
    pulled = ((1 - cosine) * same).sum()
    pushed = ((cosine - margin).clamp_min(0) * (1 - same)).sum()
    return (pulled + pushed) / labels.numel() ** 2


class TransFGClassifier(ImageClassifier):
    """The ViT's embedding and blocks with part selection before the last block (module docstring).

    In training, ``aux`` is (the part CLS after the final norm, the selected token indices B x heads,
    the margin and the contrastive weight as 0-dim tensors)."""

    def __init__(self, backbone: Backbone, num_classes: int, options: TransFGOptions, input_size: int | None) -> None:
        super().__init__(backbone, num_classes)
        vit = vision_transformer(backbone)
        embed = vit.patch_embed
        patch = tuple(embed.patch_size)
        stride = options.stride or patch[0] * 3 // 4
        if stride > min(patch):
            raise FinebenchError(f"variant 'transfg': stride {stride} is larger than the patch {patch[0]}; expected "
                                 f"1 to {patch[0]} ({patch[0] * 3 // 4}: the official overlap, {patch[0]}: none)")
        size = (input_size, input_size) if input_size else tuple(embed.img_size)
        if min(size) < max(patch):
            raise FinebenchError(f"variant 'transfg': input_size {size[0]} is smaller than the patch {patch[0]}")
        fit_to_input(vit, size, token_grid(vit, size, stride), stride, options.dropout)
        if not options.pretrained_part_block:
            official_part_block_init(vit.blocks[-1])
        self.input_size = size
        # the loss reads them from the output (one method object serves every variant), as MCL's alpha;
        # float64 so that a float64 model uses 0.4 itself (0-dim: they never promote a float32 loss)
        self.register_buffer("margin", torch.tensor(options.margin, dtype=torch.float64), persistent=False)
        self.register_buffer("contrastive_weight", torch.tensor(options.contrastive_weight, dtype=torch.float64),
                             persistent=False)

    def forward(self, images: torch.Tensor, selected: torch.Tensor | None = None) -> ModelOutput:
        """``selected`` (B x heads token indices, 1-based as the official) replaces the argmax
        (golden tests feed the official decisions in)."""
        vit = self.backbone.model
        tokens = embed_tokens(vit, images, self.input_size, "transfg")
        product = None
        for block in vit.blocks[:-1]:
            if selected is None:
                with torch.no_grad():
                    maps = attention_probabilities(block, tokens)
                    product = maps if product is None else maps @ product
            tokens = block(tokens)
        if selected is None:
            assert product is not None
            selected = product[:, :, 0, 1:].argmax(dim=2) + 1
        batch, heads = selected.shape
        offsets = torch.arange(batch, device=selected.device)[:, None] * tokens.shape[1]
        parts = rows_of(tokens.reshape(-1, tokens.shape[-1]), (selected + offsets).reshape(-1))
        tokens = torch.cat([tokens[:, :1], parts.reshape(batch, heads, -1)], dim=1)
        cls = vit.norm(vit.blocks[-1](tokens))[:, 0]
        logits = self.classifier(cls)
        log_probs = F.log_softmax(logits.float(), dim=1)
        if not self.training:
            return ModelOutput(log_probs, logits)
        return ModelOutput(log_probs, logits, aux=(cls, selected, self.margin, self.contrastive_weight))


class TransFG(ViTMethod):
    kind = "transfg"
    description = "TransFG: part selection by attention rollout before the last ViT block, contrastive loss (He et al. 2022)"
    Options = TransFGOptions

    def table_name(self, options: TransFGOptions) -> str:  # type: ignore[override]
        parts = [self.kind]
        if options.stride is not None:
            parts.append(f"s{options.stride}")
        if options.pretrained_part_block:
            parts.append("pretrained-part")
        default = TransFGOptions(kind="transfg")
        parts += [f"{key}{getattr(options, key):g}" for key in ("margin", "contrastive_weight", "dropout")
                  if getattr(options, key) != getattr(default, key)]
        return "-".join(parts)

    def attach(self, backbone: Backbone, num_classes: int, options: TransFGOptions) -> ImageClassifier:  # type: ignore[override]
        return TransFGClassifier(backbone, num_classes, options, self.target_size(backbone))

    def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        logits = output.logits.to(torch.promote_types(output.logits.dtype, torch.float32))  # fp16 → fp32, f64 kept
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        if output.aux:
            cls, _, margin, weight = output.aux
            loss = loss + weight * contrastive_loss(cls, labels, margin)
        return loss


METHOD = register(TransFG())
