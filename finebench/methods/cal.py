"""Counterfactual Attention Learning (Rao et al., ICCV 2021; raoyongming/CAL ``0ba9d50``, ``fgvc/``).

WS-DAN (``finebench.methods.ws_dan``) plus a counterfactual branch: the same features pooled
with random attention maps Ā ~ U(0, 2) (ones at test time) give a second normalised vector f̂,
and the *effect* logits W·100(f − f̂) = p − W·100 f̂ (the classifier has no bias) learn what
the real attention adds over random attention. Training takes two forwards: the raw batch, then
its crops and drops concatenated into one batch of 2B (one BatchNorm batch, unlike WS-DAN's two
passes). Loss = CE(p_raw)/3 + CE(effect of all 3B images) + (2/3)·CE(p of the 2B crops and
drops) + the centre loss; the main-branch part equals WS-DAN's. Signed square roots and
attention weights use ε = 1e-6 (WS-DAN: 1e-12).

The test prediction is the paper's (``fgvc/infer.py``, which the maintainers say the paper's
numbers come from): the image and its horizontal flip, each with its own mean attention map,
each giving the raw logits and three crops with (θ, padding) = (0.3, 0.1), (0.2, 0.1),
(0.1, 0.05) (the last is ``test_theta`` / ``test_padding``, WS-DAN's test crop); logits averaged over the four per orientation, then over the two orientations:
8 backbone passes. ``eval_metrics`` also records the raw prediction (``top1_raw``), the test crop's
(``top1_crop``), the training log's two-view prediction (raw + the (0.1, 0.05) crop; ``top1_two_view``) and the
effect logits' accuracies under both (``top1_effect_two_view``, ``top1_effect``).

Ā comes from the torch generator of its device, as the official ``uniform_``; tests pass the
official draws in (``counterfactual=``). The official backbone is ResNet-101 with a stride-1
last stage; here the backbone is the recipe's, which ``model.options = {last_stride = 1}`` makes the
official one (docs/PEERS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from finebench.methods.base import MapsToDraw
from finebench.methods.registry import register
from finebench.methods.ws_dan import (
    LOGIT_SCALE,
    WSDAN,
    Draws,
    WSDANClassifier,
    WSDANOptions,
    attention_figure,
    augment,
    bilinear_attention_pool,
    centre_loss,
    crop,
    crop_boxes,
    draw,
    full,
    training_settings,
)
from finebench.models.network import unwrap
from finebench.models.output import ModelOutput

EPSILON = 1e-6
"""The official CAL's ε (``fgvc/models/cal.py``)."""
WIDE_TEST_CROPS = ((0.3, 0.1), (0.2, 0.1))
"""(θ, padding) of the paper's first two test crops per orientation (``infer.py``); the third is
the options' ``test_theta`` / ``test_padding`` (official 0.1, 0.05: the training log's crop)."""
PREDICTIONS = ("top1_raw", "top1_crop", "top1_two_view", "top1_effect_two_view", "top1_effect")
"""The names of ``predict``'s ``module_logits``, in order (summary.json's fields, the per-image file's rows)."""


class CALOptions(WSDANOptions):
    kind: Literal["cal"]  # type: ignore[assignment]


class CALClassifier(WSDANClassifier):
    """WS-DAN's model with the counterfactual branch: ``ModelOutput.aux`` is (pooled vectors,
    attention maps, effect logits)."""

    method = "cal"
    epsilon = EPSILON

    def forward(self, images: torch.Tensor, counterfactual: torch.Tensor | None = None) -> ModelOutput:
        """``counterfactual`` replaces the random attention Ā (train mode; ones in eval mode)."""
        features, maps = self.attend(images)
        pooled = bilinear_attention_pool(features, maps, self.epsilon)
        if counterfactual is None:
            counterfactual = torch.zeros_like(maps).uniform_(0, 2) if self.training else torch.ones_like(maps)
        hat = bilinear_attention_pool(features, counterfactual.to(maps), self.epsilon)
        logits = self.fc(pooled * LOGIT_SCALE)
        effect = logits - self.fc(hat * LOGIT_SCALE)
        return ModelOutput(F.log_softmax(logits.float(), dim=1), logits, aux=(pooled, maps, effect))


@dataclass(frozen=True)
class CALStepLosses:
    """One CAL training step's passes and loss terms (what golden tests compare)."""

    raw: ModelOutput
    augmented: ModelOutput
    """The crops then the drops, one forward of 2B images."""
    augmented_images: torch.Tensor
    terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    """CE(raw), CE(effect, 3B rows), CE(crops and drops), centre loss (unweighted)."""
    total: torch.Tensor


