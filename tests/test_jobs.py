"""finebench run --jobs N: runs shared through the per-run locks, each equal to its serial twin."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_data import cut_where_torch_load_says_einval, prepare_tiny_bars, tiny_recipe

from finebench import jobs as jobs_module
from finebench.jobs import JsonProgress, aggregate_exit_code, plan_jobs
from finebench.outcomes import RunOutcome
from finebench.plan import RunSelection
from finebench.recipe import expand_runs, load_recipe
from finebench.results import RunDir
from finebench.runner import run_recipe
from finebench.train_settings import MACHINE_FIELDS

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = MACHINE_FIELDS  # how the machine ran an epoch, not what the run computed


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_two_jobs_train_four_one_thread_runs_each_once_and_equal_to_its_serial_twin(tmp_path) -> None:
    data_root = prepare_tiny_bars(tmp_path / "data", 64, 20)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(seeds=(0, 1), variants=("baseline", "attention"), epochs=2,
                                  extra_train="threads = 1\nchannels_last = false"))
    serial = run_recipe(load_recipe(recipe), results_dir=tmp_path / "serial", data_root=data_root, quiet=True)
    assert len(serial) == 4 and {o.status for o in serial} == {"finished"}

    done = subprocess.run(
        [sys.executable, "-m", "finebench", "run", str(recipe), "--jobs", "2", "--results-dir", str(tmp_path / "jobs"),
         "--data-root", str(data_root)],
        env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "resuming" not in done.stderr  # no run was started twice
    assert done.stdout.count("finished") == 4
    assert {line.split(":")[0] for line in done.stderr.splitlines() if " epoch " in line} == {"job 1 (1 threads)",
                                                                                            "job 2 (1 threads)"}
    for outcome in serial:
        twin = tmp_path / "jobs" / "tiny" / outcome.run.run_id
        summary = json.loads((twin / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["threads"] == 1
        assert _metrics(twin) == _metrics(outcome.path)
        ours, theirs = _weights(twin), _weights(outcome.path)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_jobs_go_round_robin_over_the_visible_gpus(monkeypatch) -> None:
    monkeypatch.setattr(jobs_module, "resolve_device", lambda spec: torch.device("cuda"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    planned = plan_jobs(5, "auto")
    assert [job.env["CUDA_VISIBLE_DEVICES"] for job in planned] == ["2", "5", "2", "5", "2"]
    assert planned[1].where == "GPU 5"


def test_on_a_cpu_each_job_gets_its_share_of_the_cores_unless_omp_num_threads_is_set(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [job.env for job in plan_jobs(3, "cpu")] == [{"OMP_NUM_THREADS": "2"}] * 3
    assert [job.env for job in plan_jobs(16, "cpu")][0] == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert [job.env for job in plan_jobs(2, "cpu")] == [{}, {}]


def test_exit_codes_aggregate_as_a_serial_run_unless_a_job_stopped_for_another_reason() -> None:
    def outcomes(*statuses: str) -> list[RunOutcome]:
        return [RunOutcome(None, None, status) for status in statuses]  # type: ignore[arg-type]

    assert aggregate_exit_code(outcomes("finished", "skipped-finished"), [0, 3]) == 0
    assert aggregate_exit_code(outcomes("finished", "failed"), [0, 1]) == 1
    assert aggregate_exit_code(outcomes("finished", "locked"), [0, 0]) == 3
    assert aggregate_exit_code(outcomes("finished", "locked"), [0, 2]) == 2
    assert aggregate_exit_code(outcomes("finished", "locked"), [2, 130]) == 130
    assert aggregate_exit_code(outcomes("finished", "stopped"), [0, -9]) == 1  # a job killed by SIGKILL
    assert aggregate_exit_code(outcomes("finished", "stopped"), [0, 1]) == 1  # a disk error stopped a job


def test_a_job_reports_progress_as_json_lines(tmp_path) -> None:
    stream = (tmp_path / "progress").open("w+")
    progress = JsonProgress("baseline seed 0", stream)
    progress.start_epoch(1, 2, 10)
    progress.update(4, images_per_s=100.0, loss=1.5, lr=0.1)
    progress.end_epoch({"epoch": 1, "train_loss": 1.5})
    stream.seek(0)
    events = [json.loads(line) for line in stream]
    assert [event["event"] for event in events] == ["start_epoch", "update", "end_epoch"]
    assert events[0] == {"event": "start_epoch", "run": "baseline seed 0", "epoch": 1, "epochs": 2, "steps": 10}
    assert events[2]["row"] == {"epoch": 1, "train_loss": 1.5}


def test_a_run_another_job_failed_or_restarted_after_the_command_began_is_left_alone(tmp_path) -> None:
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 20)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(extra_train="threads = 1"))
    results = tmp_path / "results"
    loaded = load_recipe(recipe)
    (first,) = run_recipe(loaded, results_dir=results, data_root=data_root, quiet=True)
    summary = json.loads((first.path / "summary.json").read_text())
    summary["status"], summary["failure_reason"] = "failed", "loss became nan"
    (first.path / "summary.json").write_text(json.dumps(summary))
    # the failure happened after this command began: another job of it failed the run, which is not retried
    (again,) = run_recipe(loaded, results_dir=results, data_root=data_root, quiet=True,
                          selection=RunSelection(retry_failed=True), since=summary["started_at"])
    assert again.status == "skipped-failed"
    (retried,) = run_recipe(loaded, results_dir=results, data_root=data_root, quiet=True,
                            selection=RunSelection(retry_failed=True), since="9999-01-01T00:00:00Z")
    assert retried.status == "finished"


def test_jobs_with_another_way_of_spreading_work_is_one_line(tmp_path) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe())
    done = subprocess.run([sys.executable, "-m", "finebench", "run", str(recipe), "--jobs", "2", "--nproc-per-node", "2",
                           "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --jobs, --submit and --nproc-per-node: give one of them "
                                   "(--submit takes --gpus-per-run)")
    assert not (tmp_path / "results").exists()


# ---- issue 27: a stop signal to the command alone, a job killed with SIGKILL, a checkpoint cut short ----

LONG = 10_000
"""Epochs no run of these tests reaches: the jobs are still training when the test acts."""


def _start(recipe: Path, results: Path, data_root: Path, *extra: str) -> subprocess.Popen:
    """``finebench run RECIPE --jobs 2`` in a session of its own (so the test can end whatever it left),
    with the default Ctrl-C a terminal gives (pytest in the background starts with SIGINT ignored)."""
    return subprocess.Popen(
        [sys.executable, "-m", "finebench", "run", str(recipe), "--jobs", "2", "--results-dir", str(results),
         "--data-root", str(data_root), *extra],
        env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )


def _jobs_of(command: subprocess.Popen) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{command.pid}/task/{command.pid}/children").read_text().split()]


def _wait_for_checkpoints(command: subprocess.Popen, run_dirs: list[RunDir], timeout: float = 120) -> None:
    """Until every run has saved its first epoch (the jobs are training, and each run is resumable):
    its summary counts it, written after the checkpoint."""
    deadline = time.monotonic() + timeout
    while not all(run_dir.summary_if_readable().get("epochs_completed", 0) >= 1 for run_dir in run_dirs):
        assert command.poll() is None, command.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def _end(command: subprocess.Popen, jobs: list[int]) -> None:
    """Whatever the command left running (when a test fails): it, its group (where its jobs were
    before issue 27) and each of its jobs still alive."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(command.pid, signal.SIGKILL)
    for pid in jobs:
        with contextlib.suppress(OSError):  # a job that ended: its pid may be another process's by now
            if b"--job-of" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    if command.returncode is None:
        command.communicate()


