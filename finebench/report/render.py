"""Numeric tables → text: markdown, CSV, LaTeX (booktabs) and JSON (rich tables for a terminal: ``finebench.terminal``).

CSV and JSON keep every number as a number (mean, std, CI half-width, paired difference, p-value,
significance), which is what scripts want. The text formats merge a mean and its interval into one
cell (``96.50 ± 0.50``), mark a gain whose interval excludes 0 with ``*`` (and img/s measured under
different conditions with ``†``, a score whose method cannot act at its size with ``‡``), and keep headers short;
``table_note`` is the legend that says what every short header and symbol means.
"""

from __future__ import annotations

import math
import warnings as _warnings
from typing import Any

import pandas as pd

from finebench.errors import FinebenchError
from finebench.methods.baseline import METHOD as BASELINE
from finebench.report.stats import is_missing
from finebench.terminal import SPEED_MARK

FORMATS: tuple[str, ...] = ("markdown", "csv", "latex", "json")
MISSING = "—"
SIGNIFICANT = "*"
CANNOT_ACT = "‡"
"""Marks the score of a row whose runs' method cannot act at their input size (``Method.size_warnings``;
``†`` is the speed mark)."""

_HEADERS = {
    "dataset": "Dataset", "backbone_label": "Backbone", "variant_name": "Variant", "variant": "Kind",
    "attention_depth": "AD", "attention_width": "AW", "source": "Classifier", "prediction": "Prediction", "n": "n",
    "setting": "Setting", "params": "Params", "params_overhead_pct": "ΔP%", "flops": "FLOPs",
    "flops_overhead_pct": "ΔF%", "images_per_s": "img/s", "load_1min": "load", "flops_pct_of_full": "% FLOPs",
    "unpaired": "Unpaired", "fold": "Fold", "pretraining": "Pretraining",
}
# Columns merged into another cell or left to CSV/JSON.
_HIDDEN = {"baseline_top1", "baseline_error", "n_pairs", "significant", "delta_ci", "reference_selection",
           "reference_source", "top1_std", "error_std", "top1_ci", "error_ci", "class_top1_ci", "class_error_ci",
           "p_holm", "size_warning", "pretrained_tag", "pretrained_sha256"}


RULE_LABELS = {"final": "last epoch", "selected": "val-selected", "best": "best on test, optimistic"}
"""Column labels of the model-selection rules (``tables.RULE_VALUES``)."""
RULE_NOTES = {
    "final": "the last epoch's weights",
    "selected": ("the weights of the epoch with the best validation top-1 (train.select = best_validation; "
                 "the validation images are held out of training)"),
    "best": "the epoch with the best test top-1 (optimistic: selected on the test set, as official scripts publish)",
}


def fmt_number(value: Any, digits: int = 2, signed: bool = False) -> str:
    if is_missing(value):
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_plain(value: Any) -> str:
    """Option values as written in the recipe: AD 3, not 3.0 (pandas widens a column with gaps)."""
    if is_missing(value):
        return MISSING
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def fmt_mean_ci(mean: Any, half_width: Any) -> str:
    if is_missing(mean):
        return MISSING
    return f"{mean:.2f}" if is_missing(half_width) else f"{mean:.2f} ± {half_width:.2f}"


def fmt_gain(mean: Any, half_width: Any, significant: Any, n_pairs: Any) -> str:
    if is_missing(mean):
        return MISSING
    text = f"{mean:+.2f}" if is_missing(half_width) else f"{mean:+.2f} ± {half_width:.2f}"
    return text + (SIGNIFICANT if bool(significant) else "")


