"""``finebench run RECIPE --submit slurm``: the recipe's runs as a Slurm job array, through submitit.

Array task i of N runs ``finebench run RECIPE --share i/N``, which trains the runs whose position in
the recipe's expansion is i mod N: the tasks take disjoint runs by their index, because ``flock`` is
not coherent on every cluster filesystem (Lustre mounted without its ``flock`` option keeps it
node-local or refuses it). The per-run lock stays the second line of defence; where it cannot be
taken at all the task stops with one line naming the file. A task that dies (node failure, time
limit) leaves its run resumable from the last saved epoch, and the same command submitted again
resumes it; a task that reaches its time limit is requeued by submitit and resumes by itself.
torchrun DDP (``--nproc-per-node``) stays the way to spread one big run over several GPUs.

``--submit local`` runs the same path on this machine (submitit's local executor).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finebench.errors import FinebenchError
from finebench.plan import RunSelection, check_before_launch, decide_runs, plan_runs
from finebench.recipe import LoadedRecipe

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
) -> list[Any]:
    """Submit the runs still to train as one job array; returns submitit's jobs (one per task).

    ``run_argv``: the ``finebench run RECIPE ...`` arguments every task runs (``--share i/N`` is added).
    Everything a serial run rejects (recipe, unreadable records, unprepared data) is rejected here,
    before anything is queued.
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
    planned = decide_runs(plan, selection)
    if "train" not in planned.values():
        return []
    check_before_launch(loaded, data_root, gpus_per_run)
    count = min(array_tasks or len(plan.runs), len(plan.runs))
    folder = Path(results_dir) / ".submitit" / loaded.name
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    parameters: dict[str, Any] = {"name": f"finebench-{loaded.name}", "timeout_min": time_limit_min,
                                  "gpus_per_node": gpus_per_run, "tasks_per_node": 1, "nodes": 1}
    if cluster == "slurm":
        parameters["slurm_array_parallelism"] = array_parallelism or count
        if partition:
            parameters["slurm_partition"] = partition
    executor.update_parameters(**parameters)
    ddp = ["--nproc-per-node", str(gpus_per_run)] if gpus_per_run > 1 else []
    tasks = [ArrayTask([*run_argv, "--share", f"{index}/{count}", *ddp]) for index in range(count)]
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    return jobs
