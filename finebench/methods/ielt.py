"""IELT (Xu et al., IEEE TMM 2023; mobulan/IELT ``b185111``, MIT): internal ensemble learning on a ViT.

On any timm ViT with a class token (``timm:vit_*``), as the official ``models/IELT.py`` computes:

* non-overlapping patches; the position embedding is resized once, when the model is built, from
  the grid the pretrained weights were made for (14 x 14 for a 224 ViT) to the run's (28 x 28 at
  448 px), bilinearly with the corners aligned (the official loader's SciPy ``ndimage.zoom(order=1)``,
  as TransFG's); the backbone is built at its pretrained size and ``img_size`` names the target;
* multi-head voting: after each block but the last, each head's softmaxed CLS-row attention (on the
  block's input, no residual) votes for its ``votes_per_head`` most attended patches; the votes of
  one image are counted per patch, smoothed over the patch grid by the unnormalised 3 x 3 kernel
  [[1,2,1],[2,4,2],[1,2,1]], sorted in descending order, and the first ``round(select_num[t])``
  patches of that block's *output* are kept;
* cross-layer refinement: the kept tokens of every layer (layer by layer, each in vote order) after
  the CLS output of the second-last block go through an extra block and a LayerNorm ("CLR"); its
  heads vote again (``votes_per_head`` each, no smoothing) and the ``key_tokens`` most voted CLR
  outputs (after the norm) after that same CLS go through a second extra block and LayerNorm ("key");
* logits: part = head(key CLS) + softmax(head(CLR CLS)) * (sum of each class's head weights), the
  CLR logits being the "complement"; training loss (1 - w) CE(part) + w CE(complement), w =
  ``complement_weight`` (0.4); the prediction is the part logits;
* dynamic selection: the layer shares start at ``select_numbers`` / their sum; once the training
  forwards reach ``update_after_epochs`` epochs' worth, every training forward moves them by
  ``rate_step`` (0.1 %) towards the share of the key tokens coming from each layer, the layer
  boundaries taken from the *unrounded* counts (the official ``count_patch``; ``rounded_boundaries``
  credits each token to the layer it was kept from), and renormalises;
* initialisation: the head is zero; the extra blocks are drawn afresh with the official ``Block``'s
  own initialisation, or, with ``extra_blocks_from_last`` (the Dogs setting of the shipped log), both copy the
  pretrained last block. The backbone's last block and final norm are not used (the official model
  has no such block; ``unused_parameter_names`` leaves them out of the count and of DDP).

Where finebench departs (docs/PEERS.md): votes are counted in float32 instead of float16 (they are
small integers, exact in both) and ties among equal votes go to the lower patch index (a stable
sort; the official order is CUDA's unstable sort); the shares are a model buffer, so checkpoints
keep and resume them (the official's are a plain tensor outside the state dict, reset on resume,
one per DDP rank; under finebench's DDP they are rank 0's, broadcast with the buffers); the
epoch length behind the warm-up is learnt from the first epoch, so the start is exact for
``update_after_epochs`` >= 2 (with 1 it starts one forward late). The selection is a choice of
tokens, so no gradient flows through it: the CLS rows are recomputed from each block's input under
``torch.no_grad`` while the blocks keep timm's fused attention for the forward and backward.
The official ViT-B/16 config drops 0.1 after the embedding and in each MLP: ``dropout``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods.base import (
    MethodOptions,
    StepContext,
    StepResult,
    add_terms,
)
from finebench.methods.registry import register
from finebench.methods.vit_parts import (
    ViTMethod,
    embed_tokens,
    fit_to_input,
    official_part_block_init,
    token_grid,
    vision_transformer,
)
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier, unwrap
from finebench.models.output import ModelOutput

OFFICIAL_SELECT_NUMBERS = (16, 14, 12, 10, 8, 6, 8, 10, 12, 14, 16)
"""Tokens kept after each of a 12-block ViT's first 11 blocks (official ``select_rate`` x 126)."""
SMOOTHING_KERNEL = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))
"""The official ``enhace_local`` kernel (``fix = True``): unnormalised, zero padding."""