def fmt_p(value: Any) -> str:
    if is_missing(value):
        return MISSING
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def count_formatter(values: pd.Series, unit: str) -> list[str]:
    """Parameters in M, FLOPs in G, with as many decimals as it takes to tell distinct values apart.

    ``0.04G`` against ``0.05G`` says little about two variants: every value keeps three significant
    digits, and the decimals grow (up to 6) until every distinct value in the column reads distinct.
    """
    scale = {"M": 1e6, "G": 1e9}[unit]
    numbers = pd.to_numeric(values, errors="coerce")
    distinct = {round(v / scale, 9) for v in numbers.dropna()}
    smallest = min((abs(v) for v in distinct if v), default=1.0)
    # At least three significant digits of the smallest value (0.0412G, not 0.04G), two decimals at least.
    digits = max(2, 2 - math.floor(math.log10(smallest)))
    while digits < 6 and len({f"{v:.{digits}f}" for v in distinct}) < len(distinct):
        digits += 1
    return [MISSING if is_missing(v) else f"{v / scale:.{digits}f}{unit}" for v in numbers]


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Display text for each cell of a summary or early-prediction table (long layout)."""
    metric = table.attrs.get("metric", "top1")
    label = "Error" if metric == "error" else "Top-1"
    if table.attrs.get("kind") == "predictions":
        label = "Value"  # accuracies, and a method's training statistics (API-Net's pair losses)
    out = pd.DataFrame(index=table.index)
    rules = table.attrs.get("rules") or []
    for column in table.columns:
        if column in _HIDDEN or any(column == f"{rule}_{metric}_ci" for rule in rules):
            continue
        values = table[column]
        header = _HEADERS.get(column, column)
        rule = next((rule for rule in rules if column == f"{rule}_{metric}_mean"), None)
        if column == f"{metric}_mean":
            shown = f"{label} ({RULE_LABELS[table.attrs.get('selection', 'final')]})" if rules else label
            out[shown] = [fmt_mean_ci(m, c) + cannot_act_mark(table, index)
                          for index, m, c in zip(table.index, values, table.get(f"{metric}_ci", values * math.nan))]
        elif rule is not None:
            out[f"{label} ({RULE_LABELS[rule]})"] = [fmt_mean_ci(m, c) for m, c in zip(values, table[f"{rule}_{metric}_ci"])]
        elif column == f"class_{metric}_mean":
            if values.isna().all():
                continue  # records from before confusion matrices were saved
            out["Class"] = [fmt_mean_ci(m, c) for m, c in zip(values, table[f"class_{metric}_ci"])]
        elif column == "top5_mean":
            if "reference_top5" in table:
                out["Top-5"] = [fmt_number(v) for v in values]
        elif column == "delta_pt":
            out["ΔErr" if metric == "error" else "Gain"] = [
                fmt_gain(m, c, s, n) for m, c, s, n in
                zip(values, table["delta_ci"], table["significant"], table["n_pairs"])]
        elif column == "p_value":
            out["p"] = [fmt_p(v) for v in table.get("p_holm", values)]
        elif column == "unpaired":
            if (pd.to_numeric(values, errors="coerce").fillna(0) > 0).any():
                out[header] = [fmt_plain(v) for v in values]
        elif column in ("params_overhead_pct", "flops_overhead_pct"):
            out[header] = [fmt_number(v, signed=True) for v in values]
        elif column == "params":
            out[header] = count_formatter(values, "M")
        elif column == "flops":
            out[header] = count_formatter(values, "G")
        elif column == "images_per_s":
            out[header] = [speed_cell(v, table) for v in values]
        elif column == "load_1min":
            out[header] = [fmt_number(v, 1) for v in values]
        elif column == "flops_pct_of_full":
            out[header] = [fmt_number(v, 1) for v in values]
        elif column == f"reference_{metric}":
            out["Paper"] = [fmt_number(v) for v in values]
        elif column == "reference_top5":
            out["Paper top-5"] = [fmt_number(v) for v in values]
        else:
            out[header] = [fmt_plain(v) for v in values]
    out = out.reset_index(drop=True)
    # Numbers align right, names left: decided by what the column held before it became text.
    text_columns = {_HEADERS.get(c, c) for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])}
    out.attrs["align"] = ["left" if column in text_columns else "right" for column in out.columns]
    return out


def wide_view(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout: one row per group (dataset × backbone), a block of columns per variant.

    Text only (for markdown, LaTeX and terminals); CSV and JSON keep the long numeric table.
    """
    metric = table.attrs.get("metric", "top1")
    variant_key = "variant_name" if "variant_name" in table else "variant"
    group_keys = [c for c in table.attrs.get("keys", []) if c in table and c not in ("variant", "variant_name")]
    if "setting" in table:
        group_keys.append("setting")
    if "pretraining" in table:  # the weights one dataset × backbone row starts from, whatever the variant
        group_keys.append("pretraining")
    measure = "error" if metric == "error" else "top-1"
    gain = "Δerr" if metric == "error" else "gain"
    with_reference = f"reference_{metric}" in table
    with_speed = "images_per_s" in table
    rules = table.attrs.get("rules") or []
    main_rule = f" ({RULE_LABELS[table.attrs.get('selection', 'final')]})" if rules else ""
    rows: dict[tuple[Any, ...], dict[str, str]] = {}
    variants: list[str] = []
    for _, record in table.iterrows():
        key = tuple(fmt_plain(record[c]) for c in group_keys)
        row = rows.setdefault(key, {_HEADERS.get(c, c): value for c, value in zip(group_keys, key)})
        name = str(record[variant_key])
        if name not in variants:
            variants.append(name)
        score = fmt_mean_ci(record[f"{metric}_mean"], record[f"{metric}_ci"])
        row[f"{name} {measure}{main_rule}"] = f"{score} (n={record['n']}){cannot_act_mark(table, record.name)}"
        for rule in rules:
            row[f"{name} {measure} ({RULE_LABELS[rule]})"] = fmt_mean_ci(record[f"{rule}_{metric}_mean"],
                                                                         record[f"{rule}_{metric}_ci"])
        row[f"{name} class"] = fmt_mean_ci(record[f"class_{metric}_mean"], record[f"class_{metric}_ci"])
        if name != BASELINE.kind:
            row[f"{name} {gain}"] = fmt_gain(record["delta_pt"], record["delta_ci"], record["significant"],
                                             record["n_pairs"])
            row[f"{name} p"] = fmt_p(record.get("p_holm", record["p_value"]))
            row[f"{name} ΔP/ΔF%"] = (f"{fmt_number(record['params_overhead_pct'], signed=True)} / "
                                     f"{fmt_number(record['flops_overhead_pct'], signed=True)}")
        if with_speed:
            row[f"{name} img/s"] = speed_cell(record["images_per_s"], table)
        if with_reference:
            row[f"{name} paper"] = fmt_number(record[f"reference_{metric}"])
    ordered = [_HEADERS.get(c, c) for c in group_keys]
    for name in variants:
        ordered += [f"{name} {measure}{main_rule}", *(f"{name} {measure} ({RULE_LABELS[rule]})" for rule in rules),
                    f"{name} class"] + ([f"{name} paper"] if with_reference else [])
        if name != BASELINE.kind:
            ordered += [f"{name} {gain}", f"{name} p", f"{name} ΔP/ΔF%"]
        if with_speed:
            ordered += [f"{name} img/s"]
    wide = pd.DataFrame(list(rows.values())).reindex(columns=ordered).fillna(MISSING)
    wide.attrs["align"] = ["left"] * len(group_keys) + ["right"] * (len(ordered) - len(group_keys))
    return wide


