"""Method kind -> method: the one table recipe, models, profile, bench, runner, report, attend and
the CLI read. A method module registers its instance at import (``register(MyMethod())``);
importing ``finebench.methods`` imports every module of the package (``discover``), so it is full.

The registered instance is bound to its kind's default options; ``method_of(variant)`` hands out
the method bound to a variant's options (``Method.bind``), which is what a run trains and
evaluates with.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Mapping
from typing import Any

from finebench.errors import FinebenchError
from finebench.methods.base import Method, MethodOptions
from finebench.models.batchnorm import (
    BATCHNORM_INITS,
    BatchNormInit,
    initial_batchnorm_weights,
)
from finebench.models.network import ImageClassifier

METHODS: dict[str, Method] = {}
"""Registered methods by kind, in registration order (the order of ``--help`` and listings)."""


def register(method: Method) -> Method:
    """Add a method; its kind must be new and its ``Options.kind`` the same literal."""
    kind = method.kind
    if kind in METHODS:
        raise ValueError(f"method {kind!r} is registered twice")
    field = method.Options.model_fields["kind"]
    if getattr(field.annotation, "__args__", None) != (kind,):
        raise ValueError(f"{type(method).__name__}.Options.kind must be Literal[{kind!r}]")
    method.options = method.Options(kind=kind)
    METHODS[kind] = method
    return method


def discover() -> None:
    """Import every module of ``finebench.methods`` (by name; each method module registers itself),
    as ``finebench.data.registry`` finds the dataset builders: a new method is one new module.
    Listings and ``--help`` follow the kinds' names, after the baseline (the reference method)."""
    import finebench.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    listed = sorted(METHODS.items(), key=lambda item: (item[0] != "baseline", item[0]))  # not import order (cal imports ws_dan)
    METHODS.clear()
    METHODS.update(listed)


def get_method(kind: str) -> Method:
    """The method of a kind; an unknown kind is a user error listing the valid ones."""
    try:
        return METHODS[kind]
    except KeyError:
        raise FinebenchError(f"unknown variant {kind!r}: expected one of {', '.join(METHODS)}") from None


def method_of(variant: MethodOptions) -> Method:
    """The method bound to ``variant``'s options: its ``loss``, ``predict`` and step read them."""
    return get_method(variant.kind).bind(variant)


def variant_kinds() -> tuple[str, ...]:
    return tuple(METHODS)


def parse_options(kind: str, options: Mapping[str, Any] | None, what: str | None = None) -> MethodOptions:
    """A kind's typed options from a plain mapping (a run's config.json, ``build_model``'s keywords);
    a bad name, type or value is one ``FinebenchError`` line naming the option."""
    from pydantic import ValidationError

    method = get_method(kind)
    try:
        return method.Options.model_validate({**dict(options or {}), "kind": kind}, strict=True)
    except ValidationError as error:
        label = what or f"variant {kind!r}"
        problems = []
        for item in error.errors():
            key = ".".join(str(p) for p in item["loc"]) or "(options)"
            value, ctx = item.get("input"), item.get("ctx") or {}
            if item["type"] == "extra_forbidden":
                valid = ", ".join(k for k in method.Options.model_fields if k not in ("kind", "name")) or "none"
                problems.append(f"unknown option {key!r} for {label}: valid options are {valid}")
            elif item["type"] == "literal_error":
                field = method.Options.model_fields.get(key)
                choices = ", ".join(map(str, getattr(field.annotation, "__args__", ()))) if field else ctx.get("expected")
                problems.append(f"option {key}={value!r} for {label} is invalid: expected one of {choices}")
            elif item["type"].endswith("_type"):
                problems.append(f"option {key}={value!r} for {label} has the wrong type: {item['msg'].lower()}")
            elif {"ge", "gt", "le", "lt"} & set(ctx):
                bound = next((f"{sign} {ctx[k]}" for k, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                              if k in ctx))
                problems.append(f"{key}={value!r} is invalid for {kind}: expected a number {bound}")
            else:
                problems.append(f"option {key} for {label}: {item['msg']}")
        raise FinebenchError("; ".join(problems)) from None


def option_defaults(kind: str) -> dict[str, Any]:
    """A kind's options at their defaults (``finebench models`` lists them)."""
    return get_method(kind).Options(kind=kind).options()


