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
_TEXT_COLUMNS = ("dataset", "backbone_label", "variant", "gates", "output", "metric", "selection", "source",
                 "note", "protocol")


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
    unknown = sorted(set(frame["selection"].dropna()) - set(SELECTIONS.values()))
    if unknown:
        raise FinebenchError(f"reference table {file}: selection {unknown[0]!r}; expected best-epoch or last-epoch")
    for column in ("note", "protocol"):
        if column not in frame:
            frame[column] = None
    frame["reference_file"] = file.name
    return frame


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
    candidates = reference[
        (reference["metric"] == metric)
        & (reference["selection"] == SELECTIONS[selection])
        & reference["protocol"].isna()
        & (reference["dataset"] == settings.get("dataset"))
        & reference["backbone_label"].map(lambda labels: label_matches(labels, settings.get("backbone_label")))
        & (reference["variant"] == settings.get("variant"))
    ]
    for column, run_column in SETTING_COLUMNS.items():
        wanted = settings.get(run_column)
        candidates = candidates[candidates[column].map(lambda stated: _same(stated, wanted)).astype(bool)]
    if candidates.empty:
        return None
    return candidates.iloc[0]


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
