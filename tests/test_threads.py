"""train.threads = "auto": one intra-op thread per idle core, measured at each epoch ("auto-once": kept on resume), recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from tiny_data import prepare_tiny_bars, tiny_recipe

from finebench.recipe import load_recipe
from finebench.runner import run_recipe
from finebench.train.threads import (
    ThreadChoice,
    choose_threads,
    idle_cores,
    speed_conditions_differ,
    threads_for,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_rule_uses_one_thread_per_idle_core_and_never_none() -> None:
    assert threads_for(idle=2.0, cores=2) == 2
    assert threads_for(idle=1.8, cores=2) == 2  # start-up noise does not cost a core
    assert threads_for(idle=1.0, cores=2) == 1  # one CPU-bound process beside the run
    assert threads_for(idle=0.0, cores=2) == 1
    assert threads_for(idle=16.0, cores=16, workers_here=2) == 8  # two DDP workers share the idle cores
    assert threads_for(idle=40.0, cores=16) == 16


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/stat"), reason="Linux only")
def test_a_core_kept_busy_by_another_process_is_measured_busy() -> None:
    core = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning
        idle, how = idle_cores([core])
    finally:
        hog.kill()
        hog.wait()
    assert how.startswith("/proc/stat") and idle < 0.3


def test_a_pinned_count_a_resumed_count_and_omp_num_threads_win_over_measuring(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(3).threads == 3
    assert choose_threads("auto-once", previous=5) == (5, "auto-once, kept from the run's first start (bit-identical resume)")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads("auto") == (1, "auto: OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    choice = choose_threads("auto")
    assert 1 <= choice.threads <= (os.cpu_count() or 1) and choice.rule.startswith("auto: ")


def test_a_run_records_the_thread_count_it_chose(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 20)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(seeds=None, eval_batch_size=None, lr=None))
    (outcome,) = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    summary = json.loads((outcome.path / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["threads"] >= 1 and summary["threads_rule"].startswith("auto: ")
    assert "cores idle" in summary["threads_rule"]


def test_auto_decides_the_thread_count_at_each_epoch_and_auto_once_keeps_it(tmp_path, monkeypatch) -> None:
    """Issue 22 item 7: a run that started on a busy machine kept 2 threads (49-115 img/s) for good.
    Each epoch's row records its count and the load average."""
    import finebench.train.fit as engine  # the fit loop's module, patched below

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 20)
    idle = iter([1, 2, 1, 2, 1, 2])
    monkeypatch.setattr(engine, "choose_threads", lambda setting, **kw: ThreadChoice(next(idle), "auto: test"))
    for setting, expected in (("auto", [1, 1, 2]), ("auto-once", None)):
        recipe = tmp_path / f"{setting}.toml"
        recipe.write_text(tiny_recipe(epochs=3, extra_train=f'threads = "{setting}"'))
        (outcome,) = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root,
                                quiet=True)
        rows = [json.loads(line) for line in (outcome.path / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((outcome.path / "summary.json").read_text())
        used = [row["threads"] for row in rows]
        if expected is None:  # one count, the runner's first choice, for every epoch
            assert used == [summary["threads"]] * 3
        else:  # the runner chose for epoch 1 (torch's count here is the conftest's), then 1 and 2
            assert used[1:] == expected[1:]
        assert summary["threads_used"] == sorted(set(used))
        assert all(isinstance(row["load_1min"], float) for row in rows)
        assert summary["load_1min"] == round(sum(row["load_1min"] for row in rows) / 3, 2)


def test_speeds_measured_under_different_threads_or_load_are_marked() -> None:
    assert not speed_conditions_differ([([2], 2.1), ([2], 2.9)])
    assert speed_conditions_differ([([2], 2.0), ([1], 1.0)])  # different counts
    assert speed_conditions_differ([([1], 1.0), ([1], 3.5)])  # 2.5 cores of someone else's load
    assert not speed_conditions_differ([([1], None), ([1], 3.0)])  # old records: no load recorded
