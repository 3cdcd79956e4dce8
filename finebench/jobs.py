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

The jobs run in process groups of their own, so Ctrl-C reaches this process alone; it stops the jobs
itself (SIGINT, SIGTERM or a hangup here is SIGTERM to each job, which a job takes as Ctrl-C), once
each. A job that dies (SIGKILL, the OOM killer) is named with its run, which its lock's record of
the holder's process id tells; the kernel has released that lock, so the run resumes on the next command.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from finebench.outcomes import (
    EXIT_FAILED,
    EXIT_LOCKED,
    RunOutcome,
    exit_code,
    outcomes_on_disk,
)
from finebench.plan import (
    RunSelection,
    check_before_launch,
    decide_runs,
    plan_runs,
    prepare_if_embedded,
)
from finebench.recipe import LoadedRecipe, RunSpec
from finebench.results import RunDir, utc_now
from finebench.runner import how_to_go_on, run_label
from finebench.train.distributed import how_ended
from finebench.train.progress import epoch_line
from finebench.train.runtime import resolve_device

QUIET_LINES = ("locked by another process, skipped", "finished earlier, skipped")
"""A job's lines that say only that another job has (or had) the run: expected under ``--jobs``, not shown."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals to the command that stop its jobs; it then exits 128 + the signal's number (130 for Ctrl-C)."""


def stop_as_on_ctrl_c() -> None:
    """A job's side of stopping: the SIGTERM its command sends stops it as Ctrl-C does (its run resumable
    from the last saved epoch, exit 130). SIGTERM, not SIGINT: a command started with SIGINT ignored
    (in the background of a script) starts its jobs with SIGINT ignored too."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


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


STOP_GRACE_S = 60.0
"""How long a job may take to stop after its SIGTERM before it is killed: one step or evaluation
batch, on a loaded machine. One stuck in a device call (a hung GPU) is then killed; its run's
records are atomic, so it resumes from its last saved epoch all the same."""


class JobsStop:
    """The first stop signal the command got; each job started is sent SIGTERM once after it, and
    SIGKILL ``STOP_GRACE_S`` later if it is still running."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.processes: list[subprocess.Popen] = []
        self.killed: set[int] = set()
        """Process ids of the jobs killed for not stopping in time."""
        self._sent: set[int] = set()
        self._at = 0.0

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is None:  # a second Ctrl-C changes nothing: the jobs are already stopping
            self.signum, self._at = signum, time.monotonic()
            self.forward()

    def kill_stragglers(self) -> None:
        if self.signum is None or time.monotonic() < self._at + STOP_GRACE_S:
            return
        for process in self.processes:
            if process.poll() is None and process.pid not in self.killed:
                self.killed.add(process.pid)
                process.kill()

    def forward(self) -> None:
        if self.signum is None:
            return
        for process in self.processes:
            if process.pid not in self._sent:
                self._sent.add(process.pid)
                process.send_signal(signal.SIGTERM)


