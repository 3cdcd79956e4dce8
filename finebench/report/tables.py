"""Groups of runs → the numeric tables of the report (CSV and JSON keep them as they are).

A group is the runs that share every setting but the seed and the k-fold held-out fold (see
``records.run_settings``). The rows a reader sees are named by the ``--by`` columns and the variant;
when those names do not tell two configurations apart, both rows stay, a ``setting`` column says
how they differ, and the table's ``notes`` say so.

Conventions, stated once so every output agrees:

- mean, sample std (ddof=1) and the half-width of the 95% Student-t interval are over the runs of
  a group (seeds × folds); a group of one run has no interval.
- the gain is the mean of ``variant − baseline`` over runs paired by (seed, fold), the baseline
  being the ``baseline`` runs with every setting but the variant equal; with its 95% interval and
  a two-sided paired t-test p-value. Runs without a partner are counted as ``unpaired``.
  With ``--error`` the gain is the change in error, so negative is better.
- parameter and FLOP overheads come from each run's own ``params_baseline``/``flops_baseline``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import pandas as pd

from finebench.errors import FinebenchError
from finebench.methods import METHODS
from finebench.methods.baseline import METHOD as BASELINE
from finebench.report.reference import (
    SETTING_COLUMNS,
    describe_reference,
    match_reference,
    protocol_notes,
)
from finebench.report.stats import CONFIDENCE, holm, is_missing, mean_ci, paired_difference
from finebench.terminal import SPEED_MARK
from finebench.train.threads import speed_conditions_differ

DEFAULT_BY: tuple[str, ...] = ("dataset", "backbone_label")
# Short names researchers use for the ablation axes.
COLUMN_ALIASES: dict[str, str] = {
    "AD": "attention_depth",
    "AW": "attention_width",
    "backbone": "backbone_label",
    "fold": "dataset.fold",
}
RULE_VALUES: dict[str, str] = {"final": "top1", "selected": "selected_top1", "best": "best_top1"}
"""Each model-selection rule's run column: the last epoch, the epoch with the best validation top-1
(``train.select = "best_validation"``), the epoch with the best test top-1 (optimistic)."""
_NOT_GROUPABLE = {"module_top1", "module_flops", "settings", "base_settings", "run_dir", "run_id", "size_warnings"}


def resolve_columns(df: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """Grouping names as columns of ``df`` (``AD`` → attention_depth, ``train.lr``); unknown ones are user errors."""
    resolved = []
    for name in by:
        column = COLUMN_ALIASES.get(name, name)
        if column not in df.columns:
            if name in ("fold", "dataset.fold") and "fold" in df.columns:
                column = "fold"
            else:
                options = sorted(set(df.columns) - _NOT_GROUPABLE) + sorted(COLUMN_ALIASES)
                raise FinebenchError(f"--by {name!r}: no such column; expected one of {', '.join(options)}")
        resolved.append(column)
    return resolved


def _unique_or_none(values: pd.Series) -> Any:
    distinct = values.dropna().unique()
    return distinct[0] if len(distinct) == 1 else None


def _pair_key(run: Any) -> tuple[Any, Any]:
    fold = run.get("fold")
    return (int(run["seed"]), None if is_missing(fold) else int(fold))


def _setting_labels(fingerprints: Sequence[str]) -> dict[str, str]:
    """For configurations that share a table row's name: the settings that tell them apart."""
    decoded = [json.loads(f) for f in fingerprints]
    keys = sorted({k for d in decoded for k in d})
    differing = [k for k in keys if len({json.dumps(d.get(k)) for d in decoded}) > 1]
    return {f: ", ".join(f"{k}={d.get(k)}" for k in differing) for f, d in zip(fingerprints, decoded)}


