"""The run command's results table marks speeds measured under different conditions with its own mark."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from finebench.terminal import SPEED_MARK, outcome_table


def _outcome(variant: str, threads: list[int]) -> SimpleNamespace:
    run = SimpleNamespace(backbone="wrn", variant_name=variant, fold=None, seed=0, run_id=f"{variant}-0")
    summary = {"final": {"test_top1": 90.0, "test_top5": 99.0}, "best": {"test_top1": 90.0, "epoch": 1},
               "images_per_s": 100.0, "threads_used": threads, "load_1min": 1.0, "train_time_s": 10.0}
    return SimpleNamespace(run=run, status="finished", summary=summary, state=None, data=None)


def test_run_table_marks_speeds_with_the_speed_mark_and_explains_it() -> None:
    console = Console(file=io.StringIO(), width=250, record=True)
    console.print(outcome_table([_outcome("baseline", [2]), _outcome("se", [1])], title="results"))
    text = console.export_text()
    assert SPEED_MARK == "†" and f"100{SPEED_MARK}" in text and "100*" not in text
    assert f"{SPEED_MARK} img/s measured with different thread counts" in text
