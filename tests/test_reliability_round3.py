"""Issue 22, third round: what a user still met after the second (items 9 and 10), one test each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_attend import tiny_attention_run, toy_store
from test_report import write_run

from finebench.attend import attend


def finebench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finebench", *args], capture_output=True, text=True, cwd=cwd, check=False,
                          timeout=300)


@pytest.mark.parametrize(("option", "target"), [("-o", "blocker/table.md"), ("--plots", "blocker"),
                                                ("--plots", "blocker/plots")])
def test_a_file_where_an_output_folder_goes_is_named_with_the_target(tmp_path: Path, option: str,
                                                                     target: str) -> None:
    """Item 9c: ``report -o blocker/table.md`` said only "[Errno 17] File exists: 'blocker'"."""
    write_run(tmp_path / "results", variant="baseline", variant_name="baseline", seed=0, top1=90.0)
    (tmp_path / "blocker").write_text("")
    result = finebench("report", "results", option, target, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "blocker is a file, expected a folder" in result.stderr and repr(target) in result.stderr
    assert "File exists" not in result.stderr


def test_attend_into_a_file_says_it_is_a_file(tmp_path: Path) -> None:
    """Item 9c: ``attend --out FILE`` said "File exists", naming no problem."""
    toy_store(tmp_path / "data")
    run_dir = tiny_attention_run(tmp_path / "results", tmp_path / "data")
    (tmp_path / "blocker").write_text("")
    with pytest.raises(NotADirectoryError, match=r"blocker is a file, expected a folder: '.*blocker/maps'"):
        attend(run_dir, split="test", n=1, out_dir=tmp_path / "blocker" / "maps", data_root=tmp_path / "data")
