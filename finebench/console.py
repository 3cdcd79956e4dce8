"""The command line's rich consoles: on a terminal, rich's layout at the terminal's width; into a file
or a pipe, whole lines and whole table cells.

Why: rich lays out for 80 columns when its stream is not a terminal, so a log of ``finebench
prepare`` wrapped its counts mid-phrase and a captured run table cut variant names to
``attention-ad...``. A file has no width to fit, so there the width is unbounded (tables are as
wide as their content: finebench draws no full-width rules or panels).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

UNBOUNDED_WIDTH = 100_000
"""The width a console that is not a terminal lays out for: more than any line finebench prints."""


def make_console(*, stderr: bool = False, **options: Any) -> Console:
    """A ``rich.console.Console`` on stdout (or stderr) that never wraps or cuts when it is not a terminal."""
    console = Console(stderr=stderr, **options)
    if console.is_terminal or "width" in options:
        return console
    return Console(stderr=stderr, width=UNBOUNDED_WIDTH, **options)
