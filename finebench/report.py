"""Turn run records into the tables of a paper: read every ``summary.json``, aggregate over seeds.

The report reads only what ``finebench run`` wrote (see ``records_contract``), so it can be rerun
at any time while trainings go on. A record that cannot be read is skipped with a warning that
names its file: one corrupt file must never cost the researcher the whole table.

Conventions, stated once so every output agrees:

- mean ± std is over seeds with the *sample* standard deviation (ddof=1); a group of one run
  shows no ± (its std is undefined, not zero).
- the gain is ``variant mean − baseline mean`` in points, the baseline being the runs of kind
  ``baseline`` that share every grouping column that is not a variant option (by default the same
  dataset and backbone_label). With ``--error`` the column is the change in error, so negative is
  better. A missing baseline shows "—".
- parameter and FLOP overheads come from each run's own ``params_baseline``/``flops_baseline``,
  so they need no baseline run.
"""

from __future__ import annotations

import json
import math
import warnings as _warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finebench.errors import FinebenchError

FORMATS: tuple[str, ...] = ("markdown", "csv", "latex", "json")
DEFAULT_BY: tuple[str, ...] = ("dataset", "backbone_label")
DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parent.parent / "results" / "reference"

# Short names researchers use for the ablation axes.
COLUMN_ALIASES: dict[str, str] = {
    "AD": "attention_depth",
    "AW": "attention_width",
    "backbone": "backbone_label",
}
# Key options (beyond dataset, backbone_label and variant kind) a reference number is tied to.
REFERENCE_KEYS: tuple[str, ...] = ("attention_depth", "attention_width", "dropout")
MISSING = "—"


# ---- reading the records ------------------------------------------------------------------


class _FinalMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    epoch: int | None = None
    test_top1: float
    test_top5: float | None = None
    test_loss: float | None = None
    train_loss: float | None = None
    network_top1: float | None = None
    module_top1: dict[str, float] = Field(default_factory=dict)


class _BestMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    epoch: int | None = None
    test_top1: float | None = None


