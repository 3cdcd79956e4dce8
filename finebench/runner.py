"""``finebench run``: train each planned run under its lock, skipping finished and resuming interrupted ones.

``finebench.plan`` finds the runs and checks everything a user can get wrong before the first file
is written. Each run then trains under its own lock, so two processes on one results folder share
the work instead of corrupting it; runs that are already finished (or failed) are skipped without a
lock, so a read-only results folder can be rerun.

Training marks a run failed (a non-finite loss), and so does an unexpected error (a bug), which
would stop every resume the same way. What a user can fix (Ctrl-C, a full disk, an unreadable
checkpoint, too little memory) leaves it as it was, resumable, with one line that names the file
and says how to go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from finebench.console import make_console
from finebench.cost import Cost, CostCache, size_warnings, warn_sizes
from finebench.data.store import meta_digest
from finebench.errors import FinebenchError, Interrupted
from finebench.factory import build_model, build_run_loaders
from finebench.methods import method_of, variant_of_config
from finebench.models.provenance import weights_provenance
from finebench.outcomes import RunOutcome
from finebench.plan import (
    RunSelection,
    check_validation_splits,
    dataset_state,
    decide,
    decide_runs,
    missing_weights,
    plan_runs,
    preflight,
)
from finebench.predictions import read_digest, write_predictions
from finebench.recipe import LoadedRecipe, RunSpec
from finebench.results import RunDir, RunLocked, utc_now
from finebench.summary import (
    SCHEMA_VERSION,
    SELECTED_NOTE,
    best_entry,
    environment,
    final_entry,
    method_training_entry,
)
from finebench.terminal import backbone_label
from finebench.train.fit import fit
from finebench.train.progress import Progress, RichProgress, SilentProgress
from finebench.train.rng import seed_everything
from finebench.train.runtime import DistContext, Runtime, describe_device, resolve_runtime
from finebench.train.events import TensorBoardLog
from finebench.train.threads import apply_threads


def _summary(
    loaded: LoadedRecipe,
    run: RunSpec,
    *,
    status: str,
    num_classes: int,
    cost: Cost,
    baseline: Cost,
    input_size: int,
    runtime: Runtime,
    ctx: DistContext,
    started_at: str,
    rows: Sequence[Mapping[str, Any]] = (),
    failure_reason: str | None = None,
    epochs_completed: int = 0,
    train_time_s: float = 0.0,
    images_per_s: float = 0.0,
    data_path: str = "workers",
    dataset_digest: str | None = None,
    compile_time_s: float = 0.0,
    validation: Mapping[str, Any] | None = None,
    selected: Mapping[str, Any] | None = None,
    pretrained: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    recipe = loaded.recipe
    # ``validation`` and ``selected`` only where the run has them: other summaries stay as they were
    chosen = {} if validation is None else {"validation": dict(validation), "select": run.train_section().select}
    if selected is not None:
        chosen["selected"] = {**selected, "note": SELECTED_NOTE}
    return {
        "schema": SCHEMA_VERSION,
        "run_id": run.run_id,
        "recipe": loaded.name,
        "status": status,
        "failure_reason": failure_reason,
        "dataset": recipe.dataset.name,
        "num_classes": num_classes,
        "backbone": run.backbone,
        "backbone_label": backbone_label(run.backbone, recipe.model.options),
        "variant": run.variant_kind,
        "variant_name": run.variant_name,
        "variant_options": run.config["variant"]["options"],
        "pretrained": None if pretrained is None else dict(pretrained),  # models.provenance: a record, not a setting
        "taps": cost.taps,
        "size_warnings": cost.size_warnings,
        "seed": run.seed,
        "fold": run.fold,
        "epochs": run.train_section().epochs,
        "epochs_completed": epochs_completed,
        "final": final_entry(list(rows)),
        "method_training": method_training_entry(list(rows)),
        "best": best_entry(list(rows)),
        **chosen,
        "params": cost.params,
        "flops": cost.flops,
        "params_baseline": baseline.params,
        "flops_baseline": baseline.flops,
        "module_flops": cost.module_flops,
        "flops_passes": method_of(run.variant or variant_of_config(run.config)).flops_passes(),
        "input_size": input_size,
        "train_time_s": train_time_s,
        "images_per_s": images_per_s,
        "device": describe_device(runtime.device),
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "compile": runtime.compiled,
        "compile_time_s": compile_time_s,
        "data_path": data_path,
        "world_size": ctx.world_size,
        "dataset_digest": dataset_digest,
        "threads": runtime.threads.threads if runtime.threads else None,
        "threads_rule": runtime.threads.rule if runtime.threads else None,
        **speed_conditions(rows),
        **environment(),
        "started_at": started_at,
        "finished_at": utc_now() if status != "running" else None,
    }


def run_label(run: RunSpec) -> str:
    """How messages and progress bars name a run: by what a user chose (variant and seed), not its id."""
    return f"{run.variant_name} seed {run.seed}"


def speed_conditions(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the run's img/s was measured under, from its epochs' rows: the thread counts they used
    and their mean 1-minute load (None for records written before epochs recorded them)."""
    loads = [row["load_1min"] for row in rows if isinstance(row.get("load_1min"), (int, float))]
    return {"threads_used": sorted({int(row["threads"]) for row in rows if isinstance(row.get("threads"), int)}),
            "load_1min": round(sum(loads) / len(loads), 2) if loads else None}


