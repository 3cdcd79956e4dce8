"""Names to models: the backbone and variant registries behind ``build_model``.

Both are dicts, so adding a backbone or a plug-in is one entry, and an unknown name or option is
a user error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from finebench.errors import FinebenchError
from finebench.models.attention import GATE_FUNCTIONS, OUTPUT_MODES, REG_MASKS, TAP_NORMS, AttendAndRectify
from finebench.models.base import Backbone, TapPoint, read_weights_file
from finebench.models.network import ImageClassifier
from finebench.models.plugins import BLOCK_PLUGINS
from finebench.models.resnext import CifarResNeXt
from finebench.models.timm_backbone import BLOCK_ATTENTION, TimmBackbone
from finebench.models.torchvision import ARCHITECTURES, TorchvisionResNet
from finebench.models.torchvision_nodes import TorchvisionNodeBackbone
from finebench.models.wrn import CLASSIFIER_INITS, SHORTCUTS, STEMS, WideResNet


@dataclass(frozen=True)
class BackboneEntry:
    build: Callable[..., Backbone]
    description: str
    options: Mapping[str, Any]
    """Valid option names with their defaults (the defaults are also the config ``finebench models`` counts)."""
    default_num_classes: int
    imagenet_weights: bool = False


BACKBONES: dict[str, BackboneEntry] = {
    "wrn": BackboneEntry(
        WideResNet, "CIFAR pre-activation Wide ResNet WRN-d-k (authors' layout)",
        {"depth": 28, "width": 10, "dropout": 0.0, "stem": STEMS[0], "shortcut": SHORTCUTS[0],
         "classifier_init": CLASSIFIER_INITS[0]}, 10,
    ),
    "resnext_cifar": BackboneEntry(
        CifarResNeXt, "CIFAR ResNeXt-d (cardinality x base_width d)",
        {"depth": 29, "cardinality": 8, "base_width": 64}, 10,
    ),
    **{
        name: BackboneEntry(partial(TorchvisionResNet, name), arch.description, {}, 1000, imagenet_weights=True)
        for name, arch in ARCHITECTURES.items()
    },
}


BACKBONE_FAMILIES: dict[str, Callable[..., Backbone]] = {
    "timm": TimmBackbone,
    "torchvision": TorchvisionNodeBackbone,
}
"""``family:<model name>`` backbones: any model of the library, its options passed to its constructor."""


def split_family(name: str) -> tuple[str, str] | None:
    """``"timm:resnet50"`` -> ``("timm", "resnet50")``; None for a registered backbone name."""
    family, sep, model_name = name.partition(":")
    if not sep:
        return None
    if family not in BACKBONE_FAMILIES or not model_name:
        raise FinebenchError(
            f"unknown backbone {name!r}: expected a registered name or "
            + " or ".join(f"{f}:<model name>" for f in BACKBONE_FAMILIES)
        )
    return family, model_name


@dataclass(frozen=True)
class VariantEntry:
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


VARIANTS: dict[str, VariantEntry] = {
    "baseline": VariantEntry("the backbone alone"),
    "attention": VariantEntry(
        "Attend and Rectify (gated attention modules on the backbone's taps)",
        {"attention_depth": 3, "attention_width": 4, "gates": "softmax", "reg_w": 1e-3, "output_mode": "mixture",
         "taps": [], "reg_masks": REG_MASKS[0], "tap_norm": TAP_NORMS[0]},
        {"gates": GATE_FUNCTIONS, "output_mode": OUTPUT_MODES, "reg_masks": REG_MASKS, "tap_norm": TAP_NORMS},
    ),
    "se": VariantEntry("Squeeze-and-Excitation in every residual block", {"reduction": 16}),
    "cbam": VariantEntry("CBAM in every residual block", {"reduction": 16}),
    "eca": VariantEntry("ECA in every block (timm's EcaModule; timm backbones)"),
}


def _choose(kind: str, name: str, registry: Mapping[str, Any]) -> Any:
    if name not in registry:
        raise FinebenchError(f"unknown {kind} {name!r}: expected one of {', '.join(registry)}")
    return registry[name]


def resolve_options(
    what: str, defaults: Mapping[str, Any], given: Mapping[str, Any] | None,
    choices: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """Defaults overlaid with ``given``; unknown names, wrong types and values outside choices are errors."""
    resolved = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            valid = ", ".join(defaults) or "none"
            raise FinebenchError(f"unknown option {key!r} for {what}: valid options are {valid}")
        default = defaults[key]
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and isinstance(default, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int)
        elif isinstance(default, float):
            ok = isinstance(value, int | float)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise FinebenchError(
                f"option {key}={value!r} for {what} has the wrong type: expected {type(default).__name__}"
            )
        allowed = (choices or {}).get(key)
        if allowed is not None and value not in allowed:
            raise FinebenchError(f"option {key}={value!r} for {what} is invalid: expected one of {', '.join(allowed)}")
        resolved[key] = value
    return resolved


def build_backbone(
    name: str, options: Mapping[str, Any] | None = None, block_attention: tuple[str, int] | None = None
) -> Backbone:
    """A registered backbone, or ``timm:<name>`` / ``torchvision:<name>``; ``block_attention``
    (variant, reduction) builds timm's own SE/CBAM/ECA layers into a timm model's blocks."""
    family = split_family(name)
    if family is not None:
        if block_attention is not None and family[0] != "timm":
            raise FinebenchError(
                f"variant {block_attention[0]!r} on {name}: SE/CBAM/ECA need a registered backbone or a timm model"
            )
        if family[0] == "timm":
            return TimmBackbone(family[1], options, block_attention)
        return BACKBONE_FAMILIES[family[0]](family[1], options)
    entry: BackboneEntry = _choose("backbone", name, BACKBONES)
    return entry.build(**resolve_options(f"backbone {name!r}", entry.options, options))


def load_pretrained(backbone: Backbone, name: str, pretrained: str) -> None:
    """``"imagenet"``: torchvision's weights from the hub cache; ``"timm"``: timm's from its cache;
    anything else: a local file path (``.pth`` or ``.safetensors``)."""
    if isinstance(backbone, TimmBackbone | TorchvisionNodeBackbone):
        if pretrained == ("imagenet" if isinstance(backbone, TimmBackbone) else "timm"):
            expected = "timm" if isinstance(backbone, TimmBackbone) else "imagenet"
            raise FinebenchError(f"pretrained={pretrained!r} for {name}: expected {expected!r} or a weights file path")
        backbone.load_pretrained(pretrained)
        return
    if pretrained == "imagenet":
        if not isinstance(backbone, TorchvisionResNet):
            imagenet = ", ".join(n for n, e in BACKBONES.items() if e.imagenet_weights)
            raise FinebenchError(f"backbone {name!r} has no ImageNet weights: expected one of {imagenet}")
        backbone.load_imagenet_weights()
        return
    backbone.load_backbone_weights(read_weights_file(pretrained), str(Path(pretrained).expanduser()))


def build_model(
    backbone: str,
    num_classes: int,
    variant: str = "baseline",
    variant_options: Mapping[str, Any] | None = None,
    backbone_options: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
) -> ImageClassifier:
    """Build a backbone, load its weights, then add the variant (so plug-ins start fresh)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise FinebenchError(f"num_classes={num_classes!r} is invalid: expected an integer >= 2")
    entry: VariantEntry = _choose("variant", variant, VARIANTS)
    options = resolve_options(f"variant {variant!r}", entry.options, variant_options, entry.choices)
    if options.get("reduction", 1) < 1:
        raise FinebenchError(f"reduction={options['reduction']} is invalid for {variant}: expected an integer >= 1")
    block_attention = None
    if variant in BLOCK_ATTENTION and split_family(backbone) is not None:
        block_attention = (variant, options.get("reduction", 16))  # timm builds its own layers in
    elif variant in BLOCK_ATTENTION and variant not in BLOCK_PLUGINS:
        raise FinebenchError(f"variant {variant!r} on {backbone}: expected a timm backbone (timm:<name>)")
    net = build_backbone(backbone, backbone_options, block_attention)
    if pretrained is not None:
        load_pretrained(net, backbone, pretrained)
    if variant in BLOCK_PLUGINS and block_attention is None:
        net.insert_plugins(partial(BLOCK_PLUGINS[variant], **options))
    attention = None
    if variant == "attention":
        attention = build_attention(net, num_classes, options)
    return ImageClassifier(net, num_classes, attention)