@contextlib.contextmanager
def _stopping_on_signals(stop: JobsStop) -> Iterator[None]:
    """``stop`` handles the stop signals for the duration (a signal the command was started with
    ignored stays ignored, as a shell's background job expects)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    caught = [signum for signum, handler in previous.items() if handler is not signal.SIG_IGN]
    for signum in caught:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum in caught:
            signal.signal(signum, previous[signum] if previous[signum] is not None else signal.SIG_DFL)


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
    for another reason (bad input: its code; killed by a signal: 1). A stop signal to this command
    stops the jobs and raises ``Interrupted`` saying what is finished and what resumes, unless every
    run was finished by then. ``--quiet`` hides the progress, not the jobs' errors.
    """
    console = console or make_console(stderr=True, soft_wrap=True)
    plan = plan_runs(loaded, results_dir=results_dir, data_root=data_root, only=selection.only)
    # unreadable records stop here, as they stop a serial run, before any job starts
    planned = decide_runs(plan, selection)
    to_train = [run for run in plan.runs if planned[run.run_id] == "train"]
    if to_train:
        check_before_launch(loaded, data_root, 1)
        prepare_if_embedded(loaded.recipe.dataset.name, plan.data_root, quiet)
    jobs = plan_jobs(min(count, max(1, len(to_train))), loaded.recipe.train.device) if to_train else []
    since = utc_now()
    events: queue.Queue = queue.Queue()
    stop = JobsStop()
    held: dict[int, RunSpec] = {}
    """Job index -> the run it held last (its lock records the job's process id), read as the job exits."""

    def on_exit(index: int) -> None:  # at once, before another job may take the run and its lock
        pid = stop.processes[index].pid
        for run in to_train:
            if plan.run_dirs[run.run_id].lock_holder() == pid:
                held[index] = run

    with _stopping_on_signals(stop):
        for job in jobs:
            if stop.signum is not None:
                break
            process = subprocess.Popen(
                [sys.executable, "-m", "finebench", *child_args, "--job-of", since],
                env={**os.environ, **job.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                process_group=0,  # Ctrl-C reaches this process alone, which stops each job once
            )
            stop.processes.append(process)
            stop.forward()
            for kind, stream in (("out", process.stdout), ("err", process.stderr)):
                threading.Thread(target=_pump, args=(job.index, stream, kind, events), daemon=True).start()
        started = jobs[:len(stop.processes)]
        _view(started, events, plan, to_train, console, quiet=quiet, on_exit=on_exit, tick=stop.kill_stragglers)
        codes = [process.wait() for process in stop.processes]
    for job, process in zip(started, stop.processes):
        if process.pid in stop.killed:
            run = held.get(job.index)
            console.print(f"job {job.index + 1} did not stop within {STOP_GRACE_S:.0f} s of its SIGTERM and was killed"
                          + (f"; {run_label(run)}: {how_to_go_on(plan.run_dirs[run.run_id])}" if run else ""),
                          highlight=False, soft_wrap=True, markup=False)
    if stop.signum is not None:  # a job stopped by the SIGTERM sent to it (or killed after it) did as it was told
        codes = [0 if code in (130, -signal.SIGTERM) or process.pid in stop.killed else code
                 for code, process in zip(codes, stop.processes)]
    for job, code in zip(started, codes):
        if code < 0:
            console.print(f"error: {_dead_job_line(job, code, held.get(job.index), plan.run_dirs)}",
                          highlight=False, soft_wrap=True, markup=False)
    stopped = {held[job.index].run_id for job, code in zip(started, codes) if code and job.index in held}
    outcomes = outcomes_on_disk(plan, planned, stopped=stopped)
    if stop.signum is not None and any(o.status not in ("finished", "failed") for o in outcomes
                                       if planned[o.run.run_id] == "train"):
        raise Interrupted(_stopped_line(stop.signum, to_train, plan.run_dirs), exit_code=128 + stop.signum)
    return outcomes, aggregate_exit_code(outcomes, codes)


def _dead_job_line(job: Job, code: int, run: RunSpec | None, run_dirs: Mapping[str, RunDir]) -> str:
    """A job killed by a signal (SIGKILL, the OOM killer), the run it was training and how that run goes on."""
    if run is None:
        return f"job {job.index + 1} {how_ended(code)} before it took a run"
    run_dir = run_dirs[run.run_id]
    line = f"job {job.index + 1} (run {run.run_id}, {run_label(run)}) {how_ended(code)}; "
    kind = run_dir.state().kind
    return line + (f"another job then trained it to the end ({kind})" if kind in ("finished", "failed")
                   else how_to_go_on(run_dir))


def _stopped_line(signum: int, to_train: Sequence[RunSpec], run_dirs: Mapping[str, RunDir]) -> str:
    """What a stop left: how many of the runs to train ended, which resume from their checkpoint, how many start anew."""
    ended: dict[str, int] = {}
    resumable, fresh = [], 0
    for run in to_train:
        run_dir = run_dirs[run.run_id]
        kind = run_dir.state().kind
        if kind in ("finished", "failed"):
            ended[kind] = ended.get(kind, 0) + 1
        elif run_dir.checkpoint_path.is_file():
            resumable.append(run_label(run))
        else:
            fresh += 1
    parts = [f"{number} {kind}" for kind, number in ended.items()]
    if resumable:
        parts.append(f"{len(resumable)} resumable from their last saved epoch ({', '.join(resumable)})")
    if fresh:
        parts.append(f"{fresh} to start from epoch 1")
    return (f"the jobs stopped on {signal.Signals(signum).name}; of the {len(to_train)} run(s) to train: "
            f"{', '.join(parts)}; rerun the same command to go on")


def aggregate_exit_code(outcomes: Sequence[RunOutcome], codes: Sequence[int]) -> int:
    """The serial exit code of the outcomes; a job's own code when it stopped for a reason they do not
    show; 1 when a job was killed by a signal (its run is left resumable, not finished)."""
    other = [code for code in codes if code not in (0, EXIT_FAILED, EXIT_LOCKED)]
    if 130 in other:
        return 130
    exited = [code for code in other if code > 0]
    if exited:
        return exited[0]
    if other:
        return EXIT_FAILED
    return exit_code(outcomes)


def _view(jobs: Sequence[Job], events: queue.Queue, plan: Any, to_train: Sequence[Any], console: Console, *,
          quiet: bool, on_exit: Callable[[int], None], tick: Callable[[], None]) -> None:
    """One live view: a bar per job (its run, epoch and steps) and one for the runs done, until every job
    exits (``on_exit(job)`` as each does; ``tick()`` twice a second at least). ``quiet`` hides the bars
    and epochs, never a job's error."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), console=console, transient=True, disable=quiet,
    )
    total = progress.add_task("runs done", total=len(to_train), stats="")
    tasks = {job.index: progress.add_task(f"job {job.index + 1} ({job.where}) starting", total=None, stats="")
             for job in jobs}
    where = {job.index: job.where for job in jobs}
    streams = {job.index: 2 for job in jobs}  # a job's stdout and stderr still open
    next_count = 0.0
    with progress:
        while any(streams.values()):
            try:
                job, kind, line = events.get(timeout=0.5)
            except queue.Empty:
                line = ""
                job = kind = None
            if job is not None and line is None:
                streams[job] -= 1
                if not streams[job]:
                    on_exit(job)
            elif kind == "out" and not quiet:
                _show_event(progress, tasks[job], f"job {job + 1} ({where[job]})", line)
            elif kind == "err" and line and not any(expected in line for expected in QUIET_LINES):
                progress.console.print(f"job {job + 1}: {line}", highlight=False, soft_wrap=True, markup=False)
            tick()
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