def cannot_act_mark(table: pd.DataFrame, index: Any) -> str:
    """``CANNOT_ACT`` where the row's method cannot act at its runs' input size; ``table_note`` says why."""
    return CANNOT_ACT if "size_warning" in table and bool(table.at[index, "size_warning"]) else ""


def speed_cell(images_per_s: Any, table: pd.DataFrame) -> str:
    """img/s, marked (``SPEED_MARK``) where the table's speeds were measured under different threads or load."""
    if is_missing(images_per_s):
        return MISSING
    return f"{images_per_s:,.0f}" + (SPEED_MARK if table.attrs.get("speed_marked") else "")


def table_note(table: pd.DataFrame) -> str:
    """The legend printed under a table: which epoch, which interval, which test, what each short header means."""
    if table.attrs.get("kind") == "predictions":
        return ("final-epoch test accuracy (%) of each prediction the method records, and the statistics it "
                "records of its last training epoch; mean ± 95% CI half-width (Student t, n−1 df) over seeds; "
                "the first row of each variant is the summary table's top-1.")
    if table.attrs.get("kind") == "early":
        return ("final-epoch test accuracy of each classifier alone; mean ± 95% CI half-width (Student t, "
                "n−1 df) over seeds; % FLOPs: cost of reaching that classifier relative to the full model.")
    selection = table.attrs.get("selection", "final")
    epoch = "best-epoch (selected on the test set, optimistic)" if selection == "best" else "final-epoch"
    measure = "test error (100 − top-1)" if table.attrs.get("metric") == "error" else "test top-1"
    over = "seeds × folds (k-fold: every held-out fold pooled)" if table.attrs.get("folds") else "seeds"
    rules = table.attrs.get("rules") or []
    lines = [
        f"{epoch} {measure}, %; mean ± 95% CI half-width (Student t, n−1 df) over {over}; n runs; n=1 has no CI.",
        *([f"One column per model-selection rule, each the test {'error' if table.attrs.get('metric') == 'error' else 'top-1'} of "
           + "; ".join(f"({RULE_LABELS[rule]}) {RULE_NOTES[rule]}" for rule in [selection, *rules])
           + ". Gain and p compare the "
           + RULE_LABELS[selection] + " column."] if rules else []),
        "Class: mean per-class accuracy from the confusion matrix of the final evaluation."
        if selection == "final" else "Class: not available for the best epoch (confusion matrix saved at the final evaluation only).",
        ("Gain: mean paired difference from the baseline with the same settings, runs paired by seed"
         + (" and fold" if table.attrs.get("folds") else "") + ", ± 95% CI; p: two-sided paired t-test "
         "(scipy.stats.ttest_rel)"
         + (", Holm-corrected over the variants compared with one baseline (uncorrected: p_value in CSV/JSON)"
            if table.attrs.get("holm") else "")
         + f"; {SIGNIFICANT}: the CI excludes 0"
         + (" and the corrected p < 0.05" if table.attrs.get("holm") else "")
         + ". ΔP%/ΔF%: parameter/FLOP overhead over the plain backbone."),
    ]
    if any(c.startswith("reference_") for c in table.columns):
        which = "best epoch" if selection == "best" else "last epoch"
        source = table.attrs.get("reference") or "the reference tables"
        shown = pd.to_numeric(table.get(f"reference_{table.attrs.get('metric', 'top1')}"), errors="coerce")
        if shown is not None and shown.notna().any():
            lines.append(f"Paper: the {which}'s value from {source}, shown only where it states every setting "
                         "of the row (source per row in CSV/JSON).")
        else:
            lines.append(f"Paper: no {which}'s value from {source} states every setting of a row here.")
    lines += table.attrs.get("notes", [])
    if table.attrs.get("size_warnings"):
        lines.append(f"{CANNOT_ACT}: a method's mechanism cannot act at the configured size; its runs warned:")
        lines += [f"  {line}" for line in table.attrs["size_warnings"]]
    return "\n".join(lines)


