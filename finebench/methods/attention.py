"""Attend and Rectify (Rodriguez et al., IEEE TMM 2020): gated attention modules on the backbone's taps.

The modules themselves are ``finebench.models.attention``; this plug-in says how a recipe names
them (options, ``attention-ad3-aw4``), where they attach (the ``attention_depth`` deepest taps
before the last stage, or named ``taps``, on every backbone family), that the model is trained
on its gated mixture (NLL plus the mask-overlap regulariser), and what it records beyond top-1:
the network's own classifier and each module alone (``network_top1``, ``module_top1``, made by
the evaluator from ``ModelOutput.module_logits``) and the cost of an early prediction from one
module (the backbone up to its tap plus the module).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from torch import nn
from pydantic import Field, model_validator

from finebench.methods.base import Method, MethodOptions
from finebench.methods.registry import register
from finebench.models.attention import AttendAndRectify
from finebench.models.base import Backbone
from finebench.models.network import EarlyPrediction, ImageClassifier, unwrap
from finebench.models.output import ModelOutput, mixture_loss


class AttentionOptions(MethodOptions):
    kind: Literal["attention"]
    attention_depth: Annotated[int, Field(ge=1)] = 3
    """The D deepest taps before the final stage (the backbone says how many it has)."""
    attention_width: Annotated[int, Field(ge=1)] = 4
    gates: Literal["softmax", "sigmoid", "none"] = "softmax"
    reg_w: Annotated[float, Field(ge=0)] = 1e-3
    output_mode: Literal["mixture", "50"] = "mixture"
    taps: list[str] = Field(default_factory=list)
    """Tap names instead of ``attention_depth`` (see ``finebench models --taps BACKBONE``)."""
    reg_masks: Literal["pooled", "full"] = "pooled"
    """The regulariser's masks: 2x2 average-pooled (released code) or full (the code of every
    logged run but the CIFAR dropout run, docs/MECHANISM.md §4)."""
    readout: Literal["eager", "custom_op"] = "eager"
    """``custom_op``: each module's read-out as one operator with a closed-form backward
    (``finebench.models.attention_op``), opaque to torch.compile's layout and reduction
    heuristics; same outputs and gradients (float32 to 1e-5). Not yet measured faster on a GPU."""
    tap_norm: Literal["shared", "separate"] = "shared"
    """CIFAR WRN only: modules on groups 0/1 read the next block's pre-activation (released code)
    or ``relu(BatchNorm(group output))`` with BatchNorms of their own (painless-attention ea7d4af/1bf9ecf)."""

    @model_validator(mode="before")
    @classmethod
    def _depth_from_taps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("taps"):
            taps = data["taps"]
            depth = len(taps) if isinstance(taps, list) else 1
            # a run's config.json holds both (the depth it derived): accepted when they agree
            if "attention_depth" in data and data["attention_depth"] != depth:
                raise ValueError("give taps or attention_depth, not both (the depth is the number of taps)")
            if isinstance(taps, list) and len(set(map(str, taps))) != len(taps):
                raise ValueError(f"taps must be distinct, got {taps}")
            data = {**data, "attention_depth": depth}
        return data


class AttendAndRectifyMethod(Method):
    kind = "attention"
    description = "Attend and Rectify (gated attention modules on the backbone's taps)"
    Options = AttentionOptions
    mixture = True
    draws_attention_maps = True
    profile_default = True
    options_added_later = ("reg_masks", "tap_norm", "readout")  # issues 20, 21
    training_only_options = ("reg_w", "reg_masks")  # the regulariser: computed in training only

    def table_name(self, options: AttentionOptions) -> str:  # type: ignore[override]
        defaults = AttentionOptions(kind="attention")
        name = f"attention-ad{options.attention_depth}-aw{options.attention_width}"
        if options.gates != defaults.gates:
            name += f"-gates-{options.gates}"
        if options.reg_w != defaults.reg_w:
            name += f"-reg{options.reg_w:g}"
        if options.output_mode != defaults.output_mode:
            name += f"-out{options.output_mode}"
        if options.taps:
            name += "-taps-" + "+".join(options.taps)
        if options.readout != defaults.readout:
            name += "-op"
        return name

    def settings(self, options: AttentionOptions) -> str:  # type: ignore[override]
        return (f"AD{options.attention_depth} AW{options.attention_width} gates {options.gates} "
                f"output {options.output_mode} reg_w {options.reg_w:g}")

    def attach(self, backbone: Backbone, num_classes: int, options: AttentionOptions) -> ImageClassifier:  # type: ignore[override]
        taps = backbone.named_taps(options.taps) if options.taps else backbone.attention_taps(options.attention_depth)
        if options.tap_norm == "separate":
            backbone.separate_tap_norms(taps)
        attention = AttendAndRectify.on_backbone(
            backbone, num_classes, taps, attention_width=options.attention_width, gates=options.gates,
            reg_w=options.reg_w, output_mode=options.output_mode, reg_masks=options.reg_masks,
            readout=options.readout,
        )
        return ImageClassifier(backbone, num_classes, attention)

    def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        return mixture_loss(output, labels, label_smoothing=label_smoothing)

    def early_predictors(self, model: nn.Module) -> dict[str, nn.Module]:
        classifier = unwrap(model)
        return {tap: EarlyPrediction(classifier, tap) for tap in classifier.attention_taps}


METHOD = register(AttendAndRectifyMethod())
