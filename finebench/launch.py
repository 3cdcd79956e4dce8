"""``finebench run``'s ways of running a recipe: in this process, ``--nproc-per-node`` workers,
``--jobs`` processes or a ``--submit`` job array, and the results table each prints.

The CLI parses the flags into a ``RunSelection`` (which runs, what to do with those not finished)
and a ``Launch`` (how to spread them) and calls ``run_recipe_command``; every way of running gets
the selection as that one object, and the processes it starts get it back as the same arguments.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finebench.console import make_console
from finebench.errors import FinebenchError
from finebench.jobs import JsonProgress, run_jobs, stop_as_on_ctrl_c
from finebench.outcomes import RunOutcome, exit_code, outcomes_on_disk
from finebench.plan import RunSelection, check_before_launch, parse_share
from finebench.recipe import LoadedRecipe, load_recipe
from finebench.runner import run_recipe
from finebench.train.distributed import distributed_context, launch_workers


@dataclass(frozen=True)
class Launch:
    """How ``finebench run`` spreads a recipe's runs: at most one of ``jobs`` > 1, ``submit`` and
    ``nproc_per_node`` > 1; the rest are their settings, and the hidden ``--share`` / ``--job-of``
    of the processes they start."""

    nproc_per_node: int = 1
    dist_timeout: float = 1800.0
    jobs: int = 1
    submit: str | None = None
    partition: str | None = None
    gpus_per_run: int = 1
    time_limit_min: int = 24 * 60
    array_parallelism: int | None = None
    array_tasks: int | None = None
    share: str | None = None
    """``I/N``: only the runs at positions I mod N (one array task)."""
    job_of: str | None = None
    """One job of ``--jobs`` started at this UTC time: progress as JSON lines, no table."""


def run_recipe_command(
    recipe: str, overrides: Sequence[str], *, results_dir: str, data_root: str | None, selection: RunSelection,
    launch: Launch, dry_run: bool = False, quiet: bool = False, debug: bool = False,
) -> int:
    """``finebench run``: the runs trained (or planned, ``dry_run``) the way ``launch`` says; the exit code."""
    if launch.job_of:
        stop_as_on_ctrl_c()
    loaded = load_recipe(recipe, list(overrides))
    share_of = parse_share(launch.share) if launch.share else None
    results, root = Path(results_dir), Path(data_root) if data_root else None
    run_argv = [
        *(["--debug"] if debug else []), "run", recipe, "--results-dir", results_dir,
        *(["--data-root", data_root] if data_root else []),
        *[arg for value in overrides for arg in ("--set", value)],
        *selection.argv(), *(["--quiet"] if quiet else []), "--dist-timeout", str(launch.dist_timeout),
    ]
    if sum([launch.jobs > 1, launch.submit is not None, launch.nproc_per_node > 1]) > 1:
        raise FinebenchError("--jobs, --submit and --nproc-per-node: give one of them (--submit takes --gpus-per-run)")
    if launch.submit is not None and not dry_run:
        return _submit_run(loaded, run_argv, cluster=launch.submit, results_dir=results, data_root=root,
                           selection=selection, partition=launch.partition, gpus_per_run=launch.gpus_per_run,
                           time_limit_min=launch.time_limit_min, array_parallelism=launch.array_parallelism,
                           array_tasks=launch.array_tasks, quiet=quiet)
    if launch.nproc_per_node > 1 and not dry_run:
        check_before_launch(loaded, root, launch.nproc_per_node)
        launch_workers(launch.nproc_per_node, [*run_argv, *(["--share", launch.share] if launch.share else [])])
        return 0
    started = time.perf_counter()
    if launch.jobs > 1 and not dry_run:
        outcomes, code = run_jobs(loaded, count=launch.jobs, child_args=run_argv, results_dir=results,
                                  data_root=root, selection=selection, quiet=quiet)
        print_run_tables(loaded, outcomes, dry_run=False, wall=time.perf_counter() - started)
        return code
    train = loaded.recipe.train
    with distributed_context(train.device, sync_batchnorm=train.sync_batchnorm, timeout_s=launch.dist_timeout) as ctx:
        outcomes = run_recipe(
            loaded, results_dir=results, data_root=root, selection=selection, dry_run=dry_run, quiet=quiet,
            ctx=ctx, share=share_of, since=launch.job_of, make_progress=JsonProgress if launch.job_of else None,
        )
    if ctx.is_main and not launch.job_of:  # a job of --jobs leaves the table to the command that started it
        print_run_tables(loaded, outcomes, dry_run=dry_run, wall=time.perf_counter() - started)
    return exit_code(outcomes)


def _submit_run(loaded: LoadedRecipe, run_argv: list[str], *, cluster: str, quiet: bool, **options: Any) -> int:
    """``run --submit``: queue the runs still to train as a job array; on this machine (``local``)
    wait for the tasks as a plain run waits for its runs, then print the same results table."""
    from finebench.cluster import submit as submit_array
    from finebench.cost import CostCache, size_warnings, warn_sizes

    started = time.perf_counter()
    status = make_console(stderr=True, quiet=quiet, soft_wrap=True)
    err_console = make_console(stderr=True)
    submission = submit_array(loaded, run_argv, cluster=cluster, **options)
    skipped = submission.skipped
    if skipped:
        failed_note = " (--retry-failed resumes them)" if skipped["failed"] else ""
        status.print(f"{loaded.name}: skipped {', '.join(f'{n} {kind}' for kind, n in sorted(skipped.items()))} "
                     f"run(s) done earlier{failed_note}", highlight=False)
    if submission.shares and not quiet:
        costs = CostCache.of_plan(loaded, submission.plan)
        warn_sizes(size_warnings(costs, [run for share in submission.shares for run in share.runs]), status)
    if cluster != "local":
        ids = ", ".join(job.job_id for job in submission.jobs.values()) or "nothing (every run is finished or failed)"
        err_console.print(f"{loaded.name}: submitted {len(submission.jobs)} array task(s): {ids}; "
                          f"rerun the same command to resume what a dead task left", highlight=False, soft_wrap=True)
        return 0
    ended = []
    if submission.shares:
        status.print(f"{loaded.name}: {len(submission.shares)} array task(s) on this machine, at most "
                     f"{submission.parallelism} at once; logs in {submission.executor.folder}", highlight=False)
        ended = submission.wait(status)
    outcomes = outcomes_on_disk(submission.plan, submission.decisions)
    failed = [end for end in ended if end.error is not None]
    left = {run.run_id for end in failed for run in end.share.runs}
    for outcome in outcomes:
        if outcome.run.run_id in left and outcome.status == "locked":
            outcome.status = "task failed"  # resumable: the same command resumes it
    print_run_tables(loaded, outcomes, dry_run=False, wall=time.perf_counter() - started)
    for end in failed:
        err_console.print(f"{loaded.name}: {end.share.describe()} failed ({end.error}); its log: {end.log}; "
                          "rerun the same command to resume its runs", highlight=False, soft_wrap=True)
    return 1 if failed else exit_code(outcomes)


def print_run_tables(loaded: LoadedRecipe, outcomes: Sequence[RunOutcome], *, dry_run: bool, wall: float) -> None:
    """The results table (or the dry run's plan) on stdout."""
    from finebench.terminal import run_tables

    stdout = make_console()
    for part in run_tables(loaded, outcomes, dry_run=dry_run, wall_s=wall):
        if isinstance(part, str):
            stdout.print(part, soft_wrap=True, highlight=False)
        else:
            stdout.print(part)