def summary_table(
    df: pd.DataFrame,
    by: Sequence[str] | None = None,
    error: bool = False,
    reference: pd.DataFrame | None = None,
    selection: Literal["final", "best"] = "final",
    speed: bool = False,
) -> pd.DataFrame:
    """One row per configuration: mean, 95% CI, mean per-class accuracy, paired gain, overheads.

    Numbers stay numeric here (CSV and JSON keep them so); ``render.format_table`` makes them text.
    ``selection='best'`` uses the best-epoch test accuracy, the authors' (optimistic) choice. Where
    runs record a validation-selected epoch (``train.select = "best_validation"``) each of the other
    rules gets its own columns beside it (``<rule>_<metric>_mean``/``_ci``, rules in ``RULE_VALUES``;
    ``attrs["rules"]`` lists them), so last epoch, validation-selected and best-on-test read side by side.
    """
    metric = "error" if error else "top1"
    group_by = resolve_columns(df, by or DEFAULT_BY)
    row_keys = list(group_by)
    if "variant" not in row_keys and "variant_name" not in row_keys:
        row_keys.append("variant_name")
    value_column = "best_top1" if selection == "best" else "top1"
    data = df.copy()

    def as_metric(values: pd.Series) -> pd.Series:
        numeric = pd.to_numeric(values, errors="coerce")
        return 100.0 - numeric if error else numeric

    data["value"] = as_metric(data[value_column])
    selected = "selected_top1" in data and pd.to_numeric(data["selected_top1"], errors="coerce").notna().any()
    other_rules = [rule for rule in RULE_VALUES if rule != selection] if selected else []
    # The confusion matrix is saved at the final evaluation only: no per-class figure for the best epoch.
    data["class_value"] = as_metric(data["mean_class_top1"]) if selection == "final" else math.nan
    baselines = data[data["variant"] == BASELINE.kind]
    with_pretraining = "pretraining" in data and data["pretraining"].notna().any()

    notes: list[str] = []
    split_labels: dict[str, str] = {}
    names = data.groupby(row_keys, dropna=False, sort=False)["settings"].unique()
    for key, fingerprints in names.items():
        if len(fingerprints) > 1:
            labels = _setting_labels(list(fingerprints))
            split_labels.update(labels)
            key = key if isinstance(key, tuple) else (key,)
            shown = " / ".join("—" if is_missing(k) else str(k) for k in key)
            differing = sorted({part.split("=")[0] for label in labels.values() for part in label.split(", ")})
            notes.append(f"{shown}: {len(fingerprints)} configurations differ in {', '.join(differing)}; "
                         f"shown as separate rows (add --by {differing[0]} to name them)")
    data["setting"] = data["settings"].map(lambda f: split_labels.get(f, ""))

    rows = []
    folds_seen = False
    size_warnings: dict[str, None] = {}
    for key, group in data.groupby([*row_keys, "settings"], dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(row_keys, key[:-1]))
        if split_labels:
            row["setting"] = group["setting"].iloc[0]
        if with_pretraining:
            row["pretraining"] = joined(group["pretraining"])
        values = group["value"].dropna()
        summary = mean_ci(values)
        folds_seen |= group["fold"].notna().any()
        row["n"] = summary.n
        row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_ci"] = summary.mean, summary.std, summary.half_width
        for rule in other_rules:
            by_rule = mean_ci(as_metric(group[RULE_VALUES[rule]]).dropna())
            row[f"{rule}_{metric}_mean"], row[f"{rule}_{metric}_ci"] = by_rule.mean, by_rule.half_width
        per_class = mean_ci(group["class_value"].dropna())
        row[f"class_{metric}_mean"], row[f"class_{metric}_ci"] = per_class.mean, per_class.half_width
        top5 = mean_ci(pd.to_numeric(group["top5"], errors="coerce").dropna()) if selection == "final" else None
        row["top5_mean"] = top5.mean if top5 is not None else math.nan
        is_baseline = (group["variant"] == BASELINE.kind).all()
        base = baselines[baselines["base_settings"] == group["base_settings"].iloc[0]]
        base_values = base["value"].dropna()
        row[f"baseline_{metric}"] = base_values.mean() if base_values.size else math.nan
        if is_baseline or base.empty:
            row.update(delta_pt=math.nan, delta_ci=math.nan, p_value=math.nan, n_pairs=0,
                       unpaired=0 if is_baseline else int(values.size), significant=False)
        else:
            paired = paired_difference(
                {_pair_key(r): r["value"] for _, r in group.iterrows()},
                {_pair_key(r): r["value"] for _, r in base.iterrows()},
            )
            row.update(delta_pt=paired.mean, delta_ci=paired.half_width, p_value=paired.p_value,
                       n_pairs=paired.n_pairs, unpaired=paired.unpaired, significant=paired.significant)
        row["_family"] = group["base_settings"].iloc[0]
        for column in ("params", "params_overhead_pct", "flops", "flops_overhead_pct"):
            row[column] = pd.to_numeric(group[column], errors="coerce").mean()
        warned = [line for lines in group.get("size_warnings", ()) if isinstance(lines, list) for line in lines]
        row["size_warning"] = bool(warned)  # the method's mechanism cannot act at the run's input size
        size_warnings.update(dict.fromkeys(warned))
        if speed:
            row["images_per_s"] = pd.to_numeric(group["images_per_s"], errors="coerce").mean()
            row["threads"] = "/".join(map(str, sorted({int(t) for used in group["threads_used"]
                                                        if isinstance(used, list) for t in used}))) or math.nan
            row["load_1min"] = pd.to_numeric(group["load_1min"], errors="coerce").mean()
        if reference is not None:
            _add_reference(row, group, reference, metric, selection)
        if with_pretraining:
            row["pretrained_tag"], row["pretrained_sha256"] = joined(group["pretrained_tag"]), joined(group["pretrained_sha256"])
        rows.append(row)
    table = pd.DataFrame(rows)
    corrected = False
    if not table.empty:
        # every variant compared with one baseline is one family of tests: Holm over it
        table["p_holm"] = math.nan
        for _, family in table.groupby("_family", dropna=False, sort=False):
            table.loc[family.index, "p_holm"] = holm(list(family["p_value"]))
            corrected |= int(family["p_value"].notna().sum()) > 1
        # significant: the interval excludes 0 and the family-wise corrected p is below 5%
        table["significant"] = table["significant"].astype(bool) & ~(table["p_holm"] >= 1 - CONFIDENCE)
        table = table.drop(columns="_family")
        if reference is not None and table["reference_top5"].isna().all():
            table = table.drop(columns="reference_top5")
        # The baseline leads its group, as in the paper's tables.
        group_keys = [c for c in row_keys if c not in ("variant", "variant_name")]
        variant_key = "variant_name" if "variant_name" in table else "variant"
        table["_not_baseline"] = (table[variant_key] != BASELINE.kind).astype(int)
        table = table.sort_values([*group_keys, "_not_baseline"], kind="stable", na_position="first")
        table = table.drop(columns="_not_baseline").reset_index(drop=True)
    if reference is not None and not df.empty:
        notes += protocol_notes(reference, df["dataset"].unique())
    mixed = pretraining_note(table["pretraining"]) if with_pretraining and not table.empty else None
    if mixed:
        notes.append(mixed)
    for kind in dict.fromkeys(df["variant"]) if not df.empty else ():
        method = METHODS.get(kind)
        if method is not None and method.shown_prediction:
            notes.append(f"{kind}: top-1 is {method.shown_prediction}; its other predictions: report --predictions.")
    speed_marked = speed and speed_conditions_differ(
        [(used if isinstance(used, list) else [], None if is_missing(load) else float(load))
         for used, load in zip(df["threads_used"], df["load_1min"], strict=True)])
    if speed_marked:
        notes.append(f"img/s{SPEED_MARK}: measured with different thread counts or under a load from other processes "
                     "differing by more than a core; not a comparison of the methods' speed.")
    if (table.get("unpaired", pd.Series(dtype=int)) > 0).any():
        notes.append("unpaired: runs whose seed (and fold) has no partner on the other side; "
                     "left out of the paired gain.")
    table.attrs.update(metric=metric, selection=selection, rules=other_rules, keys=row_keys, notes=notes,
                       folds=bool(folds_seen), speed_marked=speed_marked, holm=corrected,
                       size_warnings=list(size_warnings),
                       reference=None if reference is None else describe_reference(reference))
    return table