@pytest.fixture
def two_long_runs(tmp_path) -> tuple[Path, Path, list[RunDir]]:
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 10)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(seeds=(0, 1), epochs=LONG, extra_train="threads = 1"))
    return recipe, data_root, [RunDir(tmp_path / "results", "tiny", run.run_id)
                               for run in expand_runs(load_recipe(recipe), ())]


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 130), pytest.param(signal.SIGTERM, 143,
                                                                              marks=pytest.mark.slow)])
def test_a_stop_signal_to_the_command_alone_stops_its_jobs_and_says_which_runs_resume(
        tmp_path, two_long_runs, stop, code) -> None:
    """Issue 27 item 1: ``kill -INT <command>`` left the jobs training every run to the end, then
    said they had stopped. Now the command stops each job and says where each run stands."""
    recipe, data_root, run_dirs = two_long_runs
    command = _start(recipe, tmp_path / "results", data_root)
    jobs: list[int] = []
    try:
        _wait_for_checkpoints(command, run_dirs)
        jobs = _jobs_of(command)
        assert len(jobs) == 2
        command.send_signal(stop)
        _, err = command.communicate(timeout=120)
    finally:
        _end(command, jobs)
    assert command.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == (f"interrupted: the jobs stopped on {signal.Signals(stop).name}; of the 2 run(s) to train: 2 "
                    "resumable from their last saved epoch (baseline seed 0, baseline seed 1); rerun the same command "
                    "to go on")
    for run_dir in run_dirs:
        assert run_dir.state().kind == "resumable" and run_dir.status() == "running"
        assert 1 <= run_dir.summary()["epochs_completed"] < LONG
        assert f"resumable from its last saved epoch ({run_dir.checkpoint_path})" in err  # the job's own line
        with run_dir.lock():  # no job holds it any more
            pass
    for pid in jobs:
        assert not Path(f"/proc/{pid}").exists()