class IELTOptions(MethodOptions):
    kind: Literal["ielt"]
    select_numbers: list[Annotated[int, Field(ge=1)]] | None = None
    """Tokens kept after each block but the last (one entry per block); unset: the official
    16,14,12,10,8,6,8,10,12,14,16 (a 12-block ViT). Their sum is the official ``total_num``."""
    votes_per_head: Annotated[int, Field(ge=1)] = 24
    """Patches each head votes for (official ``vote_perhead``)."""
    key_tokens: Annotated[int, Field(ge=1)] = 24
    """CLR tokens the key block reads (the official hard-coded 24)."""
    complement_weight: Annotated[float, Field(ge=0, le=1)] = 0.4
    """Weight of the CLR (complement) logits' cross-entropy; the part logits' gets 1 minus it (``loss_alpha``)."""
    dynamic_selection: bool = True
    """Move the per-layer token counts towards the layers the key tokens come from (``dsm``)."""
    update_after_epochs: Annotated[int, Field(ge=0)] = 10
    """Training epochs before the counts start to move (official ``update_warm``)."""
    rate_step: Annotated[float, Field(gt=0, le=1)] = 0.001
    """How far each training forward moves the shares (the official hard-coded 1e-3)."""
    rounded_boundaries: bool = False
    """Credit each key token to the layer it was kept from (boundaries at the rounded counts the
    forward kept). Official, a bug kept as the default: boundaries at the unrounded shares, which
    credit a token near a boundary to the neighbouring layer and tokens past the last to none."""
    extra_blocks_from_last: bool = False
    """Both extra blocks copy the pretrained last block (the Dogs setting of the shipped log); otherwise fresh."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout after the embedding and in each MLP (official ViT-B/16 config; none in attention)."""


