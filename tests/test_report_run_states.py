"""Issue 27, defects 6 and 9: what the report says of runs it cannot put in its tables.

6: a run stopped by Ctrl-C, a full disk or ``kill -9`` was "running" in the report and "resumable" in
``run --dry-run``; both now take the word from ``RunDir.state`` (running only while a live process
holds the run's lock). A folder without run records was an empty table and exit 0.
9: a finished run with a damaged config.json became a configuration of its own ("=None" settings).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_reliability_round2 import _finished_tiny_run
from test_report import ATTENTION_OPTIONS, write_run

from finebench import report
from finebench.results import RunDir
from finebench.runner import run_recipe


def finebench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finebench", *args], capture_output=True, text=True, cwd=cwd,
                          check=False, timeout=300)


def _words(loaded, run_dir, tmp_path: Path, *, cli: bool = False) -> tuple[str, ...]:
    """The run's state as the dry run and the report's records say it (and the report command, with ``cli``)."""
    [planned] = run_recipe(loaded, results_dir=tmp_path / "results", data_root=tmp_path / "data", dry_run=True,
                           quiet=True)
    [row] = report.load_runs([tmp_path / "results"]).running.itertuples(index=False)
    if not cli:
        return planned.state, row.state
    done = finebench("report", "results", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-1500:]
    [line] = [line for line in done.stderr.splitlines() if run_dir.path.name in line]
    return planned.state, row.state, line.split(": ", 1)[1].split(" ")[0].rstrip(",")


def test_the_report_says_of_an_unfinished_run_what_its_state_says(tmp_path: Path) -> None:
    """Records only (the end-to-end version with a trained run, the dry run and kill -9 is below)."""
    folder = write_run(tmp_path, variant="baseline", variant_name="baseline", seed=0, top1=90.0, status="running")
    (folder / "last.pt").write_bytes(b"")  # the checkpoint a killed run leaves
    holder = RunDir.at(folder)

    def words() -> tuple[str, str]:
        [row] = report.load_runs([tmp_path]).running.itertuples(index=False)
        return row.state, RunDir.at(folder).state().kind

    assert words() == ("resumable", "resumable")
    with holder.lock():  # another open file: to the kernel, another holder
        assert words() == ("running", "running")
    assert words() == ("resumable", "resumable")


@pytest.mark.slow
def test_a_killed_run_is_resumable_in_report_and_dry_run_and_running_only_while_its_lock_is_held(
        tmp_path: Path) -> None:
    loaded, _, run_dir = _finished_tiny_run(tmp_path, epochs=1)
    # What a kill after the epoch's checkpoint and summary leaves: status still "running", last.pt on disk.
    summary = json.loads(run_dir.summary_path.read_text())
    run_dir.summary_path.write_text(json.dumps({**summary, "status": "running"}))
    assert _words(loaded, run_dir, tmp_path, cli=True) == ("resumable", "resumable", "resumable")

    # A live process holds the lock, as a training run does (plain flock: the same lock the runner takes).
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                                "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"),
         str(run_dir.path / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _words(loaded, run_dir, tmp_path, cli=True) == ("running", "running", "running")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    # kill -9: the kernel drops the lock, the summary still says "running"
    assert json.loads(run_dir.summary_path.read_text())["status"] == "running"
    assert _words(loaded, run_dir, tmp_path) == ("resumable", "resumable")


def test_reading_a_runs_state_does_not_make_a_starting_run_think_it_is_locked(tmp_path: Path) -> None:
    """The state test takes the lock shared for an instant: a run taking it then must not be turned away."""
    run_dir = RunDir(tmp_path / "results", "tiny", "abc")
    with run_dir.lock():
        pass  # .lock exists, as after any run
    reader = RunDir(tmp_path / "results", "tiny", "abc")
    with open(run_dir.path / ".lock", "rb") as probe:  # a reader caught mid-test, released 50 ms later
        fcntl.flock(probe.fileno(), fcntl.LOCK_SH)
        threading.Timer(0.05, probe.close).start()
        with run_dir.lock():
            assert reader.state().kind == "running" and run_dir.state().kind == "new"


@pytest.mark.parametrize("case", ["empty folder", "a file"])
def test_a_path_without_run_records_is_a_one_line_error_naming_it(tmp_path: Path, case: str) -> None:
    target = tmp_path / "elsewhere"
    if case == "empty folder":
        (target / "sub").mkdir(parents=True)
    else:
        target.write_text("not a run record\n")
    done = finebench("report", str(target), cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert str(target) in done.stderr and "expected a results folder" in done.stderr
    assert "(no" not in done.stdout


def test_a_folder_of_unfinished_runs_only_lists_them_and_says_none_finished(tmp_path: Path) -> None:
    write_run(tmp_path / "results", variant="baseline", variant_name="baseline", seed=0, top1=None,
              status="running")
    done = finebench("report", "results", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(no finished runs)"
    assert "1 unfinished run(s)" in done.stderr and "seed 0: new (stopped before its first checkpoint" in done.stderr


DAMAGES = {
    "truncated": lambda text: text[:40],
    "not an object": lambda text: "[1, 2]",
    "missing keys": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "train"}),
    "missing": None,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_config_leaves_its_run_out_with_a_warning_and_the_gain_from_intact_pairs(
        tmp_path: Path, damage: str) -> None:
    root = tmp_path / "results"
    baseline, attention = [96.0, 96.2, 96.1], [96.5, 96.7, 96.3]
    for seed, top1 in enumerate(baseline):
        write_run(root, variant="baseline", variant_name="baseline", seed=seed, top1=top1)
    damaged = [write_run(root, variant="attention", variant_name="attention-ad3-aw4", seed=seed, top1=top1,
                         options=ATTENTION_OPTIONS) for seed, top1 in enumerate(attention)][1] / "config.json"
    if DAMAGES[damage] is None:
        damaged.unlink()
    else:
        damaged.write_text(DAMAGES[damage](damaged.read_text()))

    loaded = report.load_runs([root])
    assert len(loaded.runs) == 5 and str(damaged.parent) not in set(loaded.runs["run_dir"])
    [warning] = loaded.warnings
    assert warning.startswith(f"{damaged}: ") and warning.endswith("the run is left out of the tables")
    table = report.summary_table(loaded.runs, by=["dataset", "backbone_label"])
    assert "setting" not in table.columns  # one configuration, not a second one of "=None" settings
    [row] = table[table["variant_name"] == "attention-ad3-aw4"].to_dict("records")
    assert row["n"] == 2 and row["n_pairs"] == 2
    # float64 throughout: the mean of the two intact paired differences, exactly as computed here
    assert row["delta_pt"] == pytest.approx(statistics.mean([attention[0] - baseline[0], attention[2] - baseline[2]]),
                                            rel=1e-12)

    if damage == "truncated":  # the command: the table as the user gets it, the warning under it
        done = finebench("report", "results", "--format", "csv", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "None" not in done.stdout and len(done.stdout.splitlines()) == 3  # header, baseline, attention
        assert done.stderr.startswith(f"warning: {damaged.relative_to(tmp_path)}: not readable JSON")

