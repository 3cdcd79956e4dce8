"""``finebench ARGS`` run in the test's own process (the console script's ``main`` with its error
handling and exit codes), for CLI tests that would otherwise pay an interpreter start-up per call."""

from __future__ import annotations

import sys

import pytest


def finebench_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str,
                         columns: int) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``finebench ARGS`` on a terminal ``columns`` wide."""
    from finebench.cli import main

    monkeypatch.setattr(sys, "argv", ["finebench", *args])
    monkeypatch.setenv("COLUMNS", str(columns))
    code = 0
    try:
        main()
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
