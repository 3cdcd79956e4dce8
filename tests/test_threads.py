"""train.threads = "auto": one intra-op thread per idle core, measured, kept on resume, recorded."""

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
from finebench.train.threads import choose_threads, idle_cores, threads_for

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
    assert choose_threads("auto", previous=5) == (5, "auto, kept from the run's first start (bit-identical resume)")
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