def list_methods() -> list[dict[str, Any]]:
    """Every registered method with its options' defaults and its cost in passes (``finebench models --methods``)."""
    return [
        {"kind": kind, "description": method.description, "options": option_defaults(kind),
         "test_forward_passes": method.test_forward_passes, "train_passes_per_image": method.train_passes_per_image}
        for kind, method in METHODS.items()
    ]


def build_model(
    backbone: str,
    num_classes: int,
    variant: str | MethodOptions = "baseline",
    variant_options: Mapping[str, Any] | None = None,
    backbone_options: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    batchnorm_init: BatchNormInit = BATCHNORM_INITS[0],
) -> ImageClassifier:
    """Build a backbone, load its weights, then attach the method (so its new parts start fresh).

    ``variant`` is a kind with ``variant_options`` as a mapping, or typed options (a recipe's variant).
    ``batchnorm_init`` is the initial weight of every BatchNorm (``model.batchnorm_init``): the whole
    build runs inside ``initial_batchnorm_weights``, so each draw lands where PyTorch 0.4 made it.
    """
    from finebench.models.registry import load_pretrained

    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise FinebenchError(f"num_classes={num_classes!r} is invalid: expected an integer >= 2")
    if batchnorm_init not in BATCHNORM_INITS:
        raise FinebenchError(f"model.batchnorm_init={batchnorm_init!r} is invalid: "
                             f"expected one of {', '.join(BATCHNORM_INITS)}")
    options = variant if isinstance(variant, MethodOptions) else parse_options(variant, variant_options)
    method = method_of(options)
    method.check_backbone(backbone, options)
    with initial_batchnorm_weights(batchnorm_init):
        net = method.build_backbone(backbone, backbone_options, options)
        if pretrained is not None:
            load_pretrained(net, backbone, pretrained)
        return method.attach(net, num_classes, options)


def build_model_from_config(
    config: Mapping[str, Any], num_classes: int, *, kind: str | None = None, pretrained: bool = True
) -> ImageClassifier:
    """The model of a resolved run config (a run's config.json), so the trainer, ``finebench attend``
    and ``finebench bench`` build exactly the same network from one place.

    ``kind`` swaps the variant (e.g. the baseline, for the cost the overheads are measured against);
    ``pretrained=False`` skips loading backbone weights (a checkpoint or a timing supplies them).
    """
    backbone, backbone_options, options, weights, batchnorm_init = _model_inputs(config, kind)
    return build_model(backbone, num_classes, options, backbone_options=backbone_options,
                       pretrained=weights if pretrained else None, batchnorm_init=batchnorm_init)


def network_key(config: Mapping[str, Any], *, kind: str | None = None) -> str:
    """What ``build_model_from_config`` builds the network from, as one string: runs whose keys are
    equal build identical networks (seeds, variant names, training settings, options only training
    reads (``Method.training_only_options``) and weights aside), so they share one cost
    (``finebench.cost.CostCache``)."""
    backbone, backbone_options, options, _, _ = _model_inputs(config, kind)  # initial values cost nothing
    network_options = {name: value for name, value in options.options().items()
                       if name not in method_of(options).training_only_options}
    return json.dumps([backbone, backbone_options, options.kind, network_options], sort_keys=True, default=str)


def _model_inputs(
    config: Mapping[str, Any], kind: str | None
) -> tuple[str, dict[str, Any] | None, MethodOptions, str | None, str]:
    """(backbone, backbone options, variant, pretrained weights, BatchNorm init) of a run config: all the
    network is built from."""
    try:
        model_section, variant = config["model"], config["variant"]
        backbone = model_section["backbone"]
        use_variant = kind is None or kind == variant["kind"]
        backbone_options = dict(model_section.get("options") or {}) or None
        weights = model_section.get("pretrained")
        # absent from the configs of runs recorded before the setting existed: their BatchNorms started at 1
        batchnorm_init = model_section.get("batchnorm_init", BATCHNORM_INITS[0])
    except (KeyError, TypeError, AttributeError) as error:
        raise FinebenchError(
            f"run config: unusable model/variant section ({error!r}); expected model.backbone and variant.kind"
        ) from None
    options = variant_of_config(config) if use_variant else parse_options(str(kind), None)
    return backbone, backbone_options, options, weights, batchnorm_init


def variant_of_config(config: Mapping[str, Any]) -> MethodOptions:
    """The typed variant of a run config (config.json's ``variant``: kind, name, options)."""
    variant = config["variant"]
    options = parse_options(variant["kind"], variant.get("options") or None)
    return options.model_copy(update={"name": variant.get("name")}) if variant.get("name") else options
