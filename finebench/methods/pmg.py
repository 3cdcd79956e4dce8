"""Progressive Multi-Granularity training (Du et al., ECCV 2020;
PRIS-CV/PMG-Progressive-Multi-Granularity-Training ``db7a7d7``).

Three heads read the backbone's last three stages (official: ResNet-50 layer2/3/4): each is a 1x1
conv to ``feature_size`` and a 3x3 conv to twice that (conv + BatchNorm with momentum 0.01 + ReLU),
a global max pool, then BN1d → Linear → BN1d → ELU → Linear. A fourth head classifies the three
pooled vectors concatenated. Each training batch takes four optimiser steps: the image cut into a
jigsaw of 8×8, 4×4 and 2×2 cells trains head 1, 2 and 3 (one cross-entropy each), then the whole
image trains the concatenated head with weight 2. The test prediction is the concatenated head;
``eval_metrics`` also records each head's accuracy and the official "combined" prediction (the
four heads' raw logits summed).

The jigsaw follows the official swap procedure: the n² cells listed row-major are shuffled once
with Python ``random`` (one permutation for the whole batch), then cell (0, 0) is swapped with
each listed cell in turn, so a seeded run cuts the official jigsaws. The official code cuts
448 // n pixel cells and pools with fixed kernels 56/28/14; here the cells are size // n and the
pools global, identical at 448 px. Its PyTorch (1.3) zeroed gradients in place, so parameters a
step's loss does not reach still take weight decay and momentum in every one of the four steps:
``zero_grad = "zero"`` (the default) keeps that, ``"none"`` skips them (PyTorch ≥ 2.0's default).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods.base import Method, MethodOptions, StepContext, StepResult, add_terms
from finebench.methods.registry import register
from finebench.models.base import Backbone
from finebench.models.network import ImageClassifier, unwrap
from finebench.models.output import ModelOutput

GRANULARITIES = (8, 4, 2)
"""Jigsaw cells per side of the steps that train heads 1, 2, 3."""


class PMGOptions(MethodOptions):
    kind: Literal["pmg"]
    feature_size: Annotated[int, Field(ge=1)] = 512
    """Width of the heads' 1x1 convolutions and hidden layers (their 3x3 convolutions have twice it)."""
    concat_weight: Annotated[float, Field(gt=0)] = 2.0
    """Weight of the concatenated head's cross-entropy in the fourth step."""
    zero_grad: Literal["zero", "none"] = "zero"
    """``zero``: gradients zeroed in place (the official PyTorch 1.3); ``none``: set to None."""


def check_input_size(size: tuple[int, int]) -> None:
    """PMG trains on 8×8 jigsaws of its inputs; checked on every forward, so the cost estimate of
    ``finebench run --dry-run`` (a forward at the recipe's input size) reports a size it cannot cut."""
    cells = max(GRANULARITIES)
    height, width = int(size[0]), int(size[1])  # ints while traced for FLOPs too
    if height % cells or width % cells:
        nearest = cells * -(-height // cells)  # the next multiple up
        raise FinebenchError(f"variant 'pmg': input_size {height}x{width} does not split into its {cells}x{cells} "
                             f"jigsaw; expected a multiple of {cells} (e.g. {nearest}, or 448 as the paper)")


def jigsaw(images: torch.Tensor, n: int, order: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """The batch cut into n×n cells and rearranged by the official swap procedure; ``order``
    replaces the shuffled cell list (golden tests pass the official draw in)."""
    height, width = images.shape[-2:]
    if height % n or width % n:
        raise FinebenchError(f"variant 'pmg': input {height}x{width} does not split into a {n}x{n} jigsaw; "
                             f"expected an input_size divisible by {max(GRANULARITIES)}")
    if order is None:
        cells = [(a, b) for a in range(n) for b in range(n)]
        random.shuffle(cells)
        order = cells
    cell_h, cell_w = height // n, width // n
    out = images.clone()
    for a, b in order:
        first = out[..., :cell_h, :cell_w].clone()
        out[..., :cell_h, :cell_w] = out[..., a * cell_h:(a + 1) * cell_h, b * cell_w:(b + 1) * cell_w]
        out[..., a * cell_h:(a + 1) * cell_h, b * cell_w:(b + 1) * cell_w] = first
    return out


def conv_bn_relu(channels_in: int, channels_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(channels_out, momentum=0.01), nn.ReLU())


def classifier(features: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(features), nn.Linear(features, hidden), nn.BatchNorm1d(hidden),
                         nn.ELU(inplace=True), nn.Linear(hidden, num_classes))


class PMGClassifier(ImageClassifier):
    """Backbone + three stage heads + the concatenated head.

    ``ModelOutput.logits`` is the concatenated head, ``module_logits`` the stage heads (8, 4, 2
    granularities: shallowest stage first, as the official ``xc1, xc2, xc3``)."""

    each_backward_reaches_every_parameter = False  # each of the four steps trains one head

    def __init__(self, backbone: Backbone, num_classes: int, options: PMGOptions) -> None:
        super().__init__(backbone, num_classes)
        del self.classifier  # the concatenated head replaces it
        stages = backbone.tap_points[-3:]
        self.taps = [tap.name for tap in stages]
        self.backbone_taps_read = tuple(self.taps)
        width = options.feature_size
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_bn_relu(tap.channels, width, 1), conv_bn_relu(width, 2 * width, 3)) for tap in stages
        )
        self.heads = nn.ModuleList(classifier(2 * width, width, num_classes) for _ in stages)
        self.concat = classifier(6 * width, width, num_classes)
        self.concat_weight = options.concat_weight
        self.zero_grad_to_none = options.zero_grad == "none"

    def forward(self, images: torch.Tensor) -> ModelOutput:
        check_input_size(tuple(images.shape[-2:]))
        _, taps = self.backbone(images, self.taps, stop_after_taps=True)
        pooled = [F.adaptive_max_pool2d(block(taps[name]), 1).flatten(1) for block, name in zip(self.blocks, self.taps, strict=True)]
        stage_logits = tuple(head(vector) for head, vector in zip(self.heads, pooled, strict=True))
        logits = self.concat(torch.cat(pooled, 1))
        return ModelOutput(F.log_softmax(logits.float(), dim=1), logits, module_logits=stage_logits)