def render(table: pd.DataFrame, fmt: str = "markdown", wide: bool = False) -> str:
    """The table as markdown, CSV, LaTeX (booktabs) or JSON text; ``wide``: see ``wide_view``."""
    if fmt not in FORMATS:
        raise FinebenchError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.round(6).to_csv(index=False)
    if fmt == "json":
        return table.round(6).to_json(orient="records", indent=2, force_ascii=False) + "\n"
    text = wide_view(table) if wide and not table.empty else format_table(table)
    if fmt == "markdown":
        if text.empty:
            return table.attrs.get("empty", "(no finished runs)") + "\n"
        return text.to_markdown(index=False, tablefmt="pipe", disable_numparse=True,
                                colalign=text.attrs["align"]) + "\n"
    note = "\n".join(f"% {line}" for line in table_note(table).splitlines())
    return f"{note}\n" + _to_latex(text)


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
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                  "<": r"$<$", ">": r"$>$", CANNOT_ACT: r"$^{\ddagger}$"}


def _latex_escape(cell: Any) -> str:
    raw = str(cell)
    mark = next((m for m in (SIGNIFICANT, SPEED_MARK) if raw.endswith(m) and raw != m), "")
    text = "".join(_LATEX_SPECIAL.get(char, char) for char in (raw[:-1] if mark else raw))
    text = text.replace(" ± ", r" $\pm$ ").replace("Δ", r"$\Delta$").replace(MISSING, "--")
    return text + {SIGNIFICANT: r"$^{*}$", SPEED_MARK: r"$^{\dagger}$", "": ""}[mark]


def failed_table(failed: pd.DataFrame) -> pd.DataFrame:
    """Failed runs, formatted for listing apart from the results."""
    text = failed[["recipe", "run_id", "dataset", "backbone_label", "variant_name", "seed",
                   "epochs_completed", "failure_reason"]].copy()
    text.columns = ["Recipe", "Run", "Dataset", "Backbone", "Variant", "Seed", "Epochs", "Reason"]
    return text.astype(object).where(text.notna(), MISSING).astype(str)


STATE_NOTES: dict[str, str] = {
    "running": "running",
    "resumable": "resumable (stopped; rerunning its recipe goes on from the last saved epoch)",
    "new": "new (stopped before its first checkpoint; rerunning its recipe starts it from epoch 1)",
}
"""How each unfinished run's state (``RunState.kind``, the word ``run --dry-run`` shows) reads in the report."""


def running_lines(running: pd.DataFrame) -> list[str]:
    """One line per unfinished run: where it is, its state, epochs done and its latest test top-1."""
    lines = []
    for row in running.itertuples(index=False):
        fold = "" if is_missing(row.fold) else f" fold {fmt_plain(row.fold)}"
        last = "" if is_missing(row.last_top1) else f", last test top-1 {row.last_top1:.2f}"
        state = STATE_NOTES.get(row.state, row.state) if is_missing(row.problem) else f"{row.state} ({row.problem})"
        lines.append(f"{row.recipe}/{row.run_id} {row.dataset} {row.backbone_label} {row.variant_name} "
                     f"seed {row.seed}{fold}: {state}, epoch {fmt_plain(row.epochs_completed)}/"
                     f"{fmt_plain(row.epochs)} done{last}")
    return lines