def step_losses(model: CALClassifier, forward: Callable[[torch.Tensor], ModelOutput], images: torch.Tensor,
                labels: torch.Tensor, draws: Draws | None = None, label_smoothing: float = 0.0) -> CALStepLosses:
    """The official step (``train_distributed.py`` train) on one batch; the centres are updated."""
    options = model.options
    raw = forward(images)
    pooled, maps, effect = raw.aux
    targets = model.update_centres(pooled, labels)
    draws = draws if draws is not None else draw(maps.detach(), options, model.epsilon)
    crops, drops, _ = augment(images, maps, draws, options)
    augmented_images = torch.cat([crops, drops])
    augmented = forward(augmented_images)
    twice = torch.cat([labels, labels])
    all_effects = torch.cat([effect, augmented.aux[2]])
    terms = (F.cross_entropy(full(raw.logits), labels, label_smoothing=label_smoothing),
             F.cross_entropy(full(all_effects), torch.cat([labels, twice]), label_smoothing=label_smoothing),
             F.cross_entropy(full(augmented.logits), twice, label_smoothing=label_smoothing),
             centre_loss(pooled, targets))
    total = terms[0] / 3.0 + terms[1] * 3.0 / 3.0 + terms[2] * 2.0 / 3.0 + options.centre_weight * terms[3]
    return CALStepLosses(raw, augmented, augmented_images, terms, total)


def views(model: nn.Module, images: torch.Tensor) -> Iterator[ModelOutput]:
    """The paper's test views of one orientation: the image, then its three crops around the mean map."""
    options = unwrap(model).options
    output = model(images)
    yield output
    maps = full(output.aux[1].detach().mean(dim=1, keepdim=True))
    for theta, padding in (*WIDE_TEST_CROPS, (options.test_theta, options.test_padding)):
        yield model(crop(images, crop_boxes(maps, tuple(images.shape[-2:]), theta, padding)))


class CAL(WSDAN):
    """WS-DAN's method with CAL's model (the counterfactual branch), losses (raw pass, then crops
    and drops in one pass; the effect terms), 8-view prediction and records; table names, the
    backbone check and the step's machinery are WS-DAN's."""

    kind = "cal"
    description = "Counterfactual Attention Learning: WS-DAN + random-attention effect loss, 8-view test (Rao et al. 2021)"
    Options = CALOptions
    test_forward_passes = 2 * (1 + len(WIDE_TEST_CROPS) + 1)
    shown_prediction = "the paper's 8 views (the image and its flip, each raw and three crops: infer.py)"
    model_class = CALClassifier
    step_losses = staticmethod(step_losses)
    prediction_labels = {
        "top1_raw": "the raw image alone",
        "top1_crop": "the test crop alone",
        "top1_two_view": "raw + crop (the official training log's figure)",
        "top1_effect_two_view": "the counterfactual effect, raw + crop",
        "top1_effect": "the counterfactual effect, 8 views",
    }

    def settings(self, options: CALOptions) -> str:  # type: ignore[override]
        crops = ", ".join(f"({theta:g}, {padding:g})" for theta, padding in
                          (*WIDE_TEST_CROPS, (options.test_theta, options.test_padding)))
        return f"{training_settings(options)} · test: image + flip, each raw + crops (θ, pad) {crops}"

    def crops(self, options: CALOptions) -> list[tuple[str, float, float]]:  # type: ignore[override]
        """The widest training crop and the paper's three test crops."""
        return [("training crop", options.crop_theta_min, options.crop_padding),
                *((f"test crop θ {theta:g} pad {padding:g}", theta, padding) for theta, padding in
                  (*WIDE_TEST_CROPS, (options.test_theta, options.test_padding)))]

    def predict(self, model: nn.Module, images: torch.Tensor) -> ModelOutput:
        """The 8-view prediction; ``module_logits`` = (raw, the test crop, two-view, effect two-view,
        effect 8-view)."""
        upright = list(views(model, images))
        mirrored = list(views(model, torch.flip(images, [3])))
        logits = (sum(v.logits for v in upright) / 4.0 + sum(v.logits for v in mirrored) / 4.0) / 2.0
        effect = (sum(v.aux[2] for v in upright) / 4.0 + sum(v.aux[2] for v in mirrored) / 4.0) / 2.0
        two_view = (upright[0].logits + upright[-1].logits) / 2.0
        effect_two_view = (upright[0].aux[2] + upright[-1].aux[2]) / 2.0
        return ModelOutput(F.log_softmax(logits.float(), dim=1), logits,
                           module_logits=(upright[0].logits, upright[-1].logits, two_view, effect_two_view, effect))

    def maps_to_draw(self, model: nn.Module, images: torch.Tensor) -> MapsToDraw:
        return attention_figure(model, images, self.predict(model, images), ("raw", "crop", "two-view"))

    def prediction_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return dict(zip(PREDICTIONS, output.module_logits, strict=True))

    def eval_metrics(self, counts: Sequence[float], images: float, model: nn.Module) -> dict[str, Any]:
        return {name: 100.0 * count / images for name, count in zip(PREDICTIONS, counts, strict=True)}


METHOD = register(CAL())