def _execute(
    loaded: LoadedRecipe,
    run: RunSpec,
    run_dir: RunDir,
    *,
    data_root: Path,
    costs: CostCache,
    num_classes: int,
    ctx: DistContext,
    quiet: bool,
    console: Console,
    make_progress: Callable[[str], Progress] | None = None,
) -> dict[str, Any]:
    """Train one run inside its lock and return its final summary."""
    train = run.train_section()
    method = method_of(run.variant or variant_of_config(run.config))  # bound to the run's options
    attention = method.mixture
    previous = run_dir.summary_if_readable()  # a damaged summary is rebuilt from the other records
    resumed_threads = previous.get("threads") if run_dir.checkpoint_path.is_file() else None
    workers_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = apply_threads(train.threads, previous=resumed_threads if isinstance(resumed_threads, int) else None,
                            workers_here=workers_here)
    runtime = resolve_runtime(train, attention=attention, threads=threads, workers_here=workers_here)
    seed_everything(run.seed)
    model = build_model(loaded, run, num_classes)
    loaders = build_run_loaders(loaded, run, data_root, ctx, runtime.device)
    validation = _validation_record(run_dir, loaders) if loaders.validation_choice is not None else None
    common = dict(
        num_classes=num_classes, cost=costs.of(run, model), baseline=costs.baseline(run),
        input_size=costs.input_size, runtime=runtime, ctx=ctx,
        started_at=previous.get("started_at") or _first_written(run_dir) or utc_now(), data_path=loaders.path,
        dataset_digest=meta_digest(data_root, loaded.recipe.dataset.name), validation=validation,
        pretrained=weights_provenance(run.backbone, run.config["model"].get("pretrained")),
    )
    # A resume writes nothing until its first epoch is done: a resume that fails (an unreadable
    # last.pt) must leave every record as it was, epochs done included.
    resuming = run_dir.checkpoint_path.is_file()
    if ctx.is_main and validation is not None and run_dir.read_validation() is None:
        run_dir.write_validation(loaders.validation_choice.record(loaders.train_size + loaders.validation_size))
    if ctx.is_main and not resuming:
        # the resolved absolute root, so `attend` or `eval` run from elsewhere find the same store
        run_dir.write_config({**run.config, "dataset": {**run.config["dataset"], "root": str(data_root)}})
        run_dir.write_summary(_summary(loaded, run, status="running", rows=run_dir.read_metrics(), **common))
    label = run_label(run)
    progress: Progress = SilentProgress()
    if not quiet and ctx.is_main:
        progress = make_progress(label) if make_progress is not None else RichProgress(label, console)
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
            method=method, store=run_dir, ctx=ctx, progress=progress,
            on_epoch=on_epoch, runtime=runtime, validation_loader=loaders.validation,
        )
    # What a user can fix leaves the records as they are, so the next ``finebench run`` resumes from
    # the last checkpoint; only a non-finite loss (a ``failed`` result) or a bug marks the run failed.
    except KeyboardInterrupt:
        raise Interrupted(f"{label} stopped; {how_to_go_on(run_dir)}") from None
    except FinebenchError:
        raise  # says itself what went wrong and how to go on
    except OSError as error:
        raise FinebenchError(f"{label}: {error}; {how_to_go_on(run_dir)} once that is fixed", exit_code=1) from None
    except torch.distributed.DistError:
        raise  # a lost peer or a collective timeout: the launcher names it, and the run stays resumable
    except Exception as error:  # torch.OutOfMemoryError (CUDA) is a RuntimeError
        if is_out_of_memory(error):
            raise FinebenchError(f"{label}: {out_of_memory_advice(train, ctx.world_size)}; {how_to_go_on(run_dir)}",
                                 exit_code=1) from None
        # Anything else is a bug, or a setting validation let through: every resume would stop the
        # same way. The run is recorded failed with the error as its reason (--retry-failed resumes
        # it from its last checkpoint, --restart starts it again); the traceback stays, it is a bug to
        # report. Not on several workers: there a worker whose peer died sees the backend's plain
        # RuntimeError (gloo's "Connection reset by peer"), which is no bug, and the run must stay
        # resumable; its state then comes from its lock (resumable, not running).
        if ctx.world_size > 1:
            raise
        _record_failure(loaded, run, run_dir, error, common)
        error.add_note(f"{label} is recorded failed ({run_dir.path}); --retry-failed resumes it, "
                       "--restart trains it from epoch 1")
        raise
    finally:
        close = getattr(progress, "close", None)
        if close is not None:
            close()
        if events is not None:
            events.close()
    summary = _summary(
        loaded, run, status=result.status, failure_reason=result.failure_reason, rows=result.rows,
        epochs_completed=result.epochs_completed, train_time_s=result.train_time_s,
        images_per_s=result.images_per_s, compile_time_s=result.compile_time_s, selected=result.selected, **common,
    )
    # A resume of a run whose every epoch was done (its summary rebuilt) evaluates nothing: the
    # matrix of its last evaluation is on disk.
    confusion = result.confusion
    if confusion is None:
        try:
            confusion = run_dir.read_confusion()
        except FinebenchError:
            confusion = None  # the figure is left out; the run's other records stand
    if confusion is not None and summary["final"] is not None and result.status == "finished":
        from finebench.report.stats import (
            mean_class_accuracy,  # here: the report's pandas/scipy stay out of start-up
        )

        summary["final"]["mean_class_top1"] = mean_class_accuracy(confusion)
        if result.selected_confusion is not None and "selected" in summary:
            summary["selected"]["mean_class_top1"] = mean_class_accuracy(result.selected_confusion)
    if result.confusion is not None and ctx.is_main:
        run_dir.write_confusion(result.confusion, list(getattr(loaders, "classes", None) or []) or None)
    if result.predictions is not None and ctx.is_main:
        write_predictions(run_dir.predictions_path(),
                          replace(result.predictions, split=run.config["dataset"].get("test_split")))
    # as confusion.json above: a resume that evaluated nothing keeps the file of the last evaluation
    digest = result.predictions.digest if result.predictions is not None else read_digest(run_dir.predictions_path())
    if digest is not None:
        summary.update(predictions_file=run_dir.PREDICTIONS_FILE, test_set_digest=digest)
    if ctx.is_main:
        run_dir.write_summary(summary)
    if result.status == "failed" and not quiet:
        console.print(f"[red]{escape(f'{label}: failed: {result.failure_reason}')}[/]", highlight=False)
    return summary


