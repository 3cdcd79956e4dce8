"""``finebench run RECIPE --jobs N``: N processes train the recipe's runs at once on this machine.

One WRN-28-10 run on 32 px images leaves most of a large GPU idle, and on a CPU one-thread runs
scale better side by side than one run with every thread. Each job is a plain ``finebench run`` of
the same recipe: the jobs share the work through the per-run locks (a job skips a run another job
holds and goes on to the next), so every run trains exactly once and computes what it computes
alone. On CUDA the jobs go round-robin over the visible GPUs (``CUDA_VISIBLE_DEVICES`` per job,
several jobs per GPU allowed); on a CPU each job gets its share of the cores as threads
(``OMP_NUM_THREADS``, which ``train.threads = "auto"`` follows; a number in the recipe still wins).

The jobs report their progress as JSON lines on stdout (``JsonProgress``); this process shows all of
them in one rich view and, once they have exited, reads the outcome of every run from its records.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from finebench.console import make_console
from finebench.errors import Interrupted
from finebench.plan import (
    RunSelection,
    check_before_launch,
    decide_runs,
    plan_runs,
    prepare_if_embedded,
)
from finebench.recipe import LoadedRecipe
from finebench.results import utc_now
from finebench.runner import (
    EXIT_FAILED,
    EXIT_LOCKED,
    RunOutcome,
    exit_code,
    outcomes_on_disk,
)
from finebench.train.engine import epoch_line, resolve_device

QUIET_LINES = ("locked by another process, skipped", "finished earlier, skipped")
"""A job's lines that say only that another job has (or had) the run: expected under ``--jobs``, not shown."""


class JsonProgress:
    """A job's side of the view: each progress event as one JSON line on ``stream`` (stdout)."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label, self.stream = label, stream or sys.stdout

    def _send(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, "run": self.label, **fields}) + "\n")
        self.stream.flush()

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self._send("start_epoch", epoch=epoch, epochs=epochs, steps=steps)

    def update(self, steps_done: int, *, images_per_s: float, loss: float, lr: float) -> None:
        self._send("update", steps_done=steps_done, images_per_s=images_per_s, loss=loss, lr=lr)

    def end_epoch(self, row: Mapping[str, Any]) -> None:
        self._send("end_epoch", row=dict(row))

    def message(self, text: str) -> None:
        self._send("message", text=text)


@dataclass(frozen=True)
class Job:
    index: int
    env: dict[str, str]
    """Added to this process's environment."""
    where: str
    """Shown in the view: ``GPU 1``, ``2 threads``."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs)."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        return [name.strip() for name in listed.split(",") if name.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def plan_jobs(count: int, device_spec: str) -> list[Job]:
    """Where each of ``count`` jobs runs: round-robin over the visible GPUs, or an equal share of the cores."""
    device = resolve_device(device_spec)
    if device.type == "cuda" and device.index is None:
        gpus = visible_gpus()
        return [Job(i, {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}, f"GPU {gpus[i % len(gpus)]}") for i in range(count)]
    if device.type == "cpu":
        if os.environ.get("OMP_NUM_THREADS", "").strip():  # the user's (or a scheduler's) choice stands
            return [Job(i, {}, f"{os.environ['OMP_NUM_THREADS']} threads") for i in range(count)]
        threads = max(1, len(os.sched_getaffinity(0)) // count)
        return [Job(i, {"OMP_NUM_THREADS": str(threads)}, f"{threads} threads") for i in range(count)]
    return [Job(i, {}, str(device)) for i in range(count)]  # one named device (cuda:1, mps): all jobs on it


def _pump(job: int, stream: TextIO, kind: str, events: queue.Queue) -> None:
    for line in stream:
        events.put((job, kind, line.rstrip("\n")))
    events.put((job, kind, None))


def run_jobs(
    loaded: LoadedRecipe,
    *,
    count: int,
    child_args: Sequence[str],
    results_dir: Path,
    data_root: Path | None,
    selection: RunSelection = RunSelection(),
    quiet: bool = False,
    console: Console | None = None,
) -> tuple[list[RunOutcome], int]:
    """Train the recipe with ``count`` jobs; returns one outcome per run and the command's exit code.

    ``child_args``: the ``finebench`` arguments each job runs (``run RECIPE ...``, without ``--jobs``).
    The exit code is the serial command's (``runner.exit_code`` of the outcomes) unless a job stopped
    for another reason (bad input, Ctrl-C), whose code it then is.
    """
    console = console or make_console(stderr=True, quiet=quiet, soft_wrap=True)
    plan = plan_runs(loaded, results_dir=results_dir, data_root=data_root, only=selection.only)
    # unreadable records stop here, as they stop a serial run, before any job starts
    planned = decide_runs(plan, selection)
    to_train = [run for run in plan.runs if planned[run.run_id] == "train"]
    if to_train:
        check_before_launch(loaded, data_root, 1)
        prepare_if_embedded(loaded.recipe.dataset.name, plan.data_root, quiet)
    jobs = plan_jobs(min(count, max(1, len(to_train))), loaded.recipe.train.device) if to_train else []
    since = utc_now()
    processes = []
    events: queue.Queue = queue.Queue()
    for job in jobs:
        process = subprocess.Popen(
            [sys.executable, "-m", "finebench", *child_args, "--job-of", since],
            env={**os.environ, **job.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        processes.append(process)
        for kind, stream in (("out", process.stdout), ("err", process.stderr)):
            threading.Thread(target=_pump, args=(job.index, stream, kind, events), daemon=True).start()
    try:
        _view(jobs, events, plan, to_train, console)
    except KeyboardInterrupt:  # the jobs got the same Ctrl-C: let them checkpoint and leave
        for process in processes:
            process.wait()
        raise Interrupted("the jobs stopped; every run is resumable from its last saved epoch: rerun the same "
                          "command") from None
    codes = [process.wait() for process in processes]
    outcomes = outcomes_on_disk(plan, planned)
    return outcomes, aggregate_exit_code(outcomes, codes)


def aggregate_exit_code(outcomes: Sequence[RunOutcome], codes: Sequence[int]) -> int:
    """The serial exit code of the outcomes; a job's own code when it stopped for a reason they do not show."""
    other = [code for code in codes if code not in (0, EXIT_FAILED, EXIT_LOCKED)]
    if other:
        return 130 if 130 in other else other[0]
    return exit_code(outcomes)