def cls_attention(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """B x heads x (N - 1): each head's softmaxed attention of the CLS query over the other tokens,
    on the block's input, as timm's non-fused path computes it (only the CLS query and the keys)."""
    attention = block.attn
    normed = block.norm1(tokens)
    batch, count, _ = normed.shape
    width = attention.num_heads * attention.head_dim
    weight, bias = attention.qkv.weight, attention.qkv.bias
    query = F.linear(normed[:, :1], weight[:width], None if bias is None else bias[:width])
    key = F.linear(normed, weight[width:2 * width], None if bias is None else bias[width:2 * width])
    query = attention.q_norm(query.reshape(batch, 1, attention.num_heads, attention.head_dim).transpose(1, 2))
    key = attention.k_norm(key.reshape(batch, count, attention.num_heads, attention.head_dim).transpose(1, 2))
    return ((query * attention.scale) @ key.transpose(-2, -1)).softmax(dim=-1)[:, :, 0, 1:]


def head_votes(scores: torch.Tensor, per_head: int, grid: tuple[int, int] | None) -> torch.Tensor:
    """B x P votes (float32, whole numbers): each head's ``per_head`` highest scores count one
    each; with ``grid``, smoothed over the patch grid by ``SMOOTHING_KERNEL`` (the official
    ``MultiHeadVoting``, in float32 rather than float16: the same integers)."""
    batch, _, patches = scores.shape
    top = scores.topk(per_head, dim=-1).indices.reshape(batch, -1)
    votes = torch.zeros(batch, patches, device=scores.device).scatter_add_(
        1, top, torch.ones(top.shape, device=scores.device))
    if grid is None:
        return votes
    kernel = torch.tensor(SMOOTHING_KERNEL, device=scores.device)[None, None]
    return F.conv2d(votes.reshape(batch, 1, *grid), kernel, padding=1).reshape(batch, patches)


def most_voted(votes: torch.Tensor, count: int) -> torch.Tensor:
    """B x count token indices (1-based: 0 is the CLS) in descending vote order, ties to the lower
    patch (a stable sort; the official CUDA sort orders ties its own way)."""
    return votes.sort(dim=1, descending=True, stable=True).indices[:, :count] + 1


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """B x K x D rows ``index`` (B x K) of each image's tokens; distinct rows per image (a sort's
    slice), so the backward's scatter adds one value per place and repeats bit for bit."""
    return torch.gather(tokens, 1, index[:, :, None].expand(-1, -1, tokens.shape[-1]))


def layer_counts(rates: torch.Tensor, total: int, key_selected: torch.Tensor, *, rounded: bool = False) -> torch.Tensor:
    """Per layer, how many of the batch's key tokens came from it (the official ``count_patch``):
    a token at CLR position i (0-based) belongs to the first layer whose cumulative *unrounded*
    count exceeds i; tokens past the last boundary count nowhere. ``rounded``: the cumulative
    counts the forward kept (round(share x total)), so each token is credited to its own layer."""
    counts = rates * total
    bounds = torch.cumsum(torch.round(counts) if rounded else counts, dim=0)
    index = (key_selected - 1).reshape(-1)
    cumulative = (index[None, :] < bounds[:, None]).sum(dim=1)
    return torch.diff(cumulative, prepend=cumulative.new_zeros(1))


def updated_rates(rates: torch.Tensor, counts: torch.Tensor, step: float) -> torch.Tensor:
    """The official ``update_layer_select``: move towards the counts' shares, renormalise."""
    rates = rates * (1 - step) + step * (counts.to(rates.dtype) / counts.sum())
    return rates / rates.sum()


class IELTClassifier(ImageClassifier):
    """The ViT's embedding and all blocks but the last, with multi-head voting, cross-layer
    refinement and the key block (module docstring).

    Buffers (checkpointed): ``select_rate`` (float32 values: the official tensor's precision,
    whatever the model's dtype), ``training_forwards``, ``warm_forwards`` (-1 until the epoch length
    is known). In training, ``aux`` is (complement logits, the complement weight as a 0-dim tensor,
    the key selection B x key_tokens, the CLR votes B x CLR-tokens, the layers' selections
    concatenated B x sum(counts), the layers' votes B x layers x patches)."""

    def __init__(self, backbone: Backbone, num_classes: int, options: IELTOptions, input_size: int | None) -> None:
        super().__init__(backbone, num_classes)
        vit = vision_transformer(backbone, method="ielt", min_blocks=3)  # two voting layers to refine across
        depth = len(vit.blocks)
        numbers = list(options.select_numbers or OFFICIAL_SELECT_NUMBERS)
        if len(numbers) != depth - 1:
            given = "select_numbers has" if options.select_numbers else "the official select_numbers have"
            raise FinebenchError(f"variant 'ielt': {given} {len(numbers)} entries but the backbone has {depth} "
                                 f"blocks; expected {depth - 1} (one per block before the last)")
        embed = vit.patch_embed
        patch = tuple(embed.patch_size)
        size = (input_size, input_size) if input_size else tuple(embed.img_size)
        grid = token_grid(vit, size, patch[0])  # patches do not overlap
        patches = grid[0] * grid[1]
        total = sum(numbers)
        for what, value, limit, of in (("votes_per_head", options.votes_per_head, patches, "patch tokens"),
                                       ("select_numbers entry", max(numbers), patches, "patch tokens"),
                                       ("votes_per_head", options.votes_per_head, total, "selected tokens"),
                                       ("key_tokens", options.key_tokens, total, "selected tokens")):
            if value > limit:
                raise FinebenchError(f"variant 'ielt': {what} {value} exceeds the {limit} {of} of input_size "
                                     f"{size[0]} (patch {patch[0]}); expected at most {limit}")
        fit_to_input(vit, size, grid, patch[0], options.dropout)
        self.clr_block = copy.deepcopy(vit.blocks[-1])
        self.key_block = copy.deepcopy(vit.blocks[-1])
        if not options.extra_blocks_from_last:
            official_part_block_init(self.clr_block)
            official_part_block_init(self.key_block)
        width = vit.pos_embed.shape[-1]
        self.clr_norm = nn.LayerNorm(width, eps=1e-6)
        self.key_norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.input_size, self.grid, self.total = size, grid, total
        self.votes_per_head, self.key_tokens = options.votes_per_head, options.key_tokens
        self.dynamic_selection, self.rate_step = options.dynamic_selection, options.rate_step
        self.rounded_boundaries = options.rounded_boundaries
        self.register_buffer("select_rate", torch.tensor(numbers) / total)
        self.register_buffer("training_forwards", torch.zeros((), dtype=torch.long))
        self.register_buffer("warm_forwards", torch.tensor(0 if options.update_after_epochs == 0 else -1))
        self.update_after_epochs = options.update_after_epochs
        self.complement_weight = options.complement_weight

    def unused_parameter_names(self, input_size: int | None = None) -> list[str]:
        """The backbone's last block and final norm (and any head of its own): IELT reads the
        embedding and the blocks before the last only, at any ``input_size`` (no probe needed)."""
        read = ("patch_embed.", "cls_token", "pos_embed", "norm_pre.") + tuple(
            f"blocks.{index}." for index in range(len(self.backbone.model.blocks) - 1))
        return [f"backbone.{name}" for name, _ in self.backbone.named_parameters()
                if not name.removeprefix("model.").startswith(read)]

    def select_counts(self) -> list[int]:
        """Tokens kept after each block now: round(share x total), as the official (half to even)."""
        return torch.round(self.select_rate.float() * self.total).long().tolist()

    def start_step(self, epoch: int) -> None:
        """Learn when the counts start to move: ``update_after_epochs`` x the first epoch's forwards
        (the official ``update_warm`` x steps per epoch), known once the second epoch starts."""
        if int(self.warm_forwards) < 0 and epoch > 1:
            self.warm_forwards.fill_(self.update_after_epochs * int(self.training_forwards) // (epoch - 1))

    def forward(self, images: torch.Tensor, selected: Sequence[torch.Tensor] | None = None,
                key_selected: torch.Tensor | None = None) -> ModelOutput:
        """``selected`` (one B x count tensor per block but the last) and ``key_selected`` (B x
        key_tokens), 1-based token indices as the official's, replace the vote sorts (golden tests
        feed the official decisions in; the votes are still computed and returned)."""
        vit = self.backbone.model
        tokens = embed_tokens(vit, images, self.input_size, "ielt")
        if self.training:
            self.training_forwards += 1
        counts = self.select_counts()
        parts, chosen, layer_votes = [], [], []
        for index, block in enumerate(vit.blocks[:-1]):
            with torch.no_grad():
                scores = cls_attention(block, tokens)
            tokens = block(tokens)
            with torch.no_grad():
                votes = head_votes(scores, self.votes_per_head, self.grid)
                picked = most_voted(votes, counts[index]) if selected is None else selected[index]
            parts.append(gather_tokens(tokens, picked))
            chosen.append(picked)
            layer_votes.append(votes)
        cls = tokens[:, :1]
        refined_input = torch.cat([cls, *parts], dim=1)
        with torch.no_grad():
            key_votes = head_votes(cls_attention(self.clr_block, refined_input), self.votes_per_head, None)
            key_picked = most_voted(key_votes, self.key_tokens) if key_selected is None else key_selected
        refined = self.clr_norm(self.clr_block(refined_input))
        if self.training and self.dynamic_selection and 0 <= int(self.warm_forwards) <= int(self.training_forwards):
            self.update_rates(key_picked)
        key = self.key_norm(self.key_block(torch.cat([cls, gather_tokens(refined, key_picked)], dim=1)))
        complement = self.classifier(refined[:, 0])
        logits = self.classifier(key[:, 0]) + complement.softmax(dim=-1) * self.classifier.weight.sum(dim=-1)
        log_probs = F.log_softmax(logits.float(), dim=1)
        if not self.training:
            return ModelOutput(log_probs, logits)
        # float64 whatever the model's dtype (a buffer would follow .to(dtype)): 1 - 0.4 is then the official 0.6
        weight = torch.tensor(self.complement_weight, dtype=torch.float64, device=logits.device)
        aux = (complement, weight, key_picked, key_votes, torch.cat(chosen, dim=1),
               torch.stack(layer_votes, dim=1))
        return ModelOutput(log_probs, logits, aux=aux)

    @torch.no_grad()
    def update_rates(self, key_selected: torch.Tensor) -> None:
        """One dynamic-selection move from this forward's key tokens (in float32, as the official)."""
        rates = self.select_rate.float()
        counts = layer_counts(rates, self.total, key_selected, rounded=self.rounded_boundaries)
        self.select_rate.copy_(updated_rates(rates, counts, self.rate_step))


class IELT(ViTMethod):
    kind = "ielt"
    description = "IELT: multi-head voting, cross-layer refinement and dynamic selection on a ViT (Xu et al. 2023)"
    Options = IELTOptions

    def table_name(self, options: IELTOptions) -> str:  # type: ignore[override]
        parts = [self.kind]
        if options.select_numbers is not None:
            parts.append("sel" + "-".join(map(str, options.select_numbers)))
        if not options.dynamic_selection:
            parts.append("static")
        if options.extra_blocks_from_last:
            parts.append("from-last")
        if options.rounded_boundaries:
            parts.append("rounded-boundaries")
        default = IELTOptions(kind="ielt")
        parts += [f"{key}{getattr(options, key):g}" for key in
                  ("votes_per_head", "key_tokens", "complement_weight", "update_after_epochs", "rate_step", "dropout")
                  if getattr(options, key) != getattr(default, key)]
        return "-".join(parts)

    def settings(self, options: IELTOptions) -> str:  # type: ignore[override]
        numbers = ",".join(map(str, options.select_numbers or OFFICIAL_SELECT_NUMBERS))
        parts = [f"select {numbers}", f"{options.votes_per_head} votes/head", f"{options.key_tokens} key tokens",
                 f"complement weight {options.complement_weight:g}",
                 f"dynamic after {options.update_after_epochs} epochs, step {options.rate_step:g}"
                 if options.dynamic_selection else "static selection"]
        if options.extra_blocks_from_last:
            parts.append("extra blocks from the last")
        if options.rounded_boundaries:
            parts.append("rounded layer boundaries")
        return " · ".join([*parts, f"dropout {options.dropout:g}"])

    def attach(self, backbone: Backbone, num_classes: int, options: IELTOptions) -> ImageClassifier:  # type: ignore[override]
        return IELTClassifier(backbone, num_classes, options, self.target_size(backbone))

    def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """(1 - w) CE(part) + w CE(complement) in training; CE(part) on an evaluation output."""
        def cross_entropy(logits: torch.Tensor) -> torch.Tensor:
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16 → fp32, f64 kept
            return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

        part = cross_entropy(output.logits)
        if not output.aux:
            return part
        complement, weight = output.aux[0], output.aux[1]  # weight: float64 (IELTClassifier.forward)
        return (1 - weight).to(part.dtype) * part + weight.to(part.dtype) * cross_entropy(complement)

    def train_step(self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """The engine's one-pass step, after telling the model the epoch (the warm-up of the dynamic
        selection is counted in epochs of forwards)."""
        model = unwrap(ctx.model)
        assert isinstance(model, IELTClassifier)
        model.start_step(ctx.epoch)
        ctx.zero_grad()
        total = torch.zeros((), device=labels.device)
        correct = torch.zeros((), device=labels.device, dtype=torch.long)
        terms: dict[str, torch.Tensor] = {}
        for part in ctx.micro_batches(images, labels):
            output = ctx.forward(part.images)
            loss = self.loss(output, part.labels, label_smoothing=ctx.label_smoothing)
            ctx.backward(loss, part)
            total += loss.detach().float() * part.weight
            correct += (output.logits.argmax(dim=1) == part.labels).sum()
            terms = add_terms(terms, self.loss_terms(output, part.labels), part.weight)
        ctx.optimizer_step()
        return StepResult(total, correct, terms=terms)


METHOD = register(IELT())
