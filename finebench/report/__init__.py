"""``finebench report``: run records → the tables and figures of a paper.

One module per job, each read top to bottom: ``records`` (summary.json → one row per run and its
settings), ``stats`` (confidence intervals, paired tests, per-class accuracy), ``reference`` (the
authors' numbers and when one matches), ``tables`` (groups → numeric tables), ``render`` (markdown,
CSV, LaTeX, JSON, terminal) and ``plots`` beside them. This module holds the calls that make and
emit each table; ``command`` is the one call the CLI makes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import pandas as pd
from rich.console import Console
from rich.table import Table

from finebench.console import make_console
from finebench.report.disagree import (
    Pair,
    disagreement,
    disagreement_caption,
    disagreement_table,
    format_disagreement,
)
from finebench.report.groups import group_table, groups_caption, shown_groups
from finebench.report.ranks import Ranks, format_ranks, rank_methods, ranks_caption
from finebench.report.records import LoadedRuns, find_summaries, load_metrics, load_runs
from finebench.report.reference import REFERENCE_COLUMNS, load_reference
from finebench.report.reproduce import (
    format_reproduction,
    reproduction_caption,
    reproduction_reference,
    reproduction_table,
)
from finebench.report.render import (
    FORMATS,
    failed_table,
    format_table,
    render,
    running_lines,
    table_note,
    wide_view,
)
from finebench.report.tables import COLUMN_ALIASES, DEFAULT_BY, early_prediction_table, predictions_table, summary_table
from finebench.terminal import rich_table, terminal_tables

__all__ = [
    "COLUMN_ALIASES", "Pair", "Ranks", "disagreement", "emit_disagreement", "emit_groups", "emit_ranks", "emit_reproduction",
    "reproduction_reference", "reproduction_table", "rank_methods", "DEFAULT_BY", "FORMATS", "REFERENCE_COLUMNS", "LoadedRuns", "Report", "early_prediction_table",
    "emit_table", "fitted_markdown", "predictions_table", "failed_table", "find_summaries", "format_table", "load_metrics", "load_reference", "load_runs", "make_report",
    "reader_width", "render", "rich_table", "running_lines", "split_by", "summary_table", "table_note", "terminal_tables", "wide_view",
]


class Report(NamedTuple):
    table: pd.DataFrame
    early: pd.DataFrame | None
    loaded: LoadedRuns
    predictions: pd.DataFrame | None = None


def make_report(
    paths: Sequence[str | Path] = ("results",),
    by: Sequence[str] | None = None,
    error: bool = False,
    reference: bool | Sequence[str | Path] = False,
    selection: Literal["final", "best"] = "final",
    early: bool = False,
    speed: bool = False,
    predictions: bool = False,
) -> Report:
    """Load the records and build the tables a ``finebench report`` call asks for."""
    loaded = load_runs(paths)
    reference_table = None
    if reference:
        reference_table = load_reference(None if reference is True else reference)
    table = summary_table(loaded.runs, by=by, error=error, reference=reference_table, selection=selection,
                          speed=speed)
    early_table = early_prediction_table(loaded.runs, error=error) if early else None
    predictions_part = predictions_table(loaded.runs, error=error) if predictions else None
    return Report(table, early_table, loaded, predictions_part)


def split_by(values: Sequence[str] | None) -> list[str] | None:
    """``--by dataset,AD --by AW`` → [dataset, AD, AW]: Typer options take one value each."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def reader_width(stdout: Console, stderr: Console) -> int | None:
    """The columns a reader of stdout sees: the terminal's; when stdout is piped (to a pager, ``tee``)
    while the session still has a terminal on stderr, that terminal's; None in a log or a file with no
    terminal at all (it has no width to fit)."""
    for console in (stdout, stderr):
        if console.is_terminal:
            return console.width
    return None


def fitted_markdown(table: pd.DataFrame, wide: bool, width: int | None) -> str:
    """The markdown table, in the paper's wide layout only when its lines fit ``width`` (None: any);
    else one row per variant (seven variants made the wide layout 820 characters wide)."""
    text = render(table, "markdown", wide=wide)
    if wide and width is not None and max(map(len, text.splitlines()), default=0) > width:
        return render(table, "markdown")
    return text


