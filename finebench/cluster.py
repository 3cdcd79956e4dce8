"""``finebench run RECIPE --submit slurm``: the recipe's runs as a Slurm job array, through submitit.

Array task i of N runs ``finebench run RECIPE --share i/N``, which trains the runs whose position in
the recipe's expansion is i mod N: the tasks take disjoint runs by their index, because ``flock`` is
not coherent on every cluster filesystem (Lustre mounted without its ``flock`` option keeps it
node-local or refuses it). The per-run lock stays the second line of defence; where it cannot be
taken at all the task stops with one line naming the file. A task that dies (node failure, time
limit) leaves its run resumable from the last saved epoch, and the same command submitted again
resumes it; a task that reaches its time limit is requeued by submitit and resumes by itself.
torchrun DDP (``--nproc-per-node``) stays the way to spread one big run over several GPUs.

``--submit local`` runs the same path on this machine (submitit's local executor) and waits for it,
as a plain run does: a line per epoch and per task as they end, then the results table.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from finebench.errors import FinebenchError, Interrupted
from finebench.plan import (
    Plan,
    RunSelection,
    check_before_launch,
    decide_runs,
    plan_runs,
)
from finebench.recipe import LoadedRecipe, RunSpec
from finebench.terminal import duration
from finebench.train.progress import epoch_line

CLUSTERS = ("slurm", "local")


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise FinebenchError("--submit needs submitit: pip install 'finebench[slurm]'") from None
    return submitit


@dataclass
class ArrayTask:
    """One array task: ``finebench ARGV`` in a fresh process, so a task runs exactly what a user's command runs.

    submitit calls ``checkpoint`` when Slurm preempts the task or its time limit nears: the task is
    requeued with the same arguments and resumes its runs from their last saved epochs.
    """

    argv: list[str]

    def __call__(self) -> int:
        code = subprocess.run([sys.executable, "-m", "finebench", *self.argv], check=False).returncode
        if code:
            raise RuntimeError(f"finebench {' '.join(self.argv)} exited with status {code}")
        return code

    def checkpoint(self) -> Any:
        return _submitit().helpers.DelayedSubmission(ArrayTask(self.argv))


@dataclass(frozen=True)
class Share:
    """Array task ``index`` of ``count`` (from 0, as ``--share`` numbers it): ``finebench run ... --share
    index/count``, and the runs it trains."""

    index: int
    count: int
    runs: tuple[RunSpec, ...]
    """Its runs still to train (it skips the finished ones at its positions itself)."""

    def describe(self) -> str:
        return f"task {self.index}/{self.count}"


@dataclass
class TaskEnd:
    """How a local array task ended."""

    share: Share
    seconds: float
    error: str | None
    """None when it exited with status 0; else what went wrong, in a few words."""
    log: Path


@dataclass
class Submission:
    """A recipe's job array: what was queued, what was left out as already done, and (on this
    machine) the tasks still waiting for a slot."""

    loaded: LoadedRecipe
    plan: Plan
    decisions: dict[str, str]
    """Each run's ``plan.decide`` (train, skipped-finished, skipped-failed) when it was submitted."""
    shares: list[Share]
    """The tasks with a run to train, in order; a task whose runs are all done is not submitted."""
    jobs: dict[int, Any] = field(default_factory=dict)
    """submitit's job of each task submitted so far, by task index."""
    executor: Any = None
    tasks: dict[int, ArrayTask] = field(default_factory=dict)
    parallelism: int = 0

    @property
    def skipped(self) -> Counter[str]:
        """Runs left out because they are done: ``{"finished": n, "failed": m}``."""
        return Counter(decision.removeprefix("skipped-") for decision in self.decisions.values()
                       if decision != "train")

    def wait(self, console: Console, *, poll_s: float = 1.0) -> list[TaskEnd]:
        """Run the local tasks to their end, at most ``parallelism`` at once, and show their progress.

        submitit's ``LocalExecutor`` has no array parallelism: it starts every task the moment it is
        submitted (``slurm_array_parallelism`` is Slurm's own), so N tasks would share this
        machine's cores at once. The tasks are this process's children, so it keeps a window
        instead: a task is submitted only when a running one has ended. Meanwhile each epoch a run
        logs (its metrics.jsonl) is a line, each task's end is a line, and a status line (a terminal
        only) says what runs and waits, about once a second."""
        waiting = [share for share in self.shares if share.index not in self.jobs]
        running = {index: time.monotonic() for index in self.jobs}
        seen = {run.run_id: len(self.plan.run_dirs[run.run_id].read_metrics_lenient()[0])
                for share in self.shares for run in share.runs}
        by_index = {share.index: share for share in self.shares}
        ended: list[TaskEnd] = []
        try:
            with Live(console=console, transient=True, auto_refresh=False) as live:
                self._window(waiting, running, by_index, seen, ended, live, poll_s)
        except KeyboardInterrupt:  # the tasks, in this terminal's process group, got the same Ctrl-C
            for index in running:
                while not self.jobs[index].done():
                    time.sleep(poll_s)
            raise Interrupted(f"{len(running)} running task(s) stopped and {len(waiting)} waiting were not "
                              "started; every run is resumable from its last saved epoch: rerun the same "
                              "command") from None
        return ended

    def _window(self, waiting: list[Share], running: dict[int, float], by_index: dict[int, Share],
                seen: dict[str, int], ended: list[TaskEnd], live: Live, poll_s: float) -> None:
        """``wait``'s loop: ``running`` (start times by task index) never holds more than ``parallelism``."""
        started = time.monotonic()
        while running or waiting:
            for index in list(running):
                self._show_epochs(by_index[index], seen, live.console)
                job = self.jobs[index]
                if not job.done():
                    continue
                end = TaskEnd(by_index[index], time.monotonic() - running.pop(index), _task_error(job),
                              Path(job.paths.stderr))
                ended.append(end)
                self._show_end(end, live.console)
            while waiting and len(running) < self.parallelism:
                share = waiting.pop(0)
                self.jobs[share.index] = self.executor.submit(self.tasks[share.index])
                running[share.index] = time.monotonic()
            live.update(Text(f"{self.loaded.name}: {len(ended)} task(s) ended, {len(running)} running "
                             f"({', '.join(by_index[i].describe() for i in running)}), {len(waiting)} waiting; "
                             f"{duration(time.monotonic() - started)}"), refresh=True)
            if running or waiting:
                time.sleep(poll_s)

    def _show_epochs(self, share: Share, seen: dict[str, int], console: Console) -> None:
        for run in share.runs:
            rows = self.plan.run_dirs[run.run_id].read_metrics_lenient()[0]
            for row in rows[seen[run.run_id]:]:
                console.print(f"{share.describe()}: {epoch_line(_label(run), row)}", highlight=False, soft_wrap=True)
            seen[run.run_id] = max(seen[run.run_id], len(rows))

    def _show_end(self, end: TaskEnd, console: Console) -> None:
        if end.error is not None:
            console.print(f"{end.share.describe()}: failed after {duration(end.seconds)} ({end.error}); "
                          f"its log: {end.log}", highlight=False, soft_wrap=True)
            return
        states = []
        for run in end.share.runs:
            run_dir = self.plan.run_dirs[run.run_id]
            final = (run_dir.summary_if_readable().get("final") or {})
            top1 = f" top-1 {final['test_top1']:.2f}" if isinstance(final.get("test_top1"), (int, float)) else ""
            states.append(f"{_label(run)} {run.run_id} {run_dir.state().kind}{top1}")
        console.print(f"{end.share.describe()}: ended after {duration(end.seconds)}: {'; '.join(states)}",
                      highlight=False, soft_wrap=True)


