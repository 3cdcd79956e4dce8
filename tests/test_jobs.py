"""finebench run --jobs N: runs shared through the per-run locks, each equal to its serial twin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_data import prepare_tiny_bars, tiny_recipe

from finebench import jobs as jobs_module
from finebench.jobs import JsonProgress, aggregate_exit_code, plan_jobs
from finebench.recipe import load_recipe
from finebench.runner import RunOutcome, run_recipe
from finebench.train.engine import MACHINE_FIELDS

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
    (again,) = run_recipe(loaded, results_dir=results, data_root=data_root, quiet=True, retry_failed=True,
                          since=summary["started_at"])
    assert again.status == "skipped-failed"
    (retried,) = run_recipe(loaded, results_dir=results, data_root=data_root, quiet=True, retry_failed=True,
                            since="9999-01-01T00:00:00Z")
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