NOT_RECORDED = "not recorded"
"""A run record written before runs recorded their pretrained weights."""


def joined(values: pd.Series) -> Any:
    """The distinct values of a group's runs as one cell (``a / b``); ``NOT_RECORDED`` for none."""
    distinct = sorted({str(v) for v in values if not is_missing(v)})
    return " / ".join(distinct) if distinct else NOT_RECORDED


def pretraining_note(pretraining: pd.Series) -> str | None:
    """The caption line of a table whose rows start from weights trained on different data: their
    numbers differ by more than the methods (ImageNet-21k weights add points over ImageNet-1k ones)."""
    counts = pretraining.astype(str).value_counts(sort=False)
    unrecorded = counts.pop(NOT_RECORDED) if NOT_RECORDED in counts else 0
    if len(counts) < 2:
        return (f"Pretraining: {unrecorded} row(s) from records written before runs recorded their weights "
                "(not recorded).") if unrecorded and len(counts) else None
    listed = ", ".join(f"{name} ({count} row{'s' if count > 1 else ''})" for name, count in sorted(counts.items()))
    return (f"Mixed pretraining: the rows start from weights trained on different data ({listed}); "
            "their differences include the pretraining, not only the method."
            + (f" {unrecorded} row(s) do not record theirs." if unrecorded else ""))