def build_attention(backbone: Backbone, num_classes: int, options: Mapping[str, Any]) -> AttendAndRectify:
    if options["attention_width"] < 1:
        raise FinebenchError(f"attention_width={options['attention_width']} is invalid: expected an integer >= 1")
    if options["reg_w"] < 0:
        raise FinebenchError(f"reg_w={options['reg_w']} is invalid: expected a number >= 0")
    if options["taps"]:
        taps = backbone.named_taps(options["taps"])
    else:
        taps = backbone.attention_taps(options["attention_depth"])
    if options.get("tap_norm", TAP_NORMS[0]) == "separate":
        backbone.separate_tap_norms(taps)
    return AttendAndRectify(
        [(tap, backbone.tap_point(tap).channels) for tap in taps],
        backbone.out_channels,
        num_classes,
        attention_width=options["attention_width"],
        gates=options["gates"],
        reg_w=options["reg_w"],
        output_mode=options["output_mode"],
        reg_masks=options.get("reg_masks", REG_MASKS[0]),
    )


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    description: str
    tap_points: tuple[TapPoint, ...]
    attention_taps: tuple[str, ...]
    """Taps Attend and Rectify uses at its largest depth, deepest first."""
    default_options: Mapping[str, Any]
    num_classes: int
    params: int
    """Backbone + classifier parameters at ``default_options`` and ``num_classes``."""