def _validation_record(run_dir: RunDir, loaders: Any) -> dict[str, Any]:
    """What summary.json says of the run's validation split (validation.json holds its ids); a resume
    whose split differs from the one recorded (another numpy, another store) stops here."""
    choice = loaders.validation_choice
    record = choice.record(loaders.train_size + loaders.validation_size)
    recorded = run_dir.read_validation()
    if recorded is not None and recorded.get("digest") != record.get("digest"):
        raise FinebenchError(
            f"{run_dir.validation_path}: the run held out other validation images (digest "
            f"{str(recorded.get('digest'))[:12]}) than this resume would ({str(record.get('digest'))[:12]}): "
            f"rerun with --restart to train it again on one split", exit_code=1)
    summary = {key: value for key, value in record.items() if key not in ("ids", "ids_are")}
    return {**summary, "images": loaders.validation_size, "file": RunDir.VALIDATION_FILE}


def _record_failure(loaded: LoadedRecipe, run: RunSpec, run_dir: RunDir, error: Exception,
                    common: Mapping[str, Any]) -> None:
    """Write the summary of a run an unexpected error stopped: failed, the error as its reason, its epochs done."""
    try:
        rows = run_dir.read_metrics()
        run_dir.write_summary(_summary(loaded, run, status="failed", failure_reason=f"{type(error).__name__}: {error}",
                                       rows=rows, epochs_completed=int(rows[-1]["epoch"]) if rows else 0, **common))
    except (FinebenchError, OSError):
        pass  # the error that stopped the run is the one to see; the records stay as they were


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation the device could not serve: CUDA's ``OutOfMemoryError``, or the CPU allocator's
    ``RuntimeError`` (torch has no type of its own for it, only this message), or Python's own."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error)
    return "can't allocate memory" in message or "out of memory" in message.lower()


