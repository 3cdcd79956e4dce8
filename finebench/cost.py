"""The cost probe of a run's network: params, FLOPs, early-prediction FLOPs and size warnings.

One probe for the dry run (which prints them), the run (whose summary records them, beside the
plain baseline's) and ``--submit`` (which warns before it queues): each counts a network built
with random weights (``factory.build_model``, never downloading), so a dry run answers before any
weights are there, and the planner, which only checks and decides, builds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from rich.console import Console

from finebench.console import make_console
from finebench.errors import FinebenchError
from finebench.factory import build_model
from finebench.methods import Method, get_method, variant_of_config
from finebench.methods.baseline import METHOD as BASELINE
from finebench.plan import Plan
from finebench.recipe import LoadedRecipe, RunSpec


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int
    module_flops: dict[str, int] | None
    """FLOPs of each cheaper prediction the method offers (``Method.early_predictors``); None where
    they were not counted (``CostCache.of(..., module_flops=False)``: a dry run prints none)."""
    taps: list[dict[str, Any]] = field(default_factory=list)
    """Where each attention module or a method's head reads (``ImageClassifier.tap_summary``); empty for
    a model reading the pooled features."""
    size_warnings: list[str] = field(default_factory=list)
    """Where the method's mechanism cannot act at the input size (``Method.size_warnings``), one line
    each naming the variant and backbone; recorded in the run's summary for ``report``'s footnote."""


def _cost(model: torch.nn.Module, input_size: int, method: Method) -> Cost:
    """The run's params and FLOPs without ``profile``'s fvcore-vs-flop_counter cross-check: the
    check costs a second forward of every network, a dry run must answer in seconds, and
    ``finebench profile`` checks the same networks' counts."""
    from finebench.models.network import unwrap
    from finebench.profile import profile_model

    was_training = model.training
    profile = profile_model(model, input_size, method, cross_check=False)
    model.train(was_training)
    return Cost(int(profile.params), int(profile.flops), None, unwrap(model).tap_summary())


def _module_flops(model: torch.nn.Module, input_size: int, method: Method) -> dict[str, int]:
    """``Cost.module_flops``: one fvcore trace per early prediction, so only where a summary records them."""
    from finebench.profile import early_prediction_flops

    was_training = model.training
    flops = early_prediction_flops(model, method, input_size, cross_check=False)
    model.train(was_training)
    return {name: int(value) for name, value in flops.items()}


def _size_warnings(run: RunSpec, model: torch.nn.Module, input_size: int) -> list[str]:
    """The run's ``Method.size_warnings``, its tap sizes from the strides the backbone declares
    (ceil(input / stride), what a padded convolutional network gives; no forward pass)."""
    from finebench.models.network import unwrap

    sizes = {point.name: (-(-input_size // point.stride),) * 2 for point in unwrap(model).backbone.tap_points}
    options = run.variant or variant_of_config(run.config)
    lines = get_method(run.variant_kind).size_warnings(options, sizes, input_size)
    return [f"variant {run.variant_name!r} on {run.backbone}: {line}" for line in lines]


def size_warnings(costs: CostCache, runs: Sequence[RunSpec]) -> list[str]:
    """Each distinct size warning of ``runs`` (one per variant and backbone, not per seed)."""
    return list(dict.fromkeys(line for run in runs for line in costs.of(run, module_flops=False).size_warnings))


def warn_sizes(lines: Sequence[str], console: Console | None = None) -> None:
    """The size warnings as ``run`` prints them (on stderr), before it trains or queues anything."""
    console = console or make_console(stderr=True, soft_wrap=True)
    for line in lines:
        console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


class CostCache:
    """Params/FLOPs per distinct network (``network_key``: the same across seeds, variant names and
    training settings) and of the plain baseline, each network counted once.

    Costing runs inside ``fork_rng`` (a model built for its cost draws random initial weights): the
    runner asks for costs after seeding a run, and a draw from the run's RNG would shift every
    later draw of that run (dropout, WS-DAN's and CAL's maps) by whether this process had already
    costed the baseline, so ``--only ws_dan``, ``--jobs`` and the whole recipe would train the
    same run id differently."""

    def __init__(self, loaded: LoadedRecipe, num_classes: int, input_size: int) -> None:
        self.loaded, self.num_classes, self.input_size = loaded, num_classes, input_size
        self._costs: dict[str, Cost] = {}

    @classmethod
    def of_plan(cls, loaded: LoadedRecipe, plan: Plan) -> CostCache:
        """The costs at the plan's class count and input size (the data's, once ``plan.preflight`` read them)."""
        return cls(loaded, plan.num_classes, plan.input_size)

    def of(self, run: RunSpec, model: torch.nn.Module | None = None, *, module_flops: bool = True) -> Cost:
        """The run's cost. ``model``, the run's own model about to train, also learns its unread
        parameters at the run's input size here (DDP's ignore list reads them, and knows no size).
        ``module_flops=False`` leaves the early predictions uncounted (a trace of the network per
        prediction), for a dry run, which prints none."""
        if model is not None:
            from finebench.models.network import unwrap

            with torch.random.fork_rng(devices=[]):  # no draw of the run's RNG (see the class)
                unwrap(model).unused_parameter_names(self.input_size)
        return self._cost_of(run, None, model, module_flops)

    def baseline(self, run: RunSpec) -> Cost:
        """The plain baseline on the run's backbone: the reference of its overheads."""
        return self._cost_of(run, BASELINE.kind, None, True)

    def _cost_of(self, run: RunSpec, kind: str | None, model: torch.nn.Module | None, module_flops: bool) -> Cost:
        key = self._key(run, kind)
        cost = self._costs.get(key)
        if cost is None or (module_flops and cost.module_flops is None):
            method = get_method(kind or run.variant_kind)
            # Weights do not change the cost, and a dry run must work before they are downloaded.
            with torch.random.fork_rng(devices=[]):
                if model is None:
                    model = build_model(self.loaded, run, self.num_classes, kind=kind, pretrained=False)
                if cost is None:
                    cost = _cost(model, self.input_size, method)
                    # the run's own variant only: the baseline a variant is measured against warns of nothing
                    cost = replace(cost, size_warnings=_size_warnings(run, model, self.input_size) if kind is None else [])
                if module_flops:
                    cost = replace(cost, module_flops=_module_flops(model, self.input_size, method))
            self._costs[key] = cost
        return cost

    def _key(self, run: RunSpec, kind: str | None) -> str:
        from finebench.methods import network_key

        try:
            return network_key(run.config, kind=kind)
        except FinebenchError as error:
            raise FinebenchError(f"{self.loaded.path}: model: {error}") from None