def list_backbones() -> list[BackboneInfo]:
    """Every registered backbone with its taps and size; built on the meta device, so it is instant."""
    infos = []
    for name, entry in BACKBONES.items():
        with torch.device("meta"):
            model = build_model(name, entry.default_num_classes)
        net = model.backbone
        infos.append(
            BackboneInfo(
                name, entry.description, net.tap_points,
                tuple(net.attention_taps(len(net.attention_candidates))),
                dict(entry.options), entry.default_num_classes,
                sum(p.numel() for p in model.parameters()),
            )
        )
    return infos


def build_model_from_config(
    config: Mapping[str, Any], num_classes: int, *, kind: str | None = None, pretrained: bool = True
) -> ImageClassifier:
    """The model of a resolved run config (a run's config.json), so the trainer, ``finebench attend``
    and ``finebench bench`` build exactly the same network from one place.

    ``kind`` swaps the variant (e.g. the baseline, for the cost the overheads are measured against);
    ``pretrained=False`` skips loading backbone weights (a checkpoint or a timing supplies them).
    """
    try:
        model_section, variant = config["model"], config["variant"]
        use_variant = kind is None or kind == variant["kind"]
        backbone = model_section["backbone"]
        variant_kind = variant["kind"] if use_variant else kind
        variant_options = (variant.get("options") or None) if use_variant else None
        backbone_options = dict(model_section.get("options") or {}) or None
        weights = model_section.get("pretrained") if pretrained else None
    except (KeyError, TypeError, AttributeError) as error:
        raise FinebenchError(
            f"run config: unusable model/variant section ({error!r}); expected model.backbone and variant.kind"
        ) from None
    return build_model(
        backbone, num_classes, variant=variant_kind, variant_options=variant_options,
        backbone_options=backbone_options, pretrained=weights,
    )


@dataclass(frozen=True)
class TapListing:
    """What ``finebench models --taps NAME`` shows: where Attend and Rectify can attach."""

    backbone: str
    tap_points: tuple[TapPoint, ...]
    attention_candidates: tuple[str, ...]
    """Deepest first: ``attention_depth = D`` uses the first D."""
    out_channels: int


def list_taps(name: str, options: Mapping[str, Any] | None = None) -> TapListing:
    """The taps of any backbone name (registered, ``timm:``, ``torchvision:``), with channels and stride."""
    family = split_family(name)
    # timm and the registered backbones build on the meta device (instant, no memory); the
    # torchvision stage search runs the model, which some ops cannot do on meta tensors.
    device = "cpu" if family is not None and family[0] == "torchvision" else "meta"
    with torch.device(device):
        net = build_backbone(name, options)
    return TapListing(name, net.tap_points, tuple(net.attention_candidates), net.out_channels)
