"""finebench run --submit: a job array whose task i takes the runs at positions i mod N (submitit's local
executor runs the same path as Slurm); a dead task's run resumes on resubmission; a refused lock is one line."""

from __future__ import annotations

import errno
import fcntl
import json
import re
from pathlib import Path

import pytest
from in_process import finebench_in_process
from tiny_data import prepare_tiny_bars, tiny_recipe

from finebench.errors import FinebenchError
from finebench.plan import parse_share
from finebench.recipe import expand_runs, load_recipe
from finebench.runner import run_recipe

submitit = pytest.importorskip("submitit")

from finebench.cluster import submit  # noqa: E402  (needs submitit)
from finebench.train_settings import MACHINE_FIELDS

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = MACHINE_FIELDS  # how the machine ran an epoch, not what the run computed


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


class DieAtEpoch:
    """A progress view that stops the process as the given epoch starts, as a killed task would."""

    def __init__(self, label: str, epoch: int = 2) -> None:
        self.epoch = epoch

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt

    def update(self, *args, **kwargs) -> None:
        pass

    def end_epoch(self, row) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def test_array_tasks_take_disjoint_runs_and_a_resubmission_resumes_a_dead_tasks_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 20)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(seeds=(0, 1, 2), epochs=2, extra_train="threads = 1"))
    loaded = load_recipe(recipe)
    runs = expand_runs(loaded, ())
    results = tmp_path / "results"
    # a task died during run 1's second epoch: its first epoch is saved, the run is resumable
    with pytest.raises(FinebenchError, match="resumable"):
        run_recipe(loaded, results_dir=results, data_root=data_root, share=(1, 3), make_progress=DieAtEpoch)
    assert (results / "tiny" / runs[1].run_id / "last.pt").is_file()

    argv = ["run", str(recipe), "--results-dir", str(results), "--data-root", str(data_root)]
    submission = submit(loaded, argv, cluster="local", results_dir=results, data_root=data_root, array_tasks=2,
                        time_limit_min=10)
    jobs = list(submission.jobs.values())
    assert len(jobs) == 2
    assert [job.result() for job in jobs] == [0, 0]
    logs = [job.stdout() + job.stderr() for job in jobs]
    # task 0 of 2 took positions 0 and 2, task 1 position 1 (and resumed it)
    assert runs[0].run_id in logs[0] and runs[2].run_id in logs[0] and runs[1].run_id not in logs[0]
    assert runs[1].run_id in logs[1] and runs[0].run_id not in logs[1]
    assert "resuming from epoch 1" in logs[1]
    serial = run_recipe(loaded, results_dir=tmp_path / "serial", data_root=data_root, quiet=True)
    for outcome in serial:
        run_dir = results / "tiny" / outcome.run.run_id
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
        assert _metrics(run_dir) == _metrics(outcome.path)
    # everything finished: a resubmission queues nothing
    again = submit(loaded, argv, cluster="local", results_dir=results, data_root=data_root)
    assert again.shares == [] and again.jobs == {} and again.skipped == {"finished": 3}


def test_a_filesystem_that_refuses_the_lock_is_one_line(tmp_path, monkeypatch) -> None:
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 20)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(extra_train="threads = 1"))

    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(FinebenchError, match=r"\.lock: the run's lock cannot be taken on this filesystem") as error:
        run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    assert "\n" not in str(error.value) and error.value.exit_code == 1


def test_share_is_task_i_of_n() -> None:
    assert parse_share("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1"):
        with pytest.raises(FinebenchError, match="--share"):
            parse_share(bad)


def test_an_unknown_cluster_is_one_line(tmp_path) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe())
    with pytest.raises(FinebenchError, match="--submit pbs: expected one of slurm, local"):
        submit(load_recipe(recipe), [], cluster="pbs", results_dir=tmp_path, data_root=None)


def _finebench(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return finebench_in_process(monkeypatch, capsys, *args, columns=300)


@pytest.mark.slow
def test_submit_local_skips_finished_runs_keeps_to_the_parallelism_shows_progress_and_the_results_table(
        tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 20)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(seeds=(0, 1, 2), epochs=2, extra_train="threads = 1"))
    loaded = load_recipe(recipe)
    runs = expand_runs(loaded, ())
    results = tmp_path / "results"
    run_recipe(load_recipe(recipe, ["seeds=[0]"]), results_dir=results, data_root=data_root, quiet=True)
    code, out, err = _finebench(monkeypatch, capsys, "run", str(recipe), "--results-dir", str(results),
                                "--data-root", str(data_root), "--submit", "local", "--array-parallelism", "1",
                                "--time-limit", "10")
    assert code == 0, err
    assert "tiny: skipped 1 finished run(s) done earlier" in err
    assert "tiny: 2 array task(s) on this machine, at most 1 at once" in err  # run 0's task is not started
    for index, run in ((1, runs[1]), (2, runs[2])):  # a line per epoch, and one as each task ends
        assert f"task {index}/3: baseline seed {run.seed} epoch 2: train loss" in err
        assert re.search(rf"task {index}/3: ended after \S+: baseline seed {run.seed} {run.run_id} finished top-1", err)
    # the in-process run's table: every run, the earlier one as skipped
    assert re.search(rf"{runs[0].run_id} +│ skipped-finished", out) and out.count("│ finished ") == 2, out
    summaries = [json.loads((results / "tiny" / run.run_id / "summary.json").read_text()) for run in runs[1:]]
    first, second = sorted(summaries, key=lambda summary: summary["started_at"])
    assert first["finished_at"] <= second["started_at"]  # one task at a time: they never overlapped


@pytest.mark.slow
def test_submit_local_exits_non_zero_naming_a_failed_task(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 20)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(lr=1e30, extra_train="threads = 1"))  # the loss becomes non-finite: run fails
    (run,) = expand_runs(load_recipe(recipe), ())
    code, out, err = _finebench(monkeypatch, capsys, "run", str(recipe), "--results-dir", str(tmp_path / "results"),
                                "--data-root", str(data_root), "--submit", "local", "--time-limit", "10")
    assert code == 1
    assert re.search(r"task 0/1: failed after \S+ \(finebench exited with status 1\); its log: \S+_log\.err", err), err
    assert re.search(r"tiny: task 0/1 failed \(finebench exited with status 1\); its log: \S+\.submitit\S+_log\.err; "
                     "rerun the same command", " ".join(err.split())), err
    assert re.search(rf"{run.run_id} +│ failed", out), out