def test_a_job_killed_by_sigkill_is_named_with_its_run_which_resumes(tmp_path) -> None:
    """Issue 27 item 3: a job killed with ``kill -9`` made the command exit 247 without a word, its
    run shown as locked by another process."""
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 10)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(epochs=LONG, extra_train="threads = 1"))
    (run,) = expand_runs(load_recipe(recipe), ())
    run_dir = RunDir(tmp_path / "results", "tiny", run.run_id)
    command = _start(recipe, tmp_path / "results", data_root)
    jobs: list[int] = []
    try:
        _wait_for_checkpoints(command, [run_dir])
        jobs = _jobs_of(command)
        assert len(jobs) == 1  # one run: one job
        os.kill(jobs[0], signal.SIGKILL)
        out, err = command.communicate(timeout=120)
    finally:
        _end(command, jobs)
    assert command.returncode == 1, err
    assert (f"error: job 1 (run {run.run_id}, baseline seed 0) was killed by SIGKILL; the run is resumable from "
            f"its last saved epoch ({run_dir.checkpoint_path}): rerun the same command") in err.splitlines()
    row = next(line for line in out.splitlines() if run.run_id in line)
    assert "stopped" in row and "locked" not in out
    assert run_dir.state().kind == "resumable"
    with run_dir.lock():  # the kernel let go of the dead job's lock
        pass


def test_a_checkpoint_cut_short_under_jobs_names_the_file_and_restart_trains_it_anew(tmp_path) -> None:
    """Issue 27 item 4: under ``--jobs 2`` a ``last.pt`` cut short showed the run as locked (exit 3)
    after "[Errno 22] Invalid argument; ... rerun once that is fixed", which never helps."""
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 10)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(extra_train="threads = 1"))
    (first,) = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    run_dir = RunDir.at(first.path)
    run_dir.write_summary({**run_dir.summary(), "status": "running"})  # killed after its checkpoint
    cut_where_torch_load_says_einval(run_dir.checkpoint_path)
    args = [sys.executable, "-m", "finebench", "run", str(recipe), "--jobs", "2", "--results-dir",
            str(tmp_path / "results"), "--data-root", str(data_root)]
    done = subprocess.run(args, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        (f"job 1: error: {run_dir.checkpoint_path}: unreadable checkpoint, cut short or corrupt: rerun with "
         "--restart to discard this run's records and train it from epoch 1")]
    row = next(line for line in done.stdout.splitlines() if first.run.run_id in line)
    assert "stopped" in row and "locked" not in done.stdout
    assert run_dir.state().kind == "resumable"
    # the way out the line names (here in this process: a --jobs command runs the same for each job)
    (again,) = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root, quiet=True,
                          selection=RunSelection(restart=True))
    assert again.status == "finished" and run_dir.load_checkpoint()["epoch"] == 1


def test_a_job_that_does_not_stop_in_time_is_killed(monkeypatch) -> None:
    """The SIGTERM a job gets on Ctrl-C is given ``STOP_GRACE_S``; one that ignores it (stuck in a
    device call) is killed rather than keeping the command waiting for ever."""
    monkeypatch.setattr(jobs_module, "STOP_GRACE_S", 0.2)
    ignores_sigterm = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                       "print('ready', flush=True); time.sleep(60)")
    stuck = subprocess.Popen([sys.executable, "-c", ignores_sigterm], stdout=subprocess.PIPE, text=True)
    try:
        assert stuck.stdout.readline() == "ready\n"
        stop = jobs_module.JobsStop()
        stop.processes.append(stuck)
        stop(signal.SIGINT, None)  # as the command's handler is called
        stop.kill_stragglers()
        assert stuck.poll() is None and not stop.killed  # within the grace: SIGTERM only, ignored
        time.sleep(0.3)
        stop.kill_stragglers()
        assert stuck.wait(timeout=10) == -signal.SIGKILL and stop.killed == {stuck.pid}
    finally:
        stuck.kill()
        stuck.communicate()
