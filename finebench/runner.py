"""``finebench run``: expand a recipe into runs and fit each, skipping finished and resuming interrupted ones.

Everything a user can get wrong (recipe, dataset name, unprepared data, model options) is checked
before the first file is written. Each run then trains under its own lock, so two processes on one
results folder share the work instead of corrupting it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from finebench.errors import FinebenchError
from finebench.recipe import LoadedRecipe, RunSpec, expand_runs
from finebench.results import (
    SCHEMA_VERSION,
    RunDir,
    RunLocked,
    best_entry,
    environment,
    final_entry,
    utc_now,
)
from finebench.train.distributed import lost_contact
from finebench.train.engine import (
    DistContext,
    RichProgress,
    SilentProgress,
    describe_device,
    fit,
    resolve_channels_last,
    resolve_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
)


@dataclass
class RunOutcome:
    run: RunSpec
    path: Path | None
    status: str
    """finished | failed | skipped-finished | skipped-failed | locked | planned"""
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int
    module_flops: dict[str, int]


def backbone_label(backbone: str, options: Mapping[str, Any]) -> str:
    """``WRN-28-10`` for WRN, the registry name plus options for the rest."""
    if backbone == "wrn":
        return f"WRN-{options.get('depth', 28)}-{options.get('width', 10)}"
    extras = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{backbone}({extras})" if extras else backbone


def _build_model(
    loaded: LoadedRecipe, run: RunSpec, num_classes: int, *, kind: str | None = None, pretrained: bool = True
):
    """The run's model (``kind`` swaps the variant, e.g. for the baseline's cost), errors named by file."""
    from finebench.models import build_model_from_config

    try:
        return build_model_from_config(run.config, num_classes, kind=kind, pretrained=pretrained)
    except FinebenchError as error:
        raise FinebenchError(f"{loaded.path}: model: {error}") from None


def _cost(model: torch.nn.Module, input_size: int, with_taps: bool) -> Cost:
    from finebench.profile import profile_model, tap_flops

    was_training = model.training
    profile = profile_model(model, input_size)
    taps = {k: int(v) for k, v in tap_flops(model, input_size).items()} if with_taps else {}
    model.train(was_training)
    return Cost(int(profile.params), int(profile.flops), taps)


class _CostCache:
    """Params/FLOPs per variant (identical across seeds) and of the plain baseline."""

    def __init__(self, loaded: LoadedRecipe, num_classes: int, input_size: int) -> None:
        self.loaded, self.num_classes, self.input_size = loaded, num_classes, input_size
        self._costs: dict[str, Cost] = {}

    def of(self, run: RunSpec, model: torch.nn.Module | None = None) -> Cost:
        if run.variant_name not in self._costs:
            # Weights do not change the cost, and a dry run must work before they are downloaded.
            model = model if model is not None else _build_model(self.loaded, run, self.num_classes, pretrained=False)
            self._costs[run.variant_name] = _cost(model, self.input_size, run.variant_kind == "attention")
        return self._costs[run.variant_name]

    def baseline(self, run: RunSpec) -> Cost:
        if "\0baseline" not in self._costs:
            if run.variant_kind == "baseline":
                self._costs["\0baseline"] = self.of(run)
            else:
                model = _build_model(self.loaded, run, self.num_classes, kind="baseline", pretrained=False)
                self._costs["\0baseline"] = _cost(model, self.input_size, False)
        return self._costs["\0baseline"]


def _build_loaders(loaded: LoadedRecipe, data_root: Path, seed: int, ctx: DistContext, device: torch.device):
    from finebench.data.loader import build_loaders

    dataset, train = loaded.recipe.dataset, loaded.recipe.train
    return build_loaders(
        dataset.name,
        data_root,
        batch_size=train.batch_size,
        eval_batch_size=train.eval_batch_size,
        workers=train.workers,
        seed=seed,
        input_size=dataset.input_size,
        augmentation=dataset.augmentation,
        train_split=dataset.train_split,
        test_split=dataset.test_split,
        rank=ctx.rank,
        world_size=ctx.world_size,
        pin_memory=device.type == "cuda",
        in_memory="auto",  # small images: decoded once, augmented in batches on the device
        device=device,
    )


def _summary(
    loaded: LoadedRecipe,
    run: RunSpec,
    *,
    status: str,
    num_classes: int,
    cost: Cost,
    baseline: Cost,
    input_size: int,
    device: torch.device,
    precision: str,
    compiled: bool,
    channels_last: bool,
    ctx: DistContext,
    started_at: str,
    rows: Sequence[Mapping[str, Any]] = (),
    failure_reason: str | None = None,
    epochs_completed: int = 0,
    train_time_s: float = 0.0,
    images_per_s: float = 0.0,
    compile_time_s: float = 0.0,
) -> dict[str, Any]:
    recipe = loaded.recipe
    return {
        "schema": SCHEMA_VERSION,
        "run_id": run.run_id,
        "recipe": loaded.name,
        "status": status,
        "failure_reason": failure_reason,
        "dataset": recipe.dataset.name,
        "num_classes": num_classes,
        "backbone": recipe.model.backbone,
        "backbone_label": backbone_label(recipe.model.backbone, recipe.model.options),
        "variant": run.variant_kind,
        "variant_name": run.variant_name,
        "variant_options": run.config["variant"]["options"],
        "seed": run.seed,
        "epochs": recipe.train.epochs,
        "epochs_completed": epochs_completed,
        "final": final_entry(list(rows)),
        "best": best_entry(list(rows)),
        "params": cost.params,
        "flops": cost.flops,
        "params_baseline": baseline.params,
        "flops_baseline": baseline.flops,
        "module_flops": cost.module_flops,
        "input_size": input_size,
        "train_time_s": train_time_s,
        "images_per_s": images_per_s,
        "device": describe_device(device),
        "precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
        "compile_time_s": compile_time_s,
        "world_size": ctx.world_size,
        **environment(),
        "started_at": started_at,
        "finished_at": utc_now() if status != "running" else None,
    }


def _execute(
    loaded: LoadedRecipe,
    run: RunSpec,
    run_dir: RunDir,
    *,
    data_root: Path,
    costs: _CostCache,
    num_classes: int,
    ctx: DistContext,
    quiet: bool,
    console: Console,
) -> dict[str, Any]:
    """Train one run inside its lock and return its final summary."""
    train = loaded.recipe.train
    device = resolve_device(train.device)
    precision = resolve_precision(train.precision, device)
    compiled = resolve_compile(train.compile, device)
    attention = run.variant_kind == "attention"
    channels_last = resolve_channels_last(train.channels_last, device, compiled=compiled, attention=attention)
    previous = run_dir.summary() or {}
    seed_everything(run.seed)
    model = _build_model(loaded, run, num_classes)
    loaders = _build_loaders(loaded, data_root, run.seed, ctx, device)
    common = dict(
        num_classes=num_classes, cost=costs.of(run, model), baseline=costs.baseline(run),
        input_size=costs.input_size, device=device, precision=precision, compiled=compiled,
        channels_last=channels_last, ctx=ctx,
        started_at=previous.get("started_at") or utc_now(),
    )
    if ctx.is_main:
        run_dir.write_config(run.config)
        run_dir.write_summary(_summary(loaded, run, status="running", rows=run_dir.read_metrics(), **common))
    label = f"{run.variant_name} seed {run.seed}"
    progress = SilentProgress() if quiet or not ctx.is_main else RichProgress(label, console)
    try:
        result = fit(
            model, loaders.train, loaders.test, train,
            mixture=run.variant_kind == "attention", store=run_dir, ctx=ctx, progress=progress,
        )
    except Exception as error:
        # A lost worker interrupts the run but says nothing against it: left "running", a rerun resumes it.
        if ctx.is_main and not (ctx.world_size > 1 and lost_contact(error)):
            reason = f"{type(error).__name__}: {error}"
            run_dir.write_summary(
                _summary(loaded, run, status="failed", failure_reason=reason, rows=run_dir.read_metrics(), **common)
            )
        raise
    finally:
        if isinstance(progress, RichProgress):
            progress.close()
    summary = _summary(
        loaded, run, status=result.status, failure_reason=result.failure_reason, rows=result.rows,
        epochs_completed=result.epochs_completed, train_time_s=result.train_time_s,
        images_per_s=result.images_per_s, compile_time_s=result.compile_time_s, **common,
    )
    if ctx.is_main:
        run_dir.write_summary(summary)
    if result.status == "failed" and not quiet:
        console.print(f"[red]{label}: failed: {result.failure_reason}[/]", highlight=False)
    return summary


def run_recipe(
    loaded: LoadedRecipe,
    *,
    results_dir: Path = Path("results"),
    data_root: Path | None = None,
    only: Sequence[str] = (),
    dry_run: bool = False,
    quiet: bool = False,
    retry_failed: bool = False,
    ctx: DistContext | None = None,
    console: Console | None = None,
) -> list[RunOutcome]:
    """Train every run of a recipe that is not finished yet; the result has one outcome per run."""
    from finebench.data.registry import get_spec

    ctx = ctx or DistContext()
    console = console or Console(stderr=True, quiet=quiet or not ctx.is_main, soft_wrap=True)
    runs = expand_runs(loaded, only)
    data_root = Path(data_root if data_root is not None else loaded.recipe.dataset.root)
    num_classes = get_spec(loaded.recipe.dataset.name).num_classes
    costs = _CostCache(loaded, num_classes, loaded.input_size())

    if dry_run:
        return [
            RunOutcome(run, RunDir(results_dir, loaded.name, run.run_id).path, "planned",
                       {"params": costs.of(run).params, "flops": costs.of(run).flops})
            for run in runs
        ]

    if ctx.is_main:
        _prepare_if_embedded(loaded.recipe.dataset.name, data_root, quiet)
    ctx.barrier()
    # Fail on unprepared data or bad model options before anything is written.
    device = resolve_device(loaded.recipe.train.device)
    loaders = _build_loaders(loaded, data_root, runs[0].seed, ctx, device)
    num_classes = loaders.num_classes
    costs = _CostCache(loaded, num_classes, loaded.recipe.dataset.input_size or _input_size_of(loaders))
    for run in runs:
        costs.of(run)
    del loaders

    outcomes = []
    for run in runs:
        run_dir = RunDir(results_dir, loaded.name, run.run_id)
        with contextlib.ExitStack() as held:
            # Rank 0 alone locks and decides; every rank then follows the same decision.
            decision = None
            if ctx.is_main:
                try:
                    held.enter_context(run_dir.lock())
                    status = run_dir.status()
                    skip = status == "finished" or (status == "failed" and not retry_failed)
                    decision = f"skipped-{status}" if skip else "train"
                except RunLocked:
                    decision = "locked"
            decision = ctx.broadcast(decision)
            label = f"{run.variant_name} seed {run.seed}"
            if decision == "locked":
                console.print(f"{label}: locked by another process, skipped")
                outcomes.append(RunOutcome(run, run_dir.path, "locked"))
            elif decision != "train":
                console.print(f"{label}: {decision.removeprefix('skipped-')} earlier, skipped ({run_dir.path})")
                outcomes.append(RunOutcome(run, run_dir.path, decision, run_dir.summary() or {}))
            else:
                summary = _execute(
                    loaded, run, run_dir, data_root=data_root, costs=costs, num_classes=num_classes,
                    ctx=ctx, quiet=quiet, console=console,
                )
                outcomes.append(RunOutcome(run, run_dir.path, summary["status"], summary))
    return outcomes


def check_before_launch(loaded: LoadedRecipe, data_root: Path | None, world_size: int) -> None:
    """What every worker would reject, checked once before ``world_size`` workers start."""
    from finebench.data.loader import per_worker_batch
    from finebench.data.registry import get_spec
    from finebench.data.store import read_meta

    per_worker_batch(loaded.recipe.train.batch_size, world_size)
    name = loaded.recipe.dataset.name
    if not get_spec(name).offline:  # embedded datasets are prepared by rank 0
        read_meta(Path(data_root if data_root is not None else loaded.recipe.dataset.root), name)


def _prepare_if_embedded(name: str, data_root: Path, quiet: bool) -> None:
    """Datasets shipped inside an installed package need no download, so a fresh install can
    ``finebench run recipes/quickstart.toml`` at once; anything else must be prepared explicitly."""
    from finebench.data.prepare import prepare_dataset
    from finebench.data.registry import get_spec
    from finebench.data.store import is_prepared

    if get_spec(name).offline and not is_prepared(data_root, name):
        prepare_dataset(name, data_root, quiet=quiet)


def _input_size_of(loaders: Any) -> int:
    images, _ = next(iter(loaders.test))
    return int(images.shape[-1])


def _fmt_count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def outcome_table(outcomes: Sequence[RunOutcome], *, title: str, dry_run: bool = False) -> Table:
    """Variant beside variant: final-epoch test accuracy (no test-set selection), cost and time.

    The best epoch is shown only as ``best@epoch`` in its own column: it is selected on the test set.
    """
    table = Table(title=title)
    columns = ["variant", "seed", "run id"]
    if not dry_run:
        columns += ["status", "top-1", "top-5", "net top-1", "best@ep"]
    columns += ["params", "FLOPs"]
    if not dry_run:
        columns += ["time", "img/s"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("variant", "status", "run id") else "right")

    def pct(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, (int, float)) else "-"

    for outcome in outcomes:
        summary = outcome.summary
        cells = [outcome.run.variant_name, str(outcome.run.seed), outcome.run.run_id]
        if not dry_run:
            final = summary.get("final") or {}
            best = summary.get("best") or {}
            cells += [outcome.status, pct(final.get("test_top1")), pct(final.get("test_top5")),
                      pct(final.get("network_top1")), f"{pct(best.get('test_top1'))}@{best['epoch']}" if best else "-"]
        cells += [_fmt_count(summary.get("params")), _fmt_count(summary.get("flops"))]
        if not dry_run:
            seconds = summary.get("train_time_s")
            cells += [f"{seconds:.0f}s" if isinstance(seconds, (int, float)) else "-",
                      f"{summary['images_per_s']:,.0f}" if summary.get("images_per_s") else "-"]
        table.add_row(*cells)
    return table
