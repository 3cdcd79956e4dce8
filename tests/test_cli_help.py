"""Help texts say what the commands accept, with rich markup's square brackets kept."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from finebench.cli import app
from finebench.methods import METHODS


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # words joined again where the help wraps


def test_run_help_keeps_the_slurm_extra_in_the_pip_command() -> None:
    assert "pip install 'finebench[slurm]'" in _help("run")


def test_attend_help_names_every_method_that_draws_attention_maps() -> None:
    text = _help("attend")
    drawing = {kind for kind, method in METHODS.items() if method.draws_attention_maps}
    assert drawing == {"attention", "ws_dan", "cal"}  # what the help text lists; a new one must be added there
    named = set(re.search(r"draws attention maps: ([^.]*)\.", text).group(1).replace(" or ", ", ").split(", "))
    assert {name.split(" ")[0] for name in named} == drawing