def _add_reference(row: dict[str, Any], group: pd.DataFrame, reference: pd.DataFrame, metric: str,
                   selection: Literal["final", "best"]) -> None:
    settings = {c: _unique_or_none(group[c]) for c in ("dataset", "backbone_label", "variant")}
    settings.update({c: _unique_or_none(group[c]) if c in group else None for c in SETTING_COLUMNS.values()})
    match = match_reference(reference, settings, "top1", selection)
    value = math.nan if match is None else float(match["value"])
    row[f"reference_{metric}"] = 100.0 - value if metric == "error" and match is not None else value
    top5 = match_reference(reference, settings, "top5", selection)
    row["reference_top5"] = math.nan if top5 is None else float(top5["value"])
    row["reference_selection"] = None if match is None else match["selection"]
    row["reference_source"] = None if match is None else match["source"]


def _runs_recording(df: pd.DataFrame, column: str) -> Iterator[tuple[pd.Series, dict[str, Any]]]:
    """The runs whose ``column`` holds a non-empty dict (per-module or per-prediction accuracies)."""
    for _, run in df.iterrows():
        recorded = run.get(column)
        if isinstance(recorded, dict) and recorded:
            yield run, recorded


def _empty(columns: list[str], metric: str, kind: str, why: str) -> pd.DataFrame:
    empty = pd.DataFrame(columns=columns)
    empty.attrs.update(metric=metric, kind=kind, empty=why)
    return empty


def _with_values(exploded: list[dict[str, Any]], error: bool) -> pd.DataFrame:
    """One row per run and source, with ``value`` the accuracy (or error) the table summarises."""
    data = pd.DataFrame(exploded)
    data["value"] = 100.0 - data["top1"] if error else data["top1"]
    return data


def _means(data: pd.DataFrame, keys: list[str], metric: str, *, sort: bool,
           also_mean: Sequence[str] = ()) -> pd.DataFrame:
    """Mean ± CI of ``value`` over the runs of each ``keys`` group (and the plain mean of ``also_mean``)."""
    rows = []
    for key, group in data.groupby(keys, sort=sort):
        summary = mean_ci(group["value"])
        rows.append({**dict(zip(keys, key)), "n": summary.n, f"{metric}_mean": summary.mean,
                     f"{metric}_std": summary.std, f"{metric}_ci": summary.half_width,
                     **{column: group[column].mean() for column in also_mean}})
    return pd.DataFrame(rows)


