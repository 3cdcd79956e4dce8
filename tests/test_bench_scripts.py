"""Every script in benchmarks/ runs end to end in its --quick mode and prints its ratio table (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
EXPECTED_COLUMN = {
    "train_step.py": "finebench/plain",
    "precision.py": "vs fp32",
    "attention_overhead.py": "time-FLOP pts",
    "loader.py": "vs ImageFolder",
    "mfu.py": "MFU",
    "threads.py": "auto vs torch default",
    "op_count.py": "added",
    "gpu_suite.py": "gpu_suite: finished",
    "jobs.py": "serial / jobs",
    "attention_readout.py": "op speed / eager",
    "peers_overhead.py": "step time +%",
    "prepare_speed.py": "prepare / tar",
    "dry_run.py": "dry run / floor",
    "transformer_overhead.py": "peak memory +%",
}


def test_every_benchmark_script_is_covered() -> None:
    scripts = {path.name for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_")}
    assert scripts == set(EXPECTED_COLUMN)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED_COLUMN))
def test_benchmark_runs_quick_and_prints_its_ratio(script: str) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "load average" in result.stdout
    assert EXPECTED_COLUMN[script] in result.stdout