def out_of_memory_advice(train: Any, world_size: int) -> str:
    """One line: the batch that did not fit and the settings that make it fit."""
    per_step = train.batch_size // max(world_size, 1) // train.accumulation_steps
    doubled = train.accumulation_steps * 2
    return (f"out of memory with train.batch_size {train.batch_size} ({per_step} images per forward pass"
            + (f" on each of {world_size} workers" if world_size > 1 else "") + "); "
            f"--set train.accumulation_steps={doubled} keeps the batch and halves what a pass holds, or lower "
            f"train.batch_size (train.eval_batch_size {train.eval_batch_size} if it ran out while evaluating)")


def _first_written(run_dir: RunDir) -> str | None:
    """When the run began, for a summary rebuilt without its own record of it: config.json is written first."""
    try:
        return utc_now(run_dir.config_path.stat().st_mtime)
    except OSError:
        return None


def _touched_since(run_dir: RunDir, since: str) -> bool:
    """Whether another process of the same command started, restarted or failed this run (times in ``utc_now`` form)."""
    summary = run_dir.summary() or {}
    return max(summary.get("started_at") or "", summary.get("finished_at") or "") >= since


def how_to_go_on(run_dir: RunDir) -> str:
    """The end of a message about a stopped run: what of it is saved and the command that goes on."""
    if run_dir.checkpoint_path.is_file():
        return f"the run is resumable from its last saved epoch ({run_dir.checkpoint_path}): rerun the same command"
    return f"no epoch of it was saved yet ({run_dir.path}): rerun the same command to start it again"