def predictions_table(df: pd.DataFrame, error: bool = False) -> pd.DataFrame:
    """Every prediction a method records (``Method.prediction_labels``) beside the one the summary
    table shows as top-1, mean ± CI over seeds: PMG's heads and their sum, WS-DAN's crop-refined
    prediction. One row per dataset × backbone × variant × prediction."""
    metric = "error" if error else "top1"
    exploded = []
    for run, recorded in _runs_recording(df, "predictions"):
        method = METHODS.get(run["variant"])
        shown = f"top-1 as shown: {method.shown_prediction}" if method and method.shown_prediction else "top-1 as shown"
        labels = dict(method.prediction_labels) if method else {}
        base = {k: run[k] for k in ("dataset", "backbone_label", "variant_name", "settings")}
        exploded.append({**base, "prediction": shown, "order": 0, "top1": run["top1"]})
        for order, (key, value) in enumerate(recorded.items(), start=1):
            exploded.append({**base, "prediction": labels.get(key, key), "order": order, "top1": value})
    columns = ["dataset", "backbone_label", "variant_name", "prediction", "n", f"{metric}_mean", f"{metric}_std",
               f"{metric}_ci"]
    if not exploded:
        return _empty(columns, metric, "predictions", "(no runs of a method with several predictions)")
    data = _with_values(exploded, error)
    keys = ["dataset", "backbone_label", "variant_name", "settings", "order", "prediction"]
    table = _means(data, keys, metric, sort=True)[columns].reset_index(drop=True)
    table.attrs.update(metric=metric, kind="predictions", selection="final")
    return table


def early_prediction_table(df: pd.DataFrame, error: bool = False) -> pd.DataFrame:
    """Each attention module's accuracy alone against the FLOPs needed to reach its tap point.

    Rows come per dataset × backbone × variant, the modules ordered by cost, then the network's own
    classifier and the full (mixed) model, so the saving of an early exit reads off directly.
    """
    metric = "error" if error else "top1"
    exploded = []
    for run, modules in _runs_recording(df, "module_top1"):
        module_flops = run.get("module_flops") if isinstance(run.get("module_flops"), dict) else {}
        base = {k: run[k] for k in ("dataset", "backbone_label", "variant_name", "seed", "settings")}
        for tap, accuracy in modules.items():
            exploded.append({**base, "source": tap, "top1": accuracy,
                             "flops": module_flops.get(tap, math.nan)})
        if not is_missing(run.get("network_top1")):
            # The network's own classifier needs none of the attention modules: baseline cost.
            network_flops = run.get("flops_baseline")
            exploded.append({**base, "source": "network classifier", "top1": run["network_top1"],
                             "flops": run["flops"] if is_missing(network_flops) else network_flops})
        exploded.append({**base, "source": "full model", "top1": run["top1"], "flops": run["flops"]})
    columns = ["dataset", "backbone_label", "variant_name", "source", "n", f"{metric}_mean",
               f"{metric}_std", f"{metric}_ci", "flops", "flops_pct_of_full"]
    if not exploded:
        return _empty(columns, metric, "early", "(no attention runs with per-module accuracy)")
    data = _with_values(exploded, error)
    # As in the summary table: configurations that share a name stay apart, labelled by what differs.
    labels: dict[str, str] = {}
    for _, fingerprints in data.groupby(["dataset", "backbone_label", "variant_name"])["settings"].unique().items():
        if len(fingerprints) > 1:
            labels.update(_setting_labels(list(fingerprints)))
    data["setting"] = data["settings"].map(lambda f: labels.get(f, ""))
    keys = ["dataset", "backbone_label", "variant_name", "setting", "settings"]
    grouped = _means(data, [*keys, "source"], metric, sort=False, also_mean=("flops",))
    full = grouped[grouped["source"] == "full model"].set_index(keys)["flops"]
    grouped["flops_pct_of_full"] = [
        row.flops / full.get(tuple(getattr(row, k) for k in keys), math.nan) * 100.0
        for row in grouped.itertuples()
    ]
    order = {"network classifier": 1, "full model": 2}
    grouped["_order"] = grouped["source"].map(order).fillna(0)
    grouped = grouped.sort_values([*keys, "_order", "flops"], kind="stable").drop(columns="_order")
    if labels:
        columns.insert(3, "setting")
    table = grouped[columns].reset_index(drop=True)
    table.attrs.update(metric=metric, kind="early", selection="final")
    return table
