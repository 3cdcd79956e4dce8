"""Names to backbones: the backbone registry behind ``finebench.methods.build_model``.

It is a dict, so adding a backbone is one entry, and an unknown name or option is
a user error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from finebench.errors import FinebenchError
from finebench.models.base import Backbone, TapPoint, read_weights_file
from finebench.models.network import ImageClassifier
from finebench.models.resnext import CifarResNeXt
from finebench.models.timm_backbone import TimmBackbone
from finebench.models.timm_backbone import cached_weights as cached_timm_weights
from finebench.models.torchvision import (
    ARCHITECTURES,
    LAST_STRIDE,
    LAST_STRIDES,
    TorchvisionResNet,
    cached_imagenet_weights,
)
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
        name: BackboneEntry(partial(TorchvisionResNet, name), arch.description, {LAST_STRIDE: LAST_STRIDES[0]}, 1000,
                            imagenet_weights=True)
        for name, arch in ARCHITECTURES.items()
    },
}


@dataclass(frozen=True)
class BackboneFamily:
    """``family:<model name>``: any model of a library, its options passed to its constructor."""

    build: Callable[[str, Mapping[str, Any] | None, tuple[str, int | None] | None], Backbone]
    """(model name, options, block attention) -> backbone."""
    builds_block_attention: bool
    """The library builds SE/CBAM/ECA into its own blocks (``block_attention``)."""
    library_weights: str
    """The ``model.pretrained`` keyword for the library's own weights (the other keyword is an error)."""
    listing_device: str
    """Where ``list_taps`` builds it: "meta" is instant; a family whose stage search runs the model needs "cpu"."""
    cached_weights: Callable[[str], Path]
    """(model name) -> the cached file of the library's weights; a miss is a ``FinebenchError`` saying where to put it."""


def _torchvision_weights(model_name: str) -> Path:
    import torchvision.models as tvm

    return cached_imagenet_weights(tvm.get_model_weights(model_name).DEFAULT, f"torchvision:{model_name}")


BACKBONE_FAMILIES: dict[str, BackboneFamily] = {
    "timm": BackboneFamily(TimmBackbone, True, "timm", "meta", cached_timm_weights),
    "torchvision": BackboneFamily(lambda name, options, _: TorchvisionNodeBackbone(name, options), False,
                                  "imagenet", "cpu", _torchvision_weights),
}
LIBRARY_WEIGHTS = tuple(family.library_weights for family in BACKBONE_FAMILIES.values())


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


def family_of(name: str) -> BackboneFamily | None:
    """The library family of a ``family:<model name>`` backbone; None for a registered name."""
    family = split_family(name)
    return BACKBONE_FAMILIES[family[0]] if family is not None else None


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
    name: str, options: Mapping[str, Any] | None = None, block_attention: tuple[str, int | None] | None = None
) -> Backbone:
    """A registered backbone, or ``timm:<name>`` / ``torchvision:<name>``; ``block_attention``
    (variant, reduction) builds timm's own SE/CBAM/ECA layers into a timm model's blocks."""
    check_last_stride(name, options)
    family = split_family(name)
    if family is not None:
        entry = BACKBONE_FAMILIES[family[0]]
        if block_attention is not None and not entry.builds_block_attention:
            raise FinebenchError(
                f"variant {block_attention[0]!r} on {name}: SE/CBAM/ECA need a registered backbone or a timm model"
            )
        return entry.build(family[1], options, block_attention)
    entry: BackboneEntry = _choose("backbone", name, BACKBONES)
    return entry.build(**resolve_options(f"backbone {name!r}", entry.options, options))


def check_last_stride(name: str, options: Mapping[str, Any] | None) -> None:
    """``last_stride`` on a backbone that does not take it names the backbones that do, rather than
    the backbone's own options (a CIFAR backbone) or a constructor's TypeError (timm, torchvision:):
    only the registered torchvision ResNets set it (timm's ``output_stride`` dilates instead)."""
    if LAST_STRIDE not in (options or {}):
        return
    entry = BACKBONES.get(name)
    if entry is not None and LAST_STRIDE in entry.options:
        return
    takers = ", ".join(n for n, e in BACKBONES.items() if LAST_STRIDE in e.options)
    raise FinebenchError(
        f"option {LAST_STRIDE} for backbone {name!r} is not supported: expected a registered torchvision "
        f"ResNet/ResNeXt/Wide ResNet ({takers}); CIFAR, timm: and torchvision: backbones have no such option"
    )