def _label(run: RunSpec) -> str:
    return f"{run.variant_name} seed {run.seed}"


def _task_error(job: Any) -> str | None:
    """None when the task exited with status 0, else why not in a few words: submitit's error is
    the task's whole traceback and log paths, whose last exception line is ``ArrayTask``'s own."""
    try:
        error = job.exception()
    except Exception as problem:  # noqa: BLE001  (submitit: the task left no result at all)
        error = problem
    if error is None:
        return None
    text = str(error)
    status = re.search(r"exited with status (-?\d+)", text)
    if status:
        return f"finebench exited with status {status.group(1)}"
    raised = re.findall(r"^(\w+(?:Error|Exception|Interrupt|Exit)\b.*)$", text, flags=re.MULTILINE)
    return raised[-1].strip() if raised else type(error).__name__


def submit(
    loaded: LoadedRecipe,
    run_argv: Sequence[str],
    *,
    cluster: str,
    results_dir: Path,
    data_root: Path | None,
    selection: RunSelection = RunSelection(),
    partition: str | None = None,
    gpus_per_run: int = 1,
    time_limit_min: int = 24 * 60,
    array_parallelism: int | None = None,
    array_tasks: int | None = None,
) -> Submission:
    """Submit the runs still to train as one job array.

    ``run_argv``: the ``finebench run RECIPE ...`` arguments every task runs (``--share i/N`` is added).
    Task i of N takes the runs at positions i mod N of the recipe's expansion; a task whose runs are
    all finished (or failed, without ``--retry-failed``) is not submitted. Everything a serial run
    rejects (recipe, unreadable records, unprepared data) is rejected here, before anything is
    queued. On Slurm every task is queued at once (``slurm_array_parallelism`` bounds what runs);
    on this machine the first ``array_parallelism`` start and ``Submission.wait`` starts the rest.
    """
    if cluster not in CLUSTERS:
        raise FinebenchError(f"--submit {cluster}: expected one of {', '.join(CLUSTERS)}")
    missing = [command for command in ("srun", "sbatch") if shutil.which(command) is None] if cluster == "slurm" else []
    if missing:  # submitit would say it with a traceback, after the plan
        raise FinebenchError(f"--submit slurm: Slurm not found (no {' or '.join(missing)} on PATH); on this machine "
                             "use --submit local (the same job array), or run without --submit (--jobs N trains "
                             "several runs at once)")
    submitit = _submitit()
    plan = plan_runs(loaded, results_dir=results_dir, data_root=data_root, only=selection.only)
    decisions = decide_runs(plan, selection)
    count = min(array_tasks or len(plan.runs), len(plan.runs))
    by_task: dict[int, list[RunSpec]] = {}
    for position, run in enumerate(plan.runs):
        if decisions[run.run_id] == "train":
            by_task.setdefault(position % count, []).append(run)
    shares = [Share(index, count, tuple(runs)) for index, runs in sorted(by_task.items())]
    submission = Submission(loaded, plan, decisions, shares)
    if not shares:
        return submission
    check_before_launch(loaded, data_root, gpus_per_run)
    folder = Path(results_dir) / ".submitit" / loaded.name
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    parameters: dict[str, Any] = {"name": f"finebench-{loaded.name}", "timeout_min": time_limit_min,
                                  "gpus_per_node": gpus_per_run, "tasks_per_node": 1, "nodes": 1}
    if cluster == "slurm":
        parameters["slurm_array_parallelism"] = array_parallelism or len(shares)
        if partition:
            parameters["slurm_partition"] = partition
    executor.update_parameters(**parameters)
    ddp = ["--nproc-per-node", str(gpus_per_run)] if gpus_per_run > 1 else []
    submission.executor, submission.parallelism = executor, array_parallelism or len(shares)
    submission.tasks = {share.index: ArrayTask([*run_argv, "--share", f"{share.index}/{count}", *ddp])
                        for share in shares}
    if cluster == "slurm":
        with executor.batch():
            jobs = [executor.submit(submission.tasks[share.index]) for share in shares]
        submission.jobs = {share.index: job for share, job in zip(shares, jobs, strict=True)}
    else:
        for share in shares[: submission.parallelism]:
            submission.jobs[share.index] = executor.submit(submission.tasks[share.index])
    return submission