def emit_table(table: pd.DataFrame, fmt: str, output: Path | None, title: str, *, wide: bool = False,
               status: Console | None = None) -> None:
    """A rich table on a terminal, plain text when piped or written to a file (-o); ``status`` says what was written.

    Piped markdown takes the wide layout only where it fits the reader's terminal (``reader_width``);
    a file written with -o keeps the layout asked for.
    """
    from finebench.results import atomic_write_bytes

    if output is not None:
        atomic_write_bytes(output, render(table, fmt, wide=wide).encode())
        (status or make_console(stderr=True)).print(f"wrote {output}", highlight=False)
        return
    stdout = make_console()
    if fmt == "markdown" and stdout.is_terminal and not table.empty:
        note = table_note(table)
        parts = terminal_tables(wide_view(table), stdout.width, title, note) if wide else []
        if sum(isinstance(part, Table) for part in parts) != 1:  # the paper's layout does not fit: one row per variant
            parts = terminal_tables(format_table(table), stdout.width, title, note)
        for part in parts:
            stdout.print(part)
        return
    if fmt == "markdown":
        sys.stdout.write(fitted_markdown(table, wide, reader_width(stdout, Console(stderr=True))))
    else:
        sys.stdout.write(render(table, fmt, wide=wide))
    if fmt == "markdown" and not table.empty:
        sys.stdout.write(f"\n{table_note(table)}\n\n")


def emit_side_table(numbers: pd.DataFrame, shown: pd.DataFrame, caption: str, title: str, fmt: str,
                    output: Path | None, status: Console | None = None) -> None:
    """A table beside the summary (ranks, disagreements): a rich table on a terminal, else markdown,
    CSV or JSON of ``numbers``, or LaTeX of the text cells ``shown``, with ``caption``, to stdout or
    ``output``."""
    from finebench.results import atomic_write_bytes

    stdout = make_console()
    if output is None and fmt == "markdown" and stdout.is_terminal:
        stdout.print(rich_table(shown, title=title, caption=caption))
        return
    if fmt == "csv":
        text = numbers.round(6).to_csv(index=False)
    elif fmt == "json":
        text = numbers.round(6).to_json(orient="records", indent=2, force_ascii=False) + "\n"
    elif fmt == "latex":
        text = "".join(f"% {line}\n" for line in caption.splitlines()) + shown.to_latex(index=False, escape=True)
    else:
        text = shown.to_markdown(index=False, tablefmt="pipe", disable_numparse=True) + f"\n\n{caption}\n"
    if output is None:
        sys.stdout.write(text)
        return
    atomic_write_bytes(output, text.encode())
    (status or make_console(stderr=True)).print(f"wrote {output}", highlight=False)


def emit_ranks(result: Ranks, fmt: str, output: Path | None, error: bool = False,
               status: Console | None = None) -> None:
    """The ranks across datasets (``report --ranks``), with the caption that names the tests."""
    emit_side_table(result.table, format_ranks(result), ranks_caption(result, error=error),
                    "ranks across datasets", fmt, output, status)


def emit_reproduction(table: pd.DataFrame, fmt: str, output: Path | None, status: Console | None = None) -> None:
    """``report --reproduce``: each reference number beside finebench's interval under the same
    selection rule, with the caption that says which rule each comparison uses."""
    emit_side_table(table, format_reproduction(table), reproduction_caption(table),
                    "can the reference numbers be reproduced?", fmt, output, status)


def emit_disagreement(pairs: Sequence[Pair], a: str, b: str, fmt: str, output: Path | None,
                      status: Console | None = None) -> None:
    """``report --disagree A B``: one row per dataset, backbone and seed with McNemar's test and the
    bootstrap interval, with the caption that says what they test."""
    table = disagreement_table(pairs)
    emit_side_table(table, format_disagreement(table, a, b), disagreement_caption(a, b),
                    f"{a} against {b}, image by image", fmt, output, status)


def emit_groups(runs: pd.DataFrame, fmt: str, output: Path | None, error: bool = False,
                status: Console | None = None, data_root: str | Path | None = None) -> list[str]:
    """``report --groups``: top-1 per group (iNat's supercategory) of each method; returns the lines
    naming the runs left out, for the CLI to print with the other warnings."""
    table, warnings = group_table(runs, error=error, data_root=data_root)
    emit_side_table(table, shown_groups(table), groups_caption(table), "top-1 per group", fmt, output, status)
    return warnings