class PMG(Method):
    kind = "pmg"
    description = "Progressive Multi-Granularity: jigsaw 8/4/2 + whole image, one optimiser step each (Du et al. 2020)"
    Options = PMGOptions
    train_passes_per_image = 4
    shown_prediction = "the concatenated head"
    prediction_labels = {
        "top1_granularity.8": "head 1 alone (the stage trained on 8x8 jigsaws)",
        "top1_granularity.4": "head 2 alone (4x4 jigsaws)",
        "top1_granularity.2": "head 3 alone (2x2 jigsaws)",
        "top1_combined": "the four heads' logits summed (the official 'combined' accuracy)",
    }

    def table_name(self, options: PMGOptions) -> str:  # type: ignore[override]
        name = self.kind if options.feature_size == 512 else f"{self.kind}-f{options.feature_size}"
        return name if options.zero_grad == "zero" else f"{name}-none"

    def attach(self, backbone: Backbone, num_classes: int, options: PMGOptions) -> ImageClassifier:  # type: ignore[override]
        if len(backbone.tap_points) < 3:
            raise FinebenchError(f"variant 'pmg' on {type(backbone).__name__}: expected a backbone with three "
                                 f"stages to tap, it has {len(backbone.tap_points)}")
        return PMGClassifier(backbone, num_classes, options)

    def train_step(self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Four optimiser steps (jigsaw 8, 4, 2 on heads 1-3, then the whole image on the concatenated
        head); the loss logged is their sum, the correct count the last step's concatenated head."""
        model = unwrap(ctx.model)
        total = torch.zeros((), device=labels.device)
        correct = torch.zeros((), device=labels.device, dtype=torch.long)
        terms: dict[str, torch.Tensor] = {}
        for step, granularity in enumerate((*GRANULARITIES, None)):
            ctx.zero_grad(set_to_none=model.zero_grad_to_none)
            inputs = images if granularity is None else jigsaw(images, granularity)
            for part in ctx.micro_batches(inputs, labels):
                output = ctx.forward(part.images)
                if granularity is None:
                    loss = model.concat_weight * F.cross_entropy(output.logits.float(), part.labels)
                    correct += (output.logits.argmax(1) == part.labels).sum()
                    terms = add_terms(terms, self.loss_terms(output, part.labels), part.weight)
                else:
                    loss = F.cross_entropy(output.module_logits[step].float(), part.labels)
                ctx.backward(loss, part)
                total += loss.detach() * part.weight
            ctx.optimizer_step()
        return StepResult(total, correct, terms=terms)

    def prediction_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        heads = {f"top1_granularity.{size}": logits for size, logits in zip(("8", "4", "2"), output.module_logits, strict=True)}
        return {**heads, "top1_combined": output.logits + sum(output.module_logits)}

    def eval_metrics(self, counts: Sequence[float], images: float, model: nn.Module) -> dict[str, Any]:
        accuracy = [100.0 * count / images for count in counts]
        return {"top1_granularity": dict(zip(("8", "4", "2"), accuracy[:3], strict=True)),
                "top1_combined": accuracy[3]}


METHOD = register(PMG())