def _view(jobs: Sequence[Job], events: queue.Queue, plan: Any, to_train: Sequence[Any], console: Console) -> None:
    """One live view: a bar per job (its run, epoch and steps) and one for the runs done, until every job exits."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), console=console, transient=True,
    )
    total = progress.add_task("runs done", total=len(to_train), stats="")
    tasks = {job.index: progress.add_task(f"job {job.index + 1} ({job.where}) starting", total=None, stats="")
             for job in jobs}
    where = {job.index: job.where for job in jobs}
    open_streams, next_count = 2 * len(jobs), 0.0
    with progress:
        while open_streams:
            try:
                job, kind, line = events.get(timeout=0.5)
            except queue.Empty:
                line = ""
                job = kind = None
            if job is not None and line is None:
                open_streams -= 1
            elif kind == "out":
                _show_event(progress, tasks[job], f"job {job + 1} ({where[job]})", line)
            elif kind == "err" and line and not any(quiet in line for quiet in QUIET_LINES):
                progress.console.print(f"job {job + 1}: {line}", highlight=False, soft_wrap=True, markup=False)
            if time.monotonic() >= next_count:  # the runs' records, read twice a second at most
                next_count = time.monotonic() + 0.5
                done = sum(plan.run_dirs[run.run_id].state().kind in ("finished", "failed") for run in to_train)
                progress.update(total, completed=done)


def _show_event(progress: Progress, task: Any, name: str, line: str) -> None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return
    if event.get("event") == "start_epoch":
        progress.reset(task, total=event["steps"], completed=0,
                       description=f"{name} {event['run']} epoch {event['epoch']}/{event['epochs']}", stats="")
    elif event.get("event") == "update":
        progress.update(task, completed=event["steps_done"],
                        stats=f"{event['images_per_s']:,.0f} img/s  loss {event['loss']:.4f}  lr {event['lr']:.3g}")
    elif event.get("event") == "end_epoch":
        progress.console.print(f"{name}: {epoch_line(event['run'], event['row'])}", highlight=False, soft_wrap=True)
    elif event.get("event") == "message":
        progress.console.print(f"{name}: {event['run']}: {event['text']}", highlight=False, soft_wrap=True)
