"""The authors' numbers (``results/reference/*.csv``) and the rule that ties one to a table row.

One reference row per (logged run, metric, selection): the best epoch (what the paper reports,
selected on the test set) and the last epoch (what a run without test-set selection ends with).
A reference value matches a group of runs only when every setting it states matches the runs'
(dataset, backbone, kind, AD, AW, gates, output, reg_w, dropout); a blank setting is one the
authors' run does not have (the baseline's attention settings), so it matches only runs that do
not have it either. A row with a ``protocol`` note used a different data protocol: it is never
placed beside our numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from finebench.errors import FinebenchError
from finebench.report.stats import is_missing

DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parent.parent.parent / "results" / "reference"

# Reference column → the run column that holds the same setting.
SETTING_COLUMNS: dict[str, str] = {
    "attention_depth": "attention_depth",
    "attention_width": "attention_width",
    "gates": "gates",
    "output": "output_mode",
    "reg_weight": "reg_w",
    "dropout": "dropout",
}
REFERENCE_COLUMNS: tuple[str, ...] = (
    "dataset", "backbone_label", "variant", *SETTING_COLUMNS, "metric", "selection", "value", "source",
)
SELECTIONS = {"final": "last-epoch", "best": "best-epoch"}
SOURCE_KINDS: tuple[str, ...] = ("paper", "official-code", "reimplementation")
"""What a number's ``source_kind`` says it is: the paper's table, the authors' released code run by
them or others (their logs, FGVCLib's "official code" column), or another library's re-implementation
(FGVCLib's, Hawkeye's, a port)."""
_TEXT_COLUMNS = ("dataset", "backbone_label", "variant", "gates", "output", "metric", "selection", "source",
                 "note", "protocol", "source_kind")


def load_reference(paths: Iterable[str | Path] | None = None) -> pd.DataFrame:
    """The authors' numbers from the CSV files in ``paths`` (default: ``results/reference/``)."""
    if paths is None:
        # The repository's copy; an installed (non-editable) package finds it under the cwd.
        paths = [DEFAULT_REFERENCE_DIR if DEFAULT_REFERENCE_DIR.is_dir() else Path("results") / "reference"]
    paths = list(paths)
    frames = []
    for raw in paths:
        path = Path(raw)
        files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
        for file in files:
            frames.append(_read_reference_file(file))
    if not frames:
        raise FinebenchError(f"no reference table (*.csv) found in {', '.join(map(str, paths))}")
    return pd.concat(frames, ignore_index=True)


def _read_reference_file(file: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(file, dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=False, na_values=[""])
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise FinebenchError(f"reference table {file}: not a readable CSV ({error})") from None
    missing = [column for column in REFERENCE_COLUMNS if column not in frame.columns]
    if missing:
        raise FinebenchError(
            f"reference table {file}: missing column(s) {', '.join(missing)}; expected {', '.join(REFERENCE_COLUMNS)}"
        )
    for column in ("value", "attention_depth", "attention_width", "reg_weight", "dropout"):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna() if column != "value" else values.isna()
        if bad.any():
            line = int(bad.idxmax()) + 2  # 1-based, after the header
            raise FinebenchError(
                f"reference table {file}, line {line}: {column} {frame[column].iloc[line - 2]!r} is not a number"
            )
        frame[column] = values
    _check_choices(file, frame, "selection", tuple(SELECTIONS.values()))
    for column in ("note", "protocol", "source_kind"):
        if column not in frame:
            frame[column] = None
    if frame["source_kind"].notna().any():
        _check_choices(file, frame, "source_kind", SOURCE_KINDS)
    frame["reference_file"] = file.name
    frame["reference_path"] = str(file)  # where an error points: the file and
    frame["reference_line"] = frame.index + 2  # its 1-based line, after the header
    return frame


def _check_choices(file: Path, frame: pd.DataFrame, column: str, choices: tuple[str, ...]) -> None:
    """The first row whose ``column`` is not one of ``choices``, named by file, line and value."""
    bad = ~frame[column].isin(choices)
    if bad.any():
        index = int(bad.idxmax())
        value = frame[column].iloc[index]
        shown = "is empty" if is_missing(value) else repr(value)
        raise FinebenchError(f"reference table {file}, line {index + 2}: {column} {shown}; "
                             f"expected {' or '.join(choices)}")


AUTHORS_LOG = "authors' log"
"""How a reference row taken from the authors' own training log begins its ``source``."""


def describe_reference(reference: pd.DataFrame) -> str:
    """Where the reference numbers come from, for the table's note: the files read, and that they are
    the authors' training logs only when every row's ``source`` says so (a papers' table such as
    ``papers/peers.csv`` cites papers and READMEs)."""
    files = " and ".join(dict.fromkeys(reference["reference_file"].astype(str)))
    sources = reference["source"].dropna().astype(str)
    if not sources.empty and sources.str.startswith(AUTHORS_LOG).all():
        return f"the authors' training logs in {files}"
    return f"the numbers cited in {files}"


def match_reference(
    reference: pd.DataFrame, settings: Mapping[str, Any], metric: str, selection: str
) -> pd.Series | None:
    """The reference row stating exactly this group's settings, for ``metric`` and ``selection``."""
    candidates = stating(reference, settings, metric)
    candidates = candidates[(candidates["selection"] == SELECTIONS[selection]) & candidates["protocol"].isna()]
    if candidates.empty:
        return None
    return candidates.iloc[0]


def stating(reference: pd.DataFrame, settings: Mapping[str, Any], metric: str,
            names: Iterable[str] = ()) -> pd.DataFrame:
    """Every reference row of ``metric`` that states exactly these settings, whatever its selection
    and protocol; its ``variant`` is the runs' method kind or one of ``names`` (a recipe's variant
    name, such as ``ielt-from-last``)."""
    variants = {name for name in (settings.get("variant"), *names) if not is_missing(name)}
    candidates = reference[
        (reference["metric"] == metric)
        & (reference["dataset"] == settings.get("dataset"))
        & reference["backbone_label"].map(lambda labels: label_matches(labels, settings.get("backbone_label")))
        & reference["variant"].isin(variants)
    ]
    for column, run_column in SETTING_COLUMNS.items():
        wanted = settings.get(run_column)
        candidates = candidates[candidates[column].map(lambda stated: _same(stated, wanted)).astype(bool)]
    return candidates


def protocol_notes(reference: pd.DataFrame, datasets: Iterable[str]) -> list[str]:
    """One line per dataset shown whose reference numbers used another protocol (never placed beside)."""
    notes = []
    for dataset in sorted(set(datasets)):
        rows = reference[(reference["dataset"] == dataset) & reference["protocol"].notna()]
        if not rows.empty:
            notes.append(f"{dataset}: the authors' numbers are not shown: they used {rows['protocol'].iloc[0]}.")
    return notes


def label_matches(labels: Any, wanted: Any) -> bool:
    """A reference backbone may list the names one network has: ``WRN-50-2|wide_resnet50_2``."""
    return isinstance(labels, str) and wanted in {label.strip() for label in labels.split("|")}


def _same(stated: Any, wanted: Any) -> bool:
    """Blank matches only blank; numbers compare as numbers (AD 3 in a CSV equals 3 in a run)."""
    if is_missing(stated) or is_missing(wanted):
        return is_missing(stated) and is_missing(wanted)
    try:
        return math.isclose(float(stated), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(stated) == str(wanted)
