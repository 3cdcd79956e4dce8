"""What a model costs: parameters and FLOPs (fvcore), for one model or a baseline and its variants.

FLOP convention: fvcore counts one fused multiply-add as ONE flop (so its "FLOPs" are MACs;
ResNet-50 at 224 is about 4.1 G). Ops fvcore has no formula for (softmax, elementwise ops,
pooling) are not counted; their warnings are silenced but the totals are fvcore's own.
Models are counted in eval mode on one CPU image.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods import METHODS, Method, build_model, get_method, parse_options
from finebench.methods.baseline import METHOD as BASELINE
from finebench.models.network import EarlyPrediction, unwrap, used_parameter_count

FLOP_CONVENTION = "fvcore: one multiply-add = one flop"


@dataclass(frozen=True)
class ProfileResult:
    params: int
    flops: int
    """fvcore's count: one multiply-add is one flop."""


class TensorOutputs(nn.Module):
    """Tracing needs tensors out; ModelOutput holds Nones and a tuple."""

    def __init__(self, model: nn.Module, method: Method | None = None) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.method.predict(self.model, images) if self.method is not None else self.model(images)
        return (output.log_probs, output.logits, *output.module_logits)


def _count_flops(module: nn.Module, input_size: int, cross_check: bool = True) -> int:
    """fvcore's count; ``cross_check`` also runs torch's flop_counter (a second forward) and warns
    where the two disagree."""
    images = _probe_images(input_size)
    total, by_operator = _fvcore_counts(module, images)
    if cross_check:
        check = FlopCrossCheck(fvcore_product_macs(by_operator), flop_counter_product_flops(module, images))
        if not check.agrees:
            warnings.warn(f"fvcore and torch.utils.flop_counter disagree on {type(module).__name__}'s "
                          f"convolutions and matrix products: {check}", stacklevel=2)
    return total


def _probe_images(input_size: int) -> torch.Tensor:
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise FinebenchError(f"input_size={input_size!r} is invalid: expected an integer >= 1 (pixels)")
    return torch.zeros(1, 3, input_size, input_size)


def _fvcore_counts(module: nn.Module, images: torch.Tensor) -> tuple[int, dict[str, int]]:
    """fvcore's total and per-operator counts of one forward pass."""
    fvcore_logger = logging.getLogger("fvcore")
    level = fvcore_logger.level
    fvcore_logger.setLevel(logging.ERROR)  # "unsupported operator" noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's import calls the deprecated torch.jit.script
            from fvcore.nn import FlopCountAnalysis
        analysis = FlopCountAnalysis(module, images)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit deprecation notices from fvcore's tracer
            return int(analysis.total()), dict(analysis.by_operator())
    finally:
        fvcore_logger.setLevel(level)


FVCORE_PRODUCTS = ("conv", "linear", "matmul", "bmm", "einsum", "addmm", "mm", "baddbmm")
"""fvcore's names of the operations both counters count (convolutions and matrix products)."""
FLOP_COUNTER_PRODUCTS = ("aten.convolution", "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")
"""``torch.utils.flop_counter``'s names of the same operations (einsum and linear lower to these)."""


@dataclass(frozen=True)
class FlopCrossCheck:
    """fvcore traces through TorchScript (deprecated in torch 2.11) and has had no release since 2022,
    so every count is checked against torch's own ``FlopCounterMode`` on the operations both count:
    fvcore counts a multiply-add as one flop, flop_counter as two; fvcore also counts BatchNorm and
    pooling, which flop_counter leaves out, so those are not compared."""

    fvcore_macs: int
    flop_counter_flops: int

    @property
    def agrees(self) -> bool:
        return 2 * self.fvcore_macs == self.flop_counter_flops

    def __str__(self) -> str:
        return f"fvcore {self.fvcore_macs:,} multiply-adds x 2 vs flop_counter {self.flop_counter_flops:,} flops"


def fvcore_product_macs(by_operator: Mapping[str, int]) -> int:
    return int(sum(count for name, count in by_operator.items() if name in FVCORE_PRODUCTS))