class RunSummary(BaseModel):
    """The fields of ``summary.json`` the report relies on; anything else is kept but unchecked."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    schema_version: int = Field(1, alias="schema")
    run_id: str
    recipe: str
    status: Literal["finished", "failed", "running"]
    failure_reason: str | None = None
    dataset: str
    num_classes: int | None = None
    backbone: str
    backbone_label: str
    variant: str
    variant_name: str
    variant_options: dict[str, Any] = Field(default_factory=dict)
    seed: int
    epochs: int | None = None
    epochs_completed: int | None = None
    final: _FinalMetrics | None = None
    best: _BestMetrics | None = None
    params: float | None = None
    flops: float | None = None
    params_baseline: float | None = None
    flops_baseline: float | None = None
    module_flops: dict[str, float] = Field(default_factory=dict)
    input_size: int | None = None
    train_time_s: float | None = None
    images_per_s: float | None = None
    device: str | None = None
    precision: str | None = None


class LoadedRuns(NamedTuple):
    runs: pd.DataFrame
    """One row per finished run (see ``RUN_COLUMNS``; variant options flattened into columns)."""
    failed: pd.DataFrame
    """One row per failed run: where, what and why."""
    warnings: list[str]
    """One line per record skipped, naming its file."""


RUN_COLUMNS: tuple[str, ...] = (
    "run_dir", "recipe", "run_id", "dataset", "num_classes", "backbone", "backbone_label",
    "variant", "variant_name", "seed", "epochs", "epochs_completed", "top1", "top5", "best_top1",
    "best_epoch", "network_top1", "module_top1", "module_flops", "params", "flops",
    "params_baseline", "flops_baseline", "params_overhead_pct", "flops_overhead_pct",
    "images_per_s", "train_time_s", "device", "precision", "dropout",
)
FAILED_COLUMNS: tuple[str, ...] = (
    "run_dir", "recipe", "run_id", "dataset", "backbone_label", "variant_name", "seed",
    "epochs_completed", "failure_reason",
)


def find_summaries(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``summary.json`` at or below ``paths`` (a results folder, a run folder or the file).

    A path that does not exist is the user's error (a typo would otherwise give an empty table).
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("summary.json")))
        else:
            raise FinebenchError(f"{path}: no such file or folder; expected a results folder, a run folder or a summary.json")
    return sorted(set(found))


def load_runs(paths: Iterable[str | Path] = ("results",)) -> LoadedRuns:
    """Read every run record below ``paths``; unreadable records become warnings, never errors."""
    summaries = find_summaries(paths)
    problems: list[str] = []
    seen: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    failed_rows: list[dict[str, Any]] = []
    for summary_path in summaries:
        try:
            raw = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(f"{summary_path}: skipped, not readable JSON ({error})")
            continue
        try:
            summary = RunSummary.model_validate(raw)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "(top level)"
            problems.append(f"{summary_path}: skipped, field {field!r}: {first['msg']}")
            continue
        run_dir = summary_path.parent
        if summary.run_id in seen:
            # A copied results folder would otherwise count one seed twice.
            problems.append(f"{summary_path}: skipped, run {summary.run_id} already read from {seen[summary.run_id]}")
            continue
        seen[summary.run_id] = summary_path
        if summary.status == "failed":
            failed_rows.append(_failed_row(summary, run_dir))
        elif summary.status == "running":
            problems.append(f"{summary_path}: skipped, status 'running' (still training or interrupted)")
        elif summary.final is None:
            problems.append(f"{summary_path}: skipped, status 'finished' but no 'final' metrics")
        else:
            rows.append(_run_row(summary, run_dir))
    runs = pd.DataFrame(rows)
    if runs.empty:
        runs = pd.DataFrame(columns=list(RUN_COLUMNS))
    failed = pd.DataFrame(failed_rows, columns=list(FAILED_COLUMNS))
    return LoadedRuns(runs, failed, problems)


def _overhead_pct(value: float | None, baseline: float | None) -> float:
    if value is None or not baseline:
        return math.nan
    return (value / baseline - 1.0) * 100.0


def _run_row(summary: RunSummary, run_dir: Path) -> dict[str, Any]:
    final = summary.final
    assert final is not None
    best = summary.best or _BestMetrics()
    row: dict[str, Any] = {
        "run_dir": str(run_dir),
        "recipe": summary.recipe,
        "run_id": summary.run_id,
        "dataset": summary.dataset,
        "num_classes": summary.num_classes,
        "backbone": summary.backbone,
        "backbone_label": summary.backbone_label,
        "variant": summary.variant,
        "variant_name": summary.variant_name,
        "seed": summary.seed,
        "epochs": summary.epochs,
        "epochs_completed": summary.epochs_completed,
        "top1": final.test_top1,
        "top5": final.test_top5,
        "best_top1": best.test_top1,
        "best_epoch": best.epoch,
        "network_top1": final.network_top1,
        "module_top1": dict(final.module_top1),
        "module_flops": dict(summary.module_flops),
        "params": summary.params,
        "flops": summary.flops,
        "params_baseline": summary.params_baseline,
        "flops_baseline": summary.flops_baseline,
        "params_overhead_pct": _overhead_pct(summary.params, summary.params_baseline),
        "flops_overhead_pct": _overhead_pct(summary.flops, summary.flops_baseline),
        "images_per_s": summary.images_per_s,
        "train_time_s": summary.train_time_s,
        "device": summary.device,
        "precision": summary.precision,
        "dropout": _run_dropout(summary, run_dir),
    }
    for option, value in summary.variant_options.items():
        column = option if option not in row else f"option_{option}"
        row[column] = value if not isinstance(value, (list, dict)) else json.dumps(value)
    return row


def _failed_row(summary: RunSummary, run_dir: Path) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir), "recipe": summary.recipe, "run_id": summary.run_id,
        "dataset": summary.dataset, "backbone_label": summary.backbone_label,
        "variant_name": summary.variant_name, "seed": summary.seed,
        "epochs_completed": summary.epochs_completed,
        "failure_reason": summary.failure_reason or "(no reason recorded)",
    }


def _run_dropout(summary: RunSummary, run_dir: Path) -> float:
    """The run's dropout rate, a key of some reference numbers; 0 when the run sets none."""
    if "dropout" in summary.variant_options:
        return float(summary.variant_options["dropout"])
    config_path = run_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return 0.0
    found = _find_key(config, ("dropout", "drop_rate", "dropout_rate"))
    try:
        return float(found) if found is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _find_key(tree: Any, keys: Sequence[str]) -> Any:
    """First value under any of ``keys`` in a nested config, without assuming its layout."""
    if isinstance(tree, dict):
        for key in keys:
            if key in tree and not isinstance(tree[key], (dict, list)):
                return tree[key]
        for value in tree.values():
            found = _find_key(value, keys)
            if found is not None:
                return found
    elif isinstance(tree, list):
        for value in tree:
            found = _find_key(value, keys)
            if found is not None:
                return found
    return None


