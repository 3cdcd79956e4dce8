"""``finebench report``'s one call: the tables, figures and warnings the command prints, in its order.

The CLI parses the flags and calls ``report_command``; the work is the package's (``finebench.report``).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from finebench.console import make_console
from finebench.errors import FinebenchError
from finebench.report import (
    FORMATS,
    disagreement,
    emit_disagreement,
    emit_groups,
    emit_ranks,
    emit_reproduction,
    emit_table,
    failed_table,
    make_report,
    rank_methods,
    reproduction_reference,
    reproduction_table,
    running_lines,
    split_by,
)


def report_command(
    paths: list[str], *, by: list[str] | None, fmt: str, output: str | None, error: bool, reference: bool,
    reference_file: list[str] | None, best: bool, early: bool, plots: str | None, speed: bool, predictions: bool,
    groups: bool, data_root: str | None, long: bool, ranks: bool, reproduce: bool,
    disagree: tuple[str, str] | None,
) -> None:
    """``finebench report PATHS``: each table asked for, on stdout or beside ``output``; what they
    leave out, and the plots written, on stderr."""
    status = make_console(stderr=True)
    if fmt not in FORMATS:
        raise FinebenchError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if disagree and all(disagree):
        report_disagreement(paths, disagree, split_by(by), fmt, output, plots, status)
        return
    result = make_report(
        paths,
        by=split_by(by),
        error=error,
        reference=reference_file or reference,
        selection="best" if best else "final",
        early=early,
        speed=speed,
        predictions=predictions,
    )
    ranked = rank_methods(result.loaded.runs, error=error) if ranks else None  # fails before any output
    reproduction = (reproduction_table(result.loaded.runs, reproduction_reference(reference_file))
                    if reproduce else None)  # as the ranks: a bad reference table stops before any output
    output_path = Path(output) if output else None
    # the paper's layout unless the user groups by options (an ablation reads better one row per setting)
    wide = not long and not by
    emit_table(result.table, fmt, output_path, "finebench report", wide=wide, status=status)
    if result.early is not None:
        early_path = output_path.with_name(f"{output_path.stem}_early{output_path.suffix}") if output_path else None
        emit_table(result.early, fmt, early_path, "early prediction", status=status)
    if result.predictions is not None:
        path = output_path.with_name(f"{output_path.stem}_predictions{output_path.suffix}") if output_path else None
        emit_table(result.predictions, fmt, path, "predictions", status=status)
    if groups:
        path = output_path.with_name(f"{output_path.stem}_groups{output_path.suffix}") if output_path else None
        result.loaded.warnings.extend(emit_groups(result.loaded.runs, fmt, path, error, status, data_root=data_root))
    if ranked is not None:
        ranks_path = output_path.with_name(f"{output_path.stem}_ranks{output_path.suffix}") if output_path else None
        emit_ranks(ranked, fmt, ranks_path, error=error, status=status)
    if reproduction is not None:
        path = output_path.with_name(f"{output_path.stem}_reproduce{output_path.suffix}") if output_path else None
        emit_reproduction(reproduction, fmt, path, status=status)
    # what the tables leave out, listed under them where it is read last
    for warning in result.loaded.warnings:
        status.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if not result.loaded.failed.empty:
        status.print(f"[red]{len(result.loaded.failed)} failed run(s), not in the table:[/]")
        for row in failed_table(result.loaded.failed).itertuples(index=False):
            status.print(escape(f"  {row.Recipe}/{row.Run} {row.Dataset} {row.Backbone} {row.Variant} "
                                f"seed {row.Seed}: {row.Reason}"), highlight=False, soft_wrap=True)
    if not result.loaded.running.empty:
        status.print(f"[cyan]{len(result.loaded.running)} unfinished run(s), not in the table:[/]")
        for line in running_lines(result.loaded.running):
            status.print(escape(f"  {line}"), highlight=False, soft_wrap=True)
    if plots:
        from finebench.report.plots import plot_critical_difference, write_plots

        plot_warnings: list[str] = []
        written = write_plots(result.loaded.runs, Path(plots), error=error, warnings=plot_warnings)
        if ranked is not None:
            written += plot_critical_difference(ranked, Path(plots))
        for warning in plot_warnings:
            status.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        status.print(f"wrote {len(written)} plot files to {plots}", highlight=False)


def report_disagreement(paths: list[str], variants: tuple[str, str], by: list[str] | None, fmt: str,
                        output: str | None, plots: str | None, status: Console) -> None:
    """``report --disagree A B``: the table, then (``--plots``) the thumbnails, then what was left out."""
    a, b = variants
    pairs = disagreement(paths, a, b, by)
    emit_disagreement(pairs, a, b, fmt, Path(output) if output else None, status=status)
    if plots:
        from finebench.report.plots import plot_disagreement

        warnings: list[str] = []
        written = plot_disagreement(pairs, a, b, Path(plots), warnings)
        for warning in warnings:
            status.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        status.print(f"wrote {len(written)} plot files to {plots}", highlight=False)
