"""The ``finebench`` command line: thin Typer commands that parse, then call one function each.

All work lives in the module for that job, so everything here is also callable from Python.
Errors a user can cause arrive as ``FinebenchError`` and leave as one line plus a non-zero exit;
``--debug`` keeps the traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from finebench.errors import FinebenchError

app = typer.Typer(
    name="finebench",
    help="Benchmarking suite for fine-grained image recognition: prepare datasets, train baseline "
    "and attention-augmented backbones from TOML recipes, and report paper-style tables.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    _state["debug"] = debug


# ---- models and cost (issue 2) -------------------------------------------------------------


# ---- datasets (issue 3) --------------------------------------------------------------------


# ---- training (issues 4, 6, 7) -------------------------------------------------------------


# ---- report and attention maps (issue 5) ---------------------------------------------------


def main() -> None:
    """Console-script entry point: turn user errors into one clear line and exit code."""
    try:
        app(standalone_mode=False)
    except FinebenchError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as error:  # click's usage errors
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