def flop_counter_product_flops(module: nn.Module, images: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(images)
    counts = counter.get_flop_counts().get("Global", {})
    return int(sum(count for op, count in counts.items() if str(op) in FLOP_COUNTER_PRODUCTS))


def cross_check_flops(module: nn.Module, input_size: int) -> FlopCrossCheck:
    """Both counters' figures for one prediction on a 3×input_size×input_size image (for tests)."""
    images = _probe_images(input_size)
    _, by_operator = _fvcore_counts(module, images)
    return FlopCrossCheck(fvcore_product_macs(by_operator), flop_counter_product_flops(module, images))


def _in_eval(model: nn.Module):  # noqa: ANN202 - small context helper
    class _Eval:
        def __enter__(self) -> None:
            self.was_training = model.training
            model.eval()

        def __exit__(self, *_: object) -> None:
            model.train(self.was_training)

    return _Eval()


def profile_model(model: nn.Module, input_size: int, method: Method | None = None,
                  cross_check: bool = True) -> ProfileResult:
    """Parameters and fvcore FLOPs of one prediction on a 3×input_size×input_size image: one forward
    pass, or every pass ``method.predict`` makes. ``cross_check``: fvcore's count checked against
    torch's flop_counter (``finebench profile``); a run's costing (``finebench.plan``) leaves it out,
    since the same networks' counts are checked where they are profiled and a dry run must answer
    in seconds."""
    params = used_parameter_count(model, input_size)
    with _in_eval(model):
        flops = _count_flops(TensorOutputs(model, method), input_size, cross_check)
    return ProfileResult(params=params, flops=flops)


def tap_flops(model: nn.Module, input_size: int) -> dict[str, int]:
    """FLOPs to classify with each attention module alone: the backbone up to its tap plus the module."""
    classifier = unwrap(model)
    with _in_eval(classifier):
        return {tap: _count_flops(EarlyPrediction(classifier, tap), input_size) for tap in classifier.attention_taps}


def early_prediction_flops(model: nn.Module, method: Method, input_size: int,
                           cross_check: bool = True) -> dict[str, int]:
    """FLOPs of each cheaper prediction the method offers (``Method.early_predictors``); {} for most.
    ``cross_check`` as in ``profile_model``."""
    with _in_eval(model):
        return {name: _count_flops(module, input_size, cross_check)
                for name, module in method.early_predictors(model).items()}


@dataclass(frozen=True)
class VariantCost:
    label: str
    variant: str
    params: int
    flops: int
    params_overhead_pct: float
    """Relative to the baseline of the same backbone and number of classes."""
    flops_overhead_pct: float
    taps: list[dict[str, Any]] = field(default_factory=list)
    """Where each attention module or a method's head reads (``ImageClassifier.tap_summary``); empty for
    a model reading the pooled features."""
    test_forward_passes: int = 1
    """Backbone passes one test prediction needs (``Method.test_forward_passes``); FLOPs count them all."""
    train_passes_per_image: int = 1
    """Backbone forward passes per training image (``Method.train_passes_per_image``)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_variants(backbone: str, num_classes: int, input_size: int,
                     variants: Sequence[tuple[str, str, Mapping[str, Any] | None]],
                     backbone_options: Mapping[str, Any] | None = None) -> list[VariantCost]:
    """Profile the baseline and each (label, variant, variant_options); the baseline row comes first."""
    baseline = profile_model(build_model(backbone, num_classes, backbone_options=backbone_options), input_size)
    rows = [VariantCost(BASELINE.kind, BASELINE.kind, baseline.params, baseline.flops, 0.0, 0.0,
                        test_forward_passes=BASELINE.test_forward_passes,
                        train_passes_per_image=BASELINE.train_passes_per_image)]
    for label, variant, options in variants:
        if variant == BASELINE.kind:
            continue
        method = get_method(variant)
        model = build_model(backbone, num_classes, variant, options, backbone_options)
        cost = profile_model(model, input_size, method)
        rows.append(
            VariantCost(
                label, variant, cost.params, cost.flops,
                100.0 * (cost.params - baseline.params) / baseline.params,
                100.0 * (cost.flops - baseline.flops) / baseline.flops,
                model.tap_summary(), method.test_forward_passes, method.train_passes_per_image,
            )
        )
    return rows


@dataclass(frozen=True)
class CostReport:
    """A profile table: what was profiled, then the baseline row and one row per variant."""

    backbone: str
    backbone_options: Mapping[str, Any]
    num_classes: int
    input_size: int
    rows: list[VariantCost]
    early_prediction: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per variant label with cheaper predictions (A&R: each module alone): their FLOPs
    (``Method.early_predictors``)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "backbone_options": dict(self.backbone_options),
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "flop_convention": FLOP_CONVENTION,
            "rows": [row.as_dict() for row in self.rows],
            "early_prediction": self.early_prediction,
        }


def profile_spec(backbone: str, num_classes: int, input_size: int,
                 variants: Sequence[tuple[str, str, Mapping[str, Any] | None]],
                 backbone_options: Mapping[str, Any] | None = None, early_prediction: bool = False) -> CostReport:
    """Profile a model spec; with ``early_prediction`` also the cost of each attention module alone."""
    rows = profile_variants(backbone, num_classes, input_size, variants, backbone_options)
    early = {}
    for label, variant, options in variants if early_prediction else ():
        model = build_model(backbone, num_classes, variant, options, backbone_options)
        costs = early_prediction_flops(model, get_method(variant), input_size)
        if costs:
            early[label] = costs
    return CostReport(backbone, dict(backbone_options or {}), num_classes, input_size, rows, early)


def method_variants(kinds: Sequence[str], flags: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, kind, options) per ``--variant`` of ``finebench profile``, its options read from
    ``--option-name VALUE`` flags (values as in TOML: ``2``, ``1e-3``, ``sigmoid``); each flag goes to
    every listed method that has that option, and one that none has is an error."""
    from finebench.overrides import parse_value
    from finebench.recipe import variant_name

    texts: dict[str, str | None] = {}
    pending = list(flags)
    while pending:
        flag = pending.pop(0)
        name, sep, value = flag.partition("=")
        if not name.startswith("--") or len(name) < 3:
            raise FinebenchError(f"finebench profile: unexpected argument {flag!r}; expected --option-name VALUE")
        if not sep:
            value = pending.pop(0) if pending and not pending[0].startswith("--") else None
        texts[name[2:].replace("-", "_")] = value
    kinds = list(kinds) or [kind for kind, method in METHODS.items() if method.profile_default]
    fields = {kind: [k for k in get_method(kind).Options.model_fields if k not in ("kind", "name")] for kind in kinds}
    unused = [name for name in texts if not any(name in names for names in fields.values())]
    if unused:
        offered = "; ".join(f"{kind}: {', '.join('--' + n.replace('_', '-') for n in names) or 'none'}"
                            for kind, names in fields.items())
        raise FinebenchError(f"finebench profile: --{unused[0].replace('_', '-')} is no option of "
                             f"{', '.join(kinds)} (options: {offered})")
    missing = [name for name, text in texts.items() if text is None]
    if missing:
        raise FinebenchError(f"finebench profile: --{missing[0].replace('_', '-')} needs a value")
    values = {name: parse_value(str(text)) for name, text in texts.items()}
    variants = []
    for kind in kinds:
        options = parse_options(kind, {k: v for k, v in values.items() if k in fields[kind]})
        variants.append((variant_name(options), kind, options.options()))
    return variants


def profile_recipe(path: str, overrides: Sequence[str] = (), early_prediction: bool = False) -> CostReport:
    """Profile a recipe's backbone on its dataset (classes, input size) with each of its variants."""
    from finebench.data.registry import get_spec
    from finebench.recipe import load_recipe, variant_name

    loaded = load_recipe(path, overrides)
    recipe = loaded.recipe
    if not isinstance(recipe.model.backbone, str):
        raise FinebenchError(
            f"{path}: model.backbone lists {len(recipe.model.backbones())} backbones: profile one with "
            f"--set model.backbone={recipe.model.backbones()[0]}"
        )
    variants = [(variant_name(v), v.kind, v.options()) for v in recipe.variants]
    return profile_spec(
        recipe.model.backbone, get_spec(recipe.dataset.name).num_classes, loaded.input_size(), variants,
        recipe.model.options, early_prediction,
    )



def profile_recipe_backbones(path: str, overrides: Sequence[str] = (), early_prediction: bool = False) -> list[CostReport]:
    """One ``profile_recipe`` report per backbone a recipe lists (``model.backbone`` may be a list),
    each as if the recipe named that backbone alone, as ``finebench run`` trains them."""
    from finebench.recipe import load_recipe

    backbones = load_recipe(path, overrides).recipe.model.backbones()
    if len(backbones) == 1:
        return [profile_recipe(path, overrides, early_prediction)]
    return [profile_recipe(path, [*overrides, f"model.backbone={backbone}"], early_prediction) for backbone in backbones]