def load_metrics(run_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """A run's ``metrics.jsonl`` as one row an epoch; bad lines (a crash mid-write) are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        return pd.DataFrame(), [f"{path}: skipped, not readable ({error})"]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path}:{number}: skipped line, not valid JSON")
            continue
        if not isinstance(record, dict) or "epoch" not in record:
            problems.append(f"{path}:{number}: skipped line, no 'epoch'")
            continue
        rows.append(record)
    return pd.DataFrame(rows), problems


# ---- reference numbers --------------------------------------------------------------------


REFERENCE_COLUMNS: tuple[str, ...] = (
    "dataset", "backbone_label", "variant", *REFERENCE_KEYS, "metric", "value", "selection", "source",
)


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
            try:
                frame = pd.read_csv(file, dtype={"dataset": str, "backbone_label": str, "variant": str},
                                    keep_default_na=False, na_values=[""])
            except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
                raise FinebenchError(f"reference table {file}: not a readable CSV ({error})") from None
            missing = [column for column in REFERENCE_COLUMNS if column not in frame.columns]
            if missing:
                raise FinebenchError(
                    f"reference table {file}: missing column(s) {', '.join(missing)}; expected "
                    f"{', '.join(REFERENCE_COLUMNS)}"
                )
            values = pd.to_numeric(frame["value"], errors="coerce")
            if values.isna().any():
                line = int(values.isna().idxmax()) + 2  # 1-based, after the header
                raise FinebenchError(
                    f"reference table {file}, line {line}: value {frame['value'].iloc[line - 2]!r} is not a number"
                )
            frame["value"] = values
            frame["reference_file"] = file.name
            frames.append(frame)
    if not frames:
        raise FinebenchError(f"no reference table (*.csv) found in {', '.join(map(str, paths))}")
    return pd.concat(frames, ignore_index=True)


def _match_reference(reference: pd.DataFrame, keys: dict[str, Any], metric: str) -> pd.Series | None:
    """The reference row for one table row: same dataset, backbone, kind and key options.

    ``backbone_label`` in the reference may list alternatives separated by ``|`` (the paper's
    name and finebench's label for the same network).

    An empty key option in the reference means the authors did not state it, so it matches any
    run; ``dropout`` empty means 0 (no dropout), since the runs carry an explicit dropout rate.
    """
    candidates = reference[
        (reference["metric"] == metric)
        & (reference["dataset"] == keys.get("dataset"))
        & reference["backbone_label"].map(lambda labels: _label_matches(labels, keys.get("backbone_label")))
        & (reference["variant"] == keys.get("variant"))
    ]
    for key in REFERENCE_KEYS:
        wanted, stated = keys.get(key), candidates[key]
        if key == "dropout":
            stated, wanted = stated.fillna(0.0), 0.0 if _is_missing(wanted) else wanted
        candidates = candidates[stated.isna() | (stated == wanted)]
    if candidates.empty:
        return None
    # The most specific row wins: the one that states the most key options.
    specificity = candidates[list(REFERENCE_KEYS)].notna().sum(axis=1)
    return candidates.loc[specificity.idxmax()]


def _label_matches(labels: Any, wanted: Any) -> bool:
    """A reference backbone may list the names one network has: ``WRN-50-2|wide_resnet50_2``."""
    return isinstance(labels, str) and wanted in {label.strip() for label in labels.split("|")}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---- aggregation --------------------------------------------------------------------------


def resolve_columns(df: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """Grouping names as columns of ``df`` (``AD`` → attention_depth); unknown ones are user errors."""
    resolved = []
    for name in by:
        column = COLUMN_ALIASES.get(name, name)
        if column not in df.columns:
            options = sorted(set(df.columns) - {"module_top1", "module_flops"}) + sorted(COLUMN_ALIASES)
            raise FinebenchError(f"--by {name!r}: no such column; expected one of {', '.join(options)}")
        resolved.append(column)
    return resolved


def _variant_columns(df: pd.DataFrame) -> set[str]:
    """Columns that describe the variant itself; the baseline has no value in them."""
    return {"variant", "variant_name"} | (set(df.columns) - set(RUN_COLUMNS))


def _unique_or_none(values: pd.Series) -> Any:
    distinct = values.dropna().unique()
    return distinct[0] if len(distinct) == 1 else None


def summary_table(
    df: pd.DataFrame,
    by: Sequence[str] | None = None,
    error: bool = False,
    reference: pd.DataFrame | None = None,
    selection: Literal["final", "best"] = "final",
) -> pd.DataFrame:
    """One row per group × variant with mean ± std over seeds, the gain and the overheads.

    Numbers stay numeric here (CSV and JSON keep them so); ``format_table`` makes them text.
    ``selection='best'`` uses the best-epoch test accuracy, the authors' (optimistic) choice.
    """
    metric = "error" if error else "top1"
    group_by = resolve_columns(df, by or DEFAULT_BY)
    row_keys = list(group_by)
    if "variant" not in row_keys and "variant_name" not in row_keys:
        row_keys.append("variant_name")
    value_column = "best_top1" if selection == "best" else "top1"
    data = df.copy()
    data["value"] = pd.to_numeric(data[value_column], errors="coerce")
    if error:
        data["value"] = 100.0 - data["value"]

    baseline_keys = [c for c in group_by if c not in _variant_columns(df)]
    baselines = data[data["variant"] == "baseline"]
    rows = []
    for key, group in data.groupby(row_keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(row_keys, key))
        values = group["value"].dropna()
        row["n"] = int(values.size)
        row[f"{metric}_mean"] = values.mean() if values.size else math.nan
        row[f"{metric}_std"] = values.std(ddof=1) if values.size > 1 else math.nan
        base = baselines
        for column in baseline_keys:
            wanted = row[column]
            base = base[base[column].isna()] if _is_missing(wanted) else base[base[column] == wanted]
        base_values = base["value"].dropna()
        row[f"baseline_{metric}"] = base_values.mean() if base_values.size else math.nan
        row["delta_pt"] = row[f"{metric}_mean"] - row[f"baseline_{metric}"]
        for column in ("params", "params_overhead_pct", "flops", "flops_overhead_pct", "images_per_s"):
            row[column] = pd.to_numeric(group[column], errors="coerce").mean()
        if reference is not None:
            keys = {c: _unique_or_none(group[c]) for c in ("dataset", "backbone_label", "variant")}
            keys.update({c: _unique_or_none(group[c]) if c in group else None for c in REFERENCE_KEYS})
            match = _match_reference(reference, keys, "top1")
            if match is not None:
                value = float(match["value"])
                row[f"reference_{metric}"] = 100.0 - value if error else value
                row["reference_selection"] = match["selection"]
                row["reference_source"] = match["source"]
            else:
                row[f"reference_{metric}"] = math.nan
                row["reference_selection"] = None
                row["reference_source"] = None
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        # The baseline leads its group, as in the paper's tables.
        group_keys = [c for c in row_keys if c not in ("variant", "variant_name")]
        variant_key = "variant_name" if "variant_name" in table else "variant"
        table["_not_baseline"] = (table[variant_key] != "baseline").astype(int)
        table = table.sort_values([*group_keys, "_not_baseline"], kind="stable", na_position="first")
        table = table.drop(columns="_not_baseline").reset_index(drop=True)
    table.attrs.update(metric=metric, selection=selection, keys=row_keys)
    return table


def early_prediction_table(df: pd.DataFrame, error: bool = False) -> pd.DataFrame:
    """Each attention module's accuracy alone against the FLOPs needed to reach its tap point.

    Rows come per dataset × backbone × variant, ordered by cost, ending with the network's own
    classifier and the full (mixed) model, so the saving of an early exit reads off directly.
    """
    metric = "error" if error else "top1"
    exploded = []
    for _, run in df.iterrows():
        modules = run.get("module_top1")
        if not isinstance(modules, dict) or not modules:
            continue
        module_flops = run.get("module_flops") if isinstance(run.get("module_flops"), dict) else {}
        base = {k: run[k] for k in ("dataset", "backbone_label", "variant_name", "seed")}
        for tap, accuracy in modules.items():
            exploded.append({**base, "source": tap, "top1": accuracy,
                             "flops": module_flops.get(tap, math.nan)})
        if run.get("network_top1") is not None and not _is_missing(run.get("network_top1")):
            # The network's own classifier needs none of the attention modules: baseline cost.
            network_flops = run.get("flops_baseline")
            exploded.append({**base, "source": "network classifier", "top1": run["network_top1"],
                             "flops": run["flops"] if _is_missing(network_flops) else network_flops})
        exploded.append({**base, "source": "full model", "top1": run["top1"], "flops": run["flops"]})
    columns = ["dataset", "backbone_label", "variant_name", "source", "n", f"{metric}_mean",
               f"{metric}_std", "flops", "flops_pct_of_full"]
    if not exploded:
        empty = pd.DataFrame(columns=columns)
        empty.attrs.update(metric=metric, kind="early", empty="(no attention runs with per-module accuracy)")
        return empty
    data = pd.DataFrame(exploded)
    data["value"] = 100.0 - data["top1"] if error else data["top1"]
    keys = ["dataset", "backbone_label", "variant_name"]
    grouped = data.groupby([*keys, "source"], sort=False).agg(
        n=("value", "count"), mean=("value", "mean"), std=("value", lambda v: v.std(ddof=1)),
        flops=("flops", "mean"),
    ).reset_index()
    grouped = grouped.rename(columns={"mean": f"{metric}_mean", "std": f"{metric}_std"})
    full = grouped[grouped["source"] == "full model"].set_index(keys)["flops"]
    grouped["flops_pct_of_full"] = [
        row.flops / full.get(tuple(getattr(row, k) for k in keys), math.nan) * 100.0
        for row in grouped.itertuples()
    ]
    order = {"network classifier": 1, "full model": 2}
    grouped["_order"] = grouped["source"].map(order).fillna(0)
    grouped = grouped.sort_values([*keys, "_order", "flops"], kind="stable").drop(columns="_order")
    table = grouped[columns].reset_index(drop=True)
    table.attrs.update(metric=metric, kind="early", selection="final")
    return table


# ---- formatting ---------------------------------------------------------------------------

_HEADERS = {
    "dataset": "Dataset", "backbone_label": "Backbone", "variant_name": "Variant", "variant": "Kind",
    "attention_depth": "AD", "attention_width": "AW", "source": "Classifier", "n": "n",
    "params": "Params", "params_overhead_pct": "Params +%", "flops": "FLOPs",
    "flops_overhead_pct": "FLOPs +%", "images_per_s": "img/s", "flops_pct_of_full": "% of FLOPs",
    "reference_selection": "Paper selection", "reference_source": "Paper source",
}

def _fmt_number(value: Any, digits: int = 2, signed: bool = False) -> str:
    if _is_missing(value):
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_count(value: Any, unit: str) -> str:
    """Parameters in M, FLOPs in G: the units the paper tables use."""
    if _is_missing(value):
        return MISSING
    scale = {"M": 1e6, "G": 1e9}[unit]
    return f"{value / scale:.2f}{unit}"


def _fmt_plain(value: Any) -> str:
    """Option values as written in the recipe: AD 3, not 3.0 (pandas widens a column with gaps)."""
    if _is_missing(value):
        return MISSING
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _fmt_mean_std(mean: Any, std: Any) -> str:
    if _is_missing(mean):
        return MISSING
    return f"{mean:.2f}" if _is_missing(std) else f"{mean:.2f} ± {std:.2f}"


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Display text for each cell: mean ± std, signed gains and overheads, M/G units, "—"."""
    metric = table.attrs.get("metric", "top1")
    label = "Error (%)" if metric == "error" else "Top-1 (%)"
    out = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column in (f"{metric}_std",):
            continue
        header = _HEADERS.get(column, column)
        values = table[column]
        if column == f"{metric}_mean":
            out[label] = [_fmt_mean_std(m, s) for m, s in zip(values, table[f"{metric}_std"])]
        elif column == f"baseline_{metric}":
            out["Baseline"] = [_fmt_number(v) for v in values]
        elif column == "delta_pt":
            out["Δ error (pt)" if metric == "error" else "Gain (pt)"] = [
                _fmt_number(v, signed=True) for v in values]
        elif column in ("params_overhead_pct", "flops_overhead_pct"):
            out[header] = [_fmt_number(v, signed=True) for v in values]
        elif column == "params":
            out[header] = [_fmt_count(v, "M") for v in values]
        elif column == "flops":
            out[header] = [_fmt_count(v, "G") for v in values]
        elif column == "images_per_s":
            out[header] = [MISSING if _is_missing(v) else f"{v:,.0f}" for v in values]
        elif column == "flops_pct_of_full":
            out[header] = [_fmt_number(v, 1) for v in values]
        elif column == f"reference_{metric}":
            out["Paper"] = [_fmt_number(v) for v in values]
        else:
            out[header] = [_fmt_plain(v) for v in values]
    out = out.reset_index(drop=True)
    # Numbers align right, names left: decided by what the column held before it became text.
    text_columns = {_HEADERS.get(c, c) for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])}
    out.attrs["align"] = ["left" if column in text_columns else "right" for column in out.columns]
    return out