def load_pretrained(backbone: Backbone, name: str, pretrained: str) -> None:
    """``"imagenet"``: torchvision's weights from the hub cache; ``"timm"``: timm's from its cache;
    anything else: a local file path (``.pth`` or ``.safetensors``)."""
    family = family_of(name)
    if family is not None:
        if pretrained in LIBRARY_WEIGHTS and pretrained != family.library_weights:
            raise FinebenchError(f"pretrained={pretrained!r} for {name}: expected {family.library_weights!r} or a "
                                 "weights file path")
        backbone.load_pretrained(pretrained)
        return
    if pretrained == "imagenet":
        if not isinstance(backbone, TorchvisionResNet):
            imagenet = ", ".join(n for n, e in BACKBONES.items() if e.imagenet_weights)
            raise FinebenchError(f"backbone {name!r} has no ImageNet weights: expected one of {imagenet}")
        backbone.load_imagenet_weights()
        return
    backbone.load_backbone_weights(read_weights_file(pretrained), str(Path(pretrained).expanduser()))


def missing_pretrained_weights(name: str, pretrained: str | None) -> str | None:
    """Why loading ``pretrained`` for backbone ``name`` would stop the run (weights not in the cache,
    a file that is not there), or None; looks, never downloads. ``run --dry-run`` warns with it and
    ``run`` stops with it before anything is written, instead of when the run's model is built."""
    if pretrained is None:
        return None
    try:
        file = pretrained_file(name, pretrained)
    except FinebenchError as error:
        return str(error)
    if pretrained not in LIBRARY_WEIGHTS and not file.is_file():
        return f"pretrained weights file {file} does not exist"
    return None


def pretrained_file(name: str, pretrained: str) -> Path:
    """The file ``load_pretrained`` reads for ``pretrained``: the library's cached copy of its
    weights, else the path given; a cache miss is a ``FinebenchError`` saying where to put it."""
    family = split_family(name)
    if family is not None and pretrained == BACKBONE_FAMILIES[family[0]].library_weights:
        return BACKBONE_FAMILIES[family[0]].cached_weights(family[1])
    if family is None and pretrained == "imagenet" and name in ARCHITECTURES:
        return cached_imagenet_weights(ARCHITECTURES[name].weights, name)
    return Path(pretrained).expanduser()


def pretrained_tag(name: str, pretrained: str) -> tuple[str | None, str]:
    """(library, the weights' full name in it) for a library's weights: timm's ``model.tag``
    (``vit_base_patch16_224.augreg_in21k``; the default tag filled in) or torchvision's weights enum
    member (``ResNet50_Weights.IMAGENET1K_V1``); (None, the absolute path) for a weights file."""
    family = split_family(name)
    if family is not None and pretrained == BACKBONE_FAMILIES[family[0]].library_weights:
        if family[0] == "timm":
            import timm

            cfg = timm.models.get_pretrained_cfg(family[1])
            return "timm", f"{cfg.architecture}.{cfg.tag}" if cfg is not None and cfg.tag else family[1]
        import torchvision.models as tvm

        return "torchvision", str(tvm.get_model_weights(family[1]).DEFAULT)
    if family is None and pretrained == "imagenet" and name in ARCHITECTURES:
        return "torchvision", str(ARCHITECTURES[name].weights)
    return None, str(Path(pretrained).expanduser().resolve())


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
            net = build_backbone(name)
            model = ImageClassifier(net, entry.default_num_classes)
        infos.append(
            BackboneInfo(
                name, entry.description, net.tap_points,
                tuple(net.attention_taps(len(net.attention_candidates))),
                dict(entry.options), entry.default_num_classes,
                sum(p.numel() for p in model.parameters()),
            )
        )
    return infos


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
    family = family_of(name)
    # registered backbones build on the meta device (instant, no memory); a family says where it can
    device = family.listing_device if family is not None else "meta"
    with torch.device(device):
        net = build_backbone(name, options)
    return TapListing(name, net.tap_points, tuple(net.attention_candidates), net.out_channels)
