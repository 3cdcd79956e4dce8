"""``finebench run``: expand a recipe into runs and fit each, skipping finished and resuming interrupted ones.

Everything a user can get wrong (recipe, dataset name, unprepared data, model options, unreadable
run records) is checked before the first file is written. Each run then trains under its own lock,
so two processes on one results folder share the work instead of corrupting it; runs that are
already finished (or failed) are skipped without a lock, so a read-only results folder can be rerun.

Only training itself marks a run failed (a non-finite loss). Anything else that stops a run (Ctrl-C,
a full disk, an unreadable checkpoint) leaves it as it was, resumable, with one line that names the
file and says how to go on.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from finebench.data.root import DataRoot, choose_data_root
from finebench.data.store import meta_digest
from finebench.errors import FinebenchError, Interrupted
from finebench.methods import Method, MethodOptions, get_method, method_of, variant_of_config
from finebench.methods.baseline import METHOD as BASELINE
from finebench.recipe import LoadedRecipe, RunSpec, expand_runs, held_out_folds
from finebench.results import (
    SCHEMA_VERSION,
    RunDir,
    RunLocked,
    RunState,
    best_entry,
    environment,
    final_entry,
    utc_now,
)
from finebench.train.events import TensorBoardLog
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
from finebench.train.threads import ThreadChoice, apply_threads


@dataclass
class RunOutcome:
    run: RunSpec
    path: Path | None
    status: str
    """finished | failed | skipped-finished | skipped-failed | locked | planned"""
    summary: dict[str, Any] = field(default_factory=dict)
    state: str | None = None
    """Dry runs: the run's state on disk (``RunState.kind``: new, resumable, finished, failed, damaged)."""
    data: str | None = None
    """Dry runs: whether the dataset is prepared (prepared, not prepared, prepared on first run)."""


EXIT_FAILED = 1
"""``finebench run`` exit code when a run failed (now or in an earlier invocation)."""
EXIT_LOCKED = 3
"""``finebench run`` exit code when runs were left to another process that holds their lock."""


def exit_code(outcomes: Sequence[RunOutcome]) -> int:
    """0 only when every run is finished (now or earlier), so ``finebench run R && next`` is safe."""
    statuses = {outcome.status for outcome in outcomes}
    if statuses & {"failed", "skipped-failed"}:
        return EXIT_FAILED
    if "locked" in statuses:
        return EXIT_LOCKED
    return 0


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int
    module_flops: dict[str, int]
    taps: list[dict[str, Any]] = field(default_factory=list)
    """Where each attention module reads (``ImageClassifier.tap_summary``); empty for other variants."""


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
    from finebench.methods import build_model_from_config

    try:
        return build_model_from_config(run.config, num_classes, kind=kind, pretrained=pretrained)
    except FinebenchError as error:
        raise FinebenchError(f"{loaded.path}: model: {error}") from None


def _cost(model: torch.nn.Module, input_size: int, method: Method) -> Cost:
    from finebench.models.network import unwrap
    from finebench.profile import early_prediction_flops, profile_model

    was_training = model.training
    profile = profile_model(model, input_size, method)
    module_flops = {k: int(v) for k, v in early_prediction_flops(model, method, input_size).items()}
    model.train(was_training)
    return Cost(int(profile.params), int(profile.flops), module_flops, unwrap(model).tap_summary())


class _CostCache:
    """Params/FLOPs per variant (identical across seeds) and of the plain baseline."""

    def __init__(self, loaded: LoadedRecipe, num_classes: int, input_size: int) -> None:
        self.loaded, self.num_classes, self.input_size = loaded, num_classes, input_size
        self._costs: dict[str, Cost] = {}

    def of(self, run: RunSpec, model: torch.nn.Module | None = None) -> Cost:
        key = f"{run.config['model']['backbone']}\0{run.variant_name}"  # a recipe may list backbones
        if key not in self._costs:
            # Weights do not change the cost, and a dry run must work before they are downloaded.
            model = model if model is not None else _build_model(self.loaded, run, self.num_classes, pretrained=False)
            self._costs[key] = _cost(model, self.input_size, get_method(run.variant_kind))
        return self._costs[key]

    def baseline(self, run: RunSpec) -> Cost:
        key = f"{run.config['model']['backbone']}\0\0baseline"
        if key not in self._costs:
            if run.variant_kind == BASELINE.kind:
                self._costs[key] = self.of(run)
            else:
                model = _build_model(self.loaded, run, self.num_classes, kind=BASELINE.kind, pretrained=False)
                self._costs[key] = _cost(model, self.input_size, BASELINE)
        return self._costs[key]