def run_recipe(
    loaded: LoadedRecipe,
    *,
    results_dir: Path = Path("results"),
    data_root: Path | None = None,
    selection: RunSelection = RunSelection(),
    dry_run: bool = False,
    quiet: bool = False,
    ctx: DistContext | None = None,
    console: Console | None = None,
    share: tuple[int, int] | None = None,
    since: str | None = None,
    make_progress: Callable[[str], Progress] | None = None,
) -> list[RunOutcome]:
    """Train every run of a recipe that is not finished yet; the result has one outcome per run.

    ``selection``: the runs taken (``only``) and what is done with those not finished;
    ``selection.restart`` discards the checkpoint and records of every selected run that is not
    finished (interrupted, failed or unreadable) and trains it from epoch 1.

    Several processes on one recipe (``--jobs``, a Slurm array): ``share = (i, n)`` keeps the runs
    whose position is i mod n; ``since`` is when the command that started the processes began, and
    a run another of them started, restarted or failed after it is left alone (``--retry-failed``
    and ``--restart`` act once per run, not once per process). ``make_progress(label)`` replaces
    the terminal's progress bar (the ``--jobs`` view reads the jobs' progress as JSON lines).
    """
    ctx = ctx or DistContext()
    console = console or make_console(stderr=True, quiet=quiet or not ctx.is_main, soft_wrap=True)
    plan = plan_runs(loaded, results_dir=Path(results_dir), data_root=data_root, only=selection.only, share=share)
    runs, run_dirs, states, data_root = plan.runs, plan.run_dirs, plan.states, plan.data_root

    if dry_run:
        check_validation_splits(runs, data_root, loaded.path)
        data = dataset_state(loaded.recipe.dataset.name, data_root)
        for state in states.values():
            if state.problem:
                console.print(f"[yellow]warning:[/] {state.problem}", highlight=False)
        for problem in missing_weights(runs):
            console.print(f"[yellow]warning:[/] {problem}: the run would stop here", highlight=False)
        costs = CostCache.of_plan(loaded, plan)
        warn_sizes(size_warnings(costs, runs), console)
        return [
            RunOutcome(run, run_dirs[run.run_id].path, "planned",
                       {"params": cost.params, "flops": cost.flops, "taps": cost.taps},
                       state=states[run.run_id].kind, data=data)
            for run, cost in ((run, costs.of(run, module_flops=False)) for run in runs)
        ]

    # Unreadable records stop the command here, before anything is trained or written.
    planned = ctx.broadcast(decide_runs(plan, selection))
    to_train = [run for run in runs if planned[run.run_id] == "train"]
    if to_train:
        preflight(loaded, plan, to_train, ctx, quiet)
    costs = CostCache.of_plan(loaded, plan)
    for run in to_train:  # bad model options stop here, before anything is written
        costs.of(run)
    if to_train and ctx.is_main and not quiet:
        warn_sizes(size_warnings(costs, to_train))

    outcomes = []
    for run in runs:
        run_dir = run_dirs[run.run_id]
        label = run_label(run)
        with contextlib.ExitStack() as held:
            # Rank 0 alone locks and decides; every rank then follows the same decision. A run that
            # needs no training is skipped without its lock, which needs write access.
            decision = planned[run.run_id]
            if decision == "train" and ctx.is_main:
                try:
                    held.enter_context(run_dir.lock())
                    # Another process may have finished or failed it since the plan was made.
                    decision = decide(run_dir.state(), retry_failed=selection.retry_failed,
                                      restart=selection.restart)
                    if decision == "train" and since is not None and _touched_since(run_dir, since):
                        decision = "skipped-failed" if run_dir.state().kind == "failed" else "locked"
                except RunLocked:
                    decision = "locked"
                if decision == "train" and selection.restart:
                    run_dir.discard()
            decision = ctx.broadcast(decision)
            if decision == "locked":
                console.print(f"{label}: locked by another process, skipped")
                outcomes.append(RunOutcome(run, run_dir.path, "locked"))
            elif decision == "skipped-failed":
                reason = run_dir.state().failure_reason or "no reason recorded"
                console.print(f"{label}: failed earlier ({reason}), skipped ({run_dir.path}); "
                              "--retry-failed resumes it, --restart trains it from epoch 1", markup=False)
                outcomes.append(RunOutcome(run, run_dir.path, decision, run_dir.summary() or {}))
            elif decision != "train":
                console.print(f"{label}: finished earlier, skipped ({run_dir.path})")
                outcomes.append(RunOutcome(run, run_dir.path, decision, run_dir.summary() or {}))
            else:
                summary = _execute(
                    loaded, run, run_dir, data_root=data_root, costs=costs, num_classes=plan.num_classes,
                    ctx=ctx, quiet=quiet, console=console, make_progress=make_progress,
                )
                outcomes.append(RunOutcome(run, run_dir.path, summary["status"], summary))
    return outcomes