def wide_view(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout: one row per group (dataset × backbone), a block of columns per variant.

    Text only (for markdown, LaTeX and terminals); CSV and JSON keep the long numeric table,
    which is what scripts want. Rows stay apart on every grouping column that is not a variant
    option, so ``--by dataset,AD,AW`` is better read in the long layout.
    """
    metric = table.attrs.get("metric", "top1")
    variant_key = "variant_name" if "variant_name" in table else "variant"
    group_keys = [c for c in table.attrs.get("keys", []) if c in table and c not in ("variant", "variant_name")]
    measure = "error" if metric == "error" else "top-1"
    gain = "Δ error" if metric == "error" else "gain"
    with_reference = f"reference_{metric}" in table
    rows: dict[tuple[Any, ...], dict[str, str]] = {}
    variants: list[str] = []
    for _, record in table.iterrows():
        key = tuple(_fmt_plain(record[c]) for c in group_keys)
        row = rows.setdefault(key, {_HEADERS.get(c, c): value for c, value in zip(group_keys, key)})
        name = str(record[variant_key])
        if name not in variants:
            variants.append(name)
        score = _fmt_mean_std(record[f"{metric}_mean"], record[f"{metric}_std"])
        row[f"{name} {measure}"] = f"{score} (n={record['n']})"
        if name != "baseline":
            row[f"{name} {gain}"] = _fmt_number(record["delta_pt"], signed=True)
            row[f"{name} params/FLOPs +%"] = (
                f"{_fmt_number(record['params_overhead_pct'], signed=True)} / "
                f"{_fmt_number(record['flops_overhead_pct'], signed=True)}"
            )
        row[f"{name} img/s"] = MISSING if _is_missing(record["images_per_s"]) else f"{record['images_per_s']:,.0f}"
        if with_reference:
            row[f"{name} paper"] = _fmt_number(record[f"reference_{metric}"])
    ordered = [_HEADERS.get(c, c) for c in group_keys]
    for name in variants:
        ordered += [f"{name} {measure}"] + ([f"{name} paper"] if with_reference else [])
        if name != "baseline":
            ordered += [f"{name} {gain}", f"{name} params/FLOPs +%"]
        ordered += [f"{name} img/s"]
    wide = pd.DataFrame(list(rows.values())).reindex(columns=ordered).fillna(MISSING)
    wide.attrs["align"] = ["left"] * len(group_keys) + ["right"] * (len(ordered) - len(group_keys))
    return wide


def table_note(table: pd.DataFrame) -> str:
    """The one-line legend printed under a table so a reader knows which std and which epoch."""
    selection = table.attrs.get("selection", "final")
    epoch = "best-epoch (selected on the test set, optimistic)" if selection == "best" else "final-epoch"
    measure = "test error (100 − top-1)" if table.attrs.get("metric") == "error" else "test top-1"
    note = f"{epoch} {measure}; mean ± sample std (ddof=1) over seeds, n runs; n=1 shows no ±."
    if "reference_source" in table.columns:
        note += " Paper: the authors' number for the same experiment, with its selection and source."
    return note


def render(table: pd.DataFrame, fmt: str = "markdown", wide: bool = False) -> str:
    """The table as markdown, CSV, LaTeX (booktabs) or JSON text; ``wide``: see ``wide_view``."""
    if fmt not in FORMATS:
        raise FinebenchError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.round(4).to_csv(index=False)
    if fmt == "json":
        return table.round(4).to_json(orient="records", indent=2, force_ascii=False) + "\n"
    text = wide_view(table) if wide and not table.empty else format_table(table)
    if fmt == "markdown":
        if text.empty:
            return table.attrs.get("empty", "(no runs)") + "\n"
        return text.to_markdown(index=False, tablefmt="pipe", disable_numparse=True,
                                colalign=text.attrs["align"]) + "\n"
    return f"% {table_note(table)}\n" + _to_latex(text)


def _to_latex(text: pd.DataFrame) -> str:
    escaped = text.map(_latex_escape)
    escaped.columns = [_latex_escape(c) for c in text.columns]
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        styler = escaped.style.hide(axis="index")
        column_format = "".join("l" if side == "left" else "r" for side in text.attrs["align"])
        latex = styler.to_latex(hrules=True, column_format=column_format)
    return latex


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _latex_escape(cell: Any) -> str:
    text = "".join(_LATEX_SPECIAL.get(char, char) for char in str(cell))
    return text.replace(" ± ", r" $\pm$ ").replace("Δ", r"$\Delta$").replace(MISSING, "--")


def rich_table(text: pd.DataFrame, title: str | None = None, caption: str | None = None) -> Any:
    """A rich Table of formatted cells, for a terminal."""
    from rich.table import Table

    table = Table(title=title, caption=caption, header_style="bold")
    for column, side in zip(text.columns, text.attrs.get("align", ["left"] * len(text.columns))):
        table.add_column(str(column), justify=side)
    for row in text.itertuples(index=False):
        table.add_row(*(str(cell) for cell in row))
    return table


def failed_table(failed: pd.DataFrame) -> pd.DataFrame:
    """Failed runs, formatted for listing apart from the results."""
    text = failed[["recipe", "run_id", "dataset", "backbone_label", "variant_name", "seed",
                   "epochs_completed", "failure_reason"]].copy()
    text.columns = ["Recipe", "Run", "Dataset", "Backbone", "Variant", "Seed", "Epochs", "Reason"]
    return text.astype(object).where(text.notna(), MISSING).astype(str)


# ---- one call for the CLI -----------------------------------------------------------------


class Report(NamedTuple):
    table: pd.DataFrame
    early: pd.DataFrame | None
    loaded: LoadedRuns


def make_report(
    paths: Sequence[str | Path] = ("results",),
    by: Sequence[str] | None = None,
    error: bool = False,
    reference: bool | Sequence[str | Path] = False,
    selection: Literal["final", "best"] = "final",
    early: bool = False,
) -> Report:
    """Load the records and build the tables a ``finebench report`` call asks for."""
    loaded = load_runs(paths)
    reference_table = None
    if reference:
        reference_table = load_reference(None if reference is True else reference)
    table = summary_table(loaded.runs, by=by, error=error, reference=reference_table, selection=selection)
    early_table = early_prediction_table(loaded.runs, error=error) if early else None
    return Report(table, early_table, loaded)


def split_by(values: Sequence[str] | None) -> list[str] | None:
    """``--by dataset,AD --by AW`` → [dataset, AD, AW]: Typer options take one value each."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]