def _build_loaders(loaded: LoadedRecipe, run: RunSpec, data_root: Path, ctx: DistContext, device: torch.device):
    from finebench.data.loader import build_loaders

    # the run's own splits: on a k-fold dataset they depend on its held-out fold
    dataset, train = run.config["dataset"], run.train_section()
    return build_loaders(
        dataset["name"],
        data_root,
        batch_size=train.batch_size,
        eval_batch_size=train.eval_batch_size,
        workers=train.workers,
        seed=run.seed,
        input_size=dataset["input_size"],
        augmentation=dataset["augmentation"],
        train_split=dataset["train_split"],
        test_split=dataset["test_split"],
        rank=ctx.rank,
        world_size=ctx.world_size,
        pin_memory=device.type == "cuda",
        in_memory="auto",  # small images: decoded once, augmented in batches on the device
        device=device,
        decode=dataset.get("decode", "auto"),
        sampler_factory=partial(get_method(run.variant_kind).batch_sampler, run.variant or variant_of_config(run.config)),
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
    data_path: str = "workers",
    dataset_digest: str | None = None,
    threads: ThreadChoice | None = None,
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
        "backbone": run.config["model"]["backbone"],
        "backbone_label": backbone_label(run.config["model"]["backbone"], recipe.model.options),
        "variant": run.variant_kind,
        "variant_name": run.variant_name,
        "variant_options": run.config["variant"]["options"],
        "taps": cost.taps,
        "seed": run.seed,
        "fold": run.fold,
        "epochs": (run.train or recipe.train).epochs,
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
        "data_path": data_path,
        "world_size": ctx.world_size,
        "dataset_digest": dataset_digest,
        "threads": threads.threads if threads else None,
        "threads_rule": threads.rule if threads else None,
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
    train = run.train_section()
    method = get_method(run.variant_kind)
    device = resolve_device(train.device)
    precision = resolve_precision(train.precision, device)
    compiled = resolve_compile(train.compile, device, attention=method.mixture)
    channels_last = resolve_channels_last(train.channels_last, device, compiled=compiled, attention=method.mixture)
    previous = run_dir.summary() or {}
    resumed_threads = previous.get("threads") if run_dir.checkpoint_path.is_file() else None
    threads = apply_threads(train.threads, previous=resumed_threads if isinstance(resumed_threads, int) else None,
                            workers_here=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    seed_everything(run.seed)
    model = _build_model(loaded, run, num_classes)
    loaders = _build_loaders(loaded, run, data_root, ctx, device)
    common = dict(
        num_classes=num_classes, cost=costs.of(run, model), baseline=costs.baseline(run),
        input_size=costs.input_size, device=device, precision=precision, compiled=compiled,
        channels_last=channels_last, ctx=ctx,
        started_at=previous.get("started_at") or utc_now(), data_path=loaders.path,
        dataset_digest=meta_digest(data_root, loaded.recipe.dataset.name), threads=threads,
    )
    if ctx.is_main:
        # the resolved absolute root, so `attend` or `eval` run from elsewhere find the same store
        run_dir.write_config({**run.config, "dataset": {**run.config["dataset"], "root": str(data_root)}})
        run_dir.write_summary(_summary(loaded, run, status="running", rows=run_dir.read_metrics(), **common))
    label = f"{run.variant_name} seed {run.seed}"
    progress = SilentProgress() if quiet or not ctx.is_main else RichProgress(label, console)
    events = TensorBoardLog(run_dir.path) if ctx.is_main else None

    def on_epoch(row: Mapping[str, Any], rows: list[dict[str, Any]]) -> None:
        """``report`` shows a run in progress with its epochs done; TensorBoard gets the same row."""
        run_dir.write_summary(_summary(loaded, run, status="running", rows=rows, epochs_completed=int(row["epoch"]),
                                       **common))
        if events is not None:
            events.log(row)

    try:
        result = fit(
            model, loaders.train, loaders.test, train,
            mixture=method.mixture, store=run_dir, ctx=ctx, progress=progress,
            on_epoch=on_epoch, method=method,
        )
    # Only a non-finite loss (a ``failed`` result) says something against the run; whatever else stops
    # it leaves the records as they are, so the next ``finebench run`` resumes from the last checkpoint.
    except KeyboardInterrupt:
        raise Interrupted(f"{label} stopped; {_how_to_go_on(run_dir)}") from None
    except OSError as error:
        raise FinebenchError(f"{label}: {error}; {_how_to_go_on(run_dir)} once that is fixed", exit_code=1) from None
    finally:
        if isinstance(progress, RichProgress):
            progress.close()
        if events is not None:
            events.close()
    summary = _summary(
        loaded, run, status=result.status, failure_reason=result.failure_reason, rows=result.rows,
        epochs_completed=result.epochs_completed, train_time_s=result.train_time_s,
        images_per_s=result.images_per_s, compile_time_s=result.compile_time_s, **common,
    )
    if result.confusion is not None and summary["final"] is not None:
        from finebench.report.stats import mean_class_accuracy  # here: the report's pandas/scipy stay out of start-up

        summary["final"]["mean_class_top1"] = mean_class_accuracy(result.confusion)
        if ctx.is_main:
            run_dir.write_confusion(result.confusion, list(getattr(loaders, "classes", None) or []) or None)
    if ctx.is_main:
        run_dir.write_summary(summary)
    if result.status == "failed" and not quiet:
        console.print(f"[red]{label}: failed: {result.failure_reason}[/]", highlight=False)
    return summary


def _how_to_go_on(run_dir: RunDir) -> str:
    if run_dir.checkpoint_path.is_file():
        return f"the run is resumable from its last saved epoch ({run_dir.checkpoint_path}): rerun the same command"
    return f"no epoch of it was saved yet ({run_dir.path}): rerun the same command to start it again"


def check_results_dir(results_dir: Path, recipe_name: str) -> None:
    """A file where a results folder belongs is one line before anything runs, not an error mid-way."""
    for path in (results_dir, results_dir / recipe_name):
        if path.exists() and not path.is_dir():
            raise FinebenchError(f"--results-dir {results_dir}: {path} is a file, expected a folder")


def _decide(state: RunState, *, retry_failed: bool, restart: bool) -> str:
    """``train`` or ``skipped-<state>``; damaged records stop the command unless ``restart`` discards them."""
    if state.kind == "finished":
        return "skipped-finished"
    if state.kind == "failed" and not (retry_failed or restart):
        return "skipped-failed"
    if state.kind == "damaged" and not restart:
        raise FinebenchError(state.problem or "unreadable run records")
    return "train"


def dataset_state(name: str, data_root: Path) -> str:
    """For ``--dry-run``: prepared, not prepared, or prepared on the first run (embedded datasets)."""
    from finebench.data.registry import get_spec
    from finebench.data.store import is_prepared

    if is_prepared(data_root, name):
        return "prepared"
    return "prepared on first run" if get_spec(name).offline else "not prepared"


def run_recipe(
    loaded: LoadedRecipe,
    *,
    results_dir: Path = Path("results"),
    data_root: Path | None = None,
    only: Sequence[str] = (),
    dry_run: bool = False,
    quiet: bool = False,
    retry_failed: bool = False,
    restart: bool = False,
    ctx: DistContext | None = None,
    console: Console | None = None,
) -> list[RunOutcome]:
    """Train every run of a recipe that is not finished yet; the result has one outcome per run.

    ``restart`` discards the checkpoint and records of every selected run that is not finished
    (interrupted, failed or unreadable) and trains it from epoch 1.
    """
    from finebench.data.registry import get_spec

    ctx = ctx or DistContext()
    console = console or Console(stderr=True, quiet=quiet or not ctx.is_main, soft_wrap=True)
    runs = expand_runs(loaded, only)
    results_dir = Path(results_dir)
    chosen_root = choose_data_root(data_root, loaded.recipe.dataset.root)
    data_root = chosen_root.path
    num_classes = get_spec(loaded.recipe.dataset.name).num_classes
    costs = _CostCache(loaded, num_classes, loaded.input_size())
    check_results_dir(results_dir, loaded.name)
    run_dirs = {run.run_id: RunDir(results_dir, loaded.name, run.run_id) for run in runs}
    states = {run.run_id: run_dirs[run.run_id].state() for run in runs}

    if dry_run:
        data = dataset_state(loaded.recipe.dataset.name, data_root)
        for state in states.values():
            if state.problem:
                console.print(f"[yellow]warning:[/] {state.problem}", highlight=False)
        return [
            RunOutcome(run, run_dirs[run.run_id].path, "planned",
                       {"params": costs.of(run).params, "flops": costs.of(run).flops, "taps": costs.of(run).taps},
                       state=states[run.run_id].kind, data=data)
            for run in runs
        ]

    # Unreadable records stop the command here, before anything is trained or written.
    planned = ctx.broadcast({run.run_id: _decide(states[run.run_id], retry_failed=retry_failed, restart=restart)
                             for run in runs})
    to_train = [run for run in runs if planned[run.run_id] == "train"]
    if to_train:
        _check_data_root(chosen_root, loaded.recipe.dataset.name)
        if ctx.is_main:
            _prepare_if_embedded(loaded.recipe.dataset.name, data_root, quiet)
        ctx.barrier()
        # Fail on unprepared data or bad model options before anything is written.
        device = resolve_device(loaded.recipe.train.device)
        loaders = _build_loaders(loaded, to_train[0], data_root, ctx, device)
        for run in to_train[1:]:  # every held-out fold of a k-fold dataset must be there too
            if run.config["dataset"] != to_train[0].config["dataset"]:
                _check_splits(run.config["dataset"], data_root)
        num_classes = loaders.num_classes
        costs = _CostCache(loaded, num_classes, loaded.recipe.dataset.input_size or _input_size_of(loaders))
        for run in to_train:
            costs.of(run)
        del loaders

    outcomes = []
    for run in runs:
        run_dir = run_dirs[run.run_id]
        label = f"{run.variant_name} seed {run.seed}"
        with contextlib.ExitStack() as held:
            # Rank 0 alone locks and decides; every rank then follows the same decision. A run that
            # needs no training is skipped without its lock, which needs write access.
            decision = planned[run.run_id]
            if decision == "train" and ctx.is_main:
                try:
                    held.enter_context(run_dir.lock())
                    # Another process may have finished or failed it since the plan was made.
                    decision = _decide(run_dir.state(), retry_failed=retry_failed, restart=restart)
                except RunLocked:
                    decision = "locked"
                if decision == "train" and restart:
                    run_dir.discard()
            decision = ctx.broadcast(decision)
            if decision == "locked":
                console.print(f"{label}: locked by another process, skipped")
                outcomes.append(RunOutcome(run, run_dir.path, "locked"))
            elif decision == "skipped-failed":
                reason = run_dir.state().failure_reason or "no reason recorded"
                console.print(f"{label}: failed earlier ({reason}), skipped ({run_dir.path}); "
                              "--retry-failed resumes it, --restart trains it from epoch 1")
                outcomes.append(RunOutcome(run, run_dir.path, decision, run_dir.summary() or {}))
            elif decision != "train":
                console.print(f"{label}: finished earlier, skipped ({run_dir.path})")
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

    for batch_size in sorted({(run.train or loaded.recipe.train).batch_size for run in expand_runs(loaded)}):
        per_worker_batch(batch_size, world_size)  # a method may train at its own batch size
    name = loaded.recipe.dataset.name
    chosen_root = choose_data_root(data_root, loaded.recipe.dataset.root)
    _check_data_root(chosen_root, name)
    if not get_spec(name).offline:  # embedded datasets are prepared by rank 0
        read_meta(chosen_root.path, name)


def _check_data_root(chosen: DataRoot, name: str) -> None:
    """A data root the user named must exist: ``run`` creates only the default one, for an embedded dataset."""
    from finebench.data.registry import get_spec

    path = chosen.path
    if path.exists() and not path.is_dir():
        raise FinebenchError(f"data root {chosen.describe()} is a file, expected a folder of prepared datasets")
    if not path.exists() and (chosen.origin != "default" or not get_spec(name).offline):
        raise FinebenchError(
            f"data root {chosen.describe()} does not exist: prepare the dataset there first "
            f"(`finebench prepare {name} --data-root {path}`) or point --data-root / FINEBENCH_DATA at its folder"
        )


def _prepare_if_embedded(name: str, data_root: Path, quiet: bool) -> None:
    """Datasets shipped inside an installed package need no download, so a fresh install can
    ``finebench run recipes/quickstart.toml`` at once; anything else must be prepared explicitly."""
    from finebench.data.prepare import prepare_dataset
    from finebench.data.registry import get_spec
    from finebench.data.store import is_prepared

    if get_spec(name).offline and not is_prepared(data_root, name):
        if not quiet:
            Console(stderr=True).print(f"{name} is not prepared in {data_root}: preparing it (embedded, no download)",
                                       highlight=False, soft_wrap=True)
        prepare_dataset(name, data_root, quiet=quiet, wait=True)  # a second `run` waits for the first's prepare


def _check_splits(dataset: Mapping[str, Any], data_root: Path) -> None:
    """Fail on a split the store lacks (a fold missing) before anything is written."""
    from finebench.data.loader import split_dirs
    from finebench.data.store import read_meta, store_dir

    available = list(read_meta(data_root, dataset["name"]).get("splits", {}))
    for key in ("train_split", "test_split"):
        split_dirs(store_dir(data_root, dataset["name"]), dataset[key], available, dataset["name"])


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


def variant_settings(variant: MethodOptions) -> str:
    """A variant's options in the paper's terms: ``AD3 AW2 gates sigmoid output 50 reg_w 0.001``."""
    return method_of(variant).settings(variant)


def logged_settings(changes: Mapping[str, Mapping[str, Any]] | None) -> str:
    """What ``fidelity = "logged"`` changed for a variant (a dry run's "as logged" column):
    ``optimizer sgd, stem conv``; empty when nothing."""
    return ", ".join(f"{key} {value}" for part in ("train", "model_options", "variant") for key, value in
                     (changes or {}).get(part, {}).items())


def _taps_cell(taps: Sequence[Mapping[str, Any]]) -> str:
    return " ".join(f"{tap['tap']}:{tap['channels']}@{tap['stride']}" for tap in taps) or "-"


def recipe_settings(loaded: LoadedRecipe) -> str:
    """Everything a run shares, on one line, so a dry run can be checked against a paper or a log."""
    recipe = loaded.recipe
    train, dataset, model = recipe.train, recipe.dataset, recipe.model
    lr = f"lr {train.lr:g}"
    if train.backbone_lr_mult != 1.0:
        lr += f" (backbone x{train.backbone_lr_mult:g})"
    schedule = train.schedule
    if train.schedule == "multistep":
        schedule = f"lr x{train.gamma:g} after epochs {'/'.join(map(str, train.milestones))}"
    elif train.schedule == "step":
        schedule = f"lr x{train.gamma:g} every {train.step_size} epochs"
    optimizer = train.optimizer if train.optimizer == "adamw" else f"{train.optimizer} momentum {train.momentum:g}"
    batch = f"batch {train.batch_size}"
    if train.accumulation_steps > 1:
        batch += f" ({train.batch_size // train.accumulation_steps} x {train.accumulation_steps} accumulated)"
    folds = [fold for fold in held_out_folds(loaded) if fold is not None]
    data = f"{dataset.name} {loaded.input_size()}px"
    if folds:
        data += f", held-out folds {'/'.join(map(str, folds))} (one run each)"
    parts = [
        data, backbone_label(model.backbone, model.options)
        + (f" ({model.pretrained})" if model.pretrained else ""),
        lr, optimizer, f"wd {train.weight_decay:g}", batch, f"{train.epochs} epochs", schedule,
        f"warm-up {train.warmup_epochs:g} epochs", f"eval every {train.eval_every}", f"precision {train.precision}",
    ]
    if train.batchnorm_group:
        parts.append(f"BatchNorm over groups of {train.batchnorm_group} images")
    parts.append(f"fidelity {recipe.fidelity}" + (" (log-time settings per variant below)" if recipe.logged
                                                   and recipe.fidelity == "logged" else ""))
    return " · ".join(parts)


def variant_table(outcomes: Sequence[RunOutcome], *, title: str) -> Table:
    """One row per variant of a dry run: its settings in the paper's terms, its taps and its cost,
    so a plan can be checked against a paper or a log before anything trains."""
    table = Table(title=title)
    several = len({outcome.run.config["model"]["backbone"] for outcome in outcomes}) > 1
    logged = any(outcome.run.config.get("logged") for outcome in outcomes)
    columns = ("variant", "settings") + ("as logged",) * logged + ("taps (channels@stride)", "params", "FLOPs")
    for column in ("backbone",) * several + columns:
        right = column in ("params", "FLOPs")
        table.add_column(column, justify="right" if right else "left", no_wrap=column not in ("variant", "as logged"))
    seen: set[tuple[str, str]] = set()
    for outcome in outcomes:
        run, summary = outcome.run, outcome.summary
        key = (run.config["model"]["backbone"], run.variant_name)  # a recipe may list several backbones
        if key in seen:
            continue
        seen.add(key)
        as_logged = (logged_settings(run.config.get("logged")) or "-",) * logged
        table.add_row(*key[:several], run.variant_name, variant_settings(run.variant or variant_of_config(run.config)),
                      *as_logged,
                      _taps_cell(summary.get("taps") or []), _fmt_count(summary.get("params")),
                      _fmt_count(summary.get("flops")))
    return table


def outcome_table(outcomes: Sequence[RunOutcome], *, title: str, dry_run: bool = False) -> Table:
    """Variant beside variant: final-epoch test accuracy (no test-set selection), cost and time.

    The best epoch is shown only as ``best@epoch`` in its own column: it is selected on the test set.
    """
    table = Table(title=title)
    backbones = {outcome.run.config["model"]["backbone"] for outcome in outcomes}
    several = len(backbones) > 1  # a recipe that lists backbones: say which row is which
    with_folds = any(outcome.run.fold is not None for outcome in outcomes)
    columns = ["backbone"] * several + ["variant", *(["fold"] if with_folds else []), "seed", "run id"]
    if dry_run:
        columns += ["state", "dataset"]
    else:
        columns += ["status", "top-1", "top-5", "net top-1", "best@ep"]
    columns += ["params", "FLOPs"]
    if not dry_run:
        columns += ["time", "img/s"]
    for column in columns:
        left = column in ("backbone", "variant", "status", "run id", "state", "dataset")
        table.add_column(column, justify="left" if left else "right")

    def pct(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, (int, float)) else "-"

    for outcome in outcomes:
        summary = outcome.summary
        run = outcome.run
        cells = [run.config["model"]["backbone"]] * several + [
            run.variant_name, *([str(run.fold) if run.fold is not None else "-"] if with_folds else []),
            str(run.seed), run.run_id]
        if dry_run:
            cells += [outcome.state or "-", outcome.data or "-"]
        else:
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
