"""``report --reproduce``: can a published number be reproduced? Each reference number (the paper's,
the official code's, a re-implementation's) beside finebench's mean ± 95% CI under the same
model-selection rule, their difference, and whether the reference lies inside finebench's interval.

A number an official script published keeps the epoch with the best test accuracy (TransFG, PIM,
IELT, ...): it is compared with finebench's best-on-test column, never with the last epoch, which
would make every paper look unreproducible by the optimism of its selection alone. A last-epoch
reference is compared with the last epoch. References match runs by the rule of ``reference``
(dataset, backbone, method, every stated setting); unlike the summary's Paper column, a reference
with another training protocol is shown too, its protocol beside it: that difference is what a
reader must weigh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from finebench.errors import FinebenchError
from finebench.report.reference import (
    DEFAULT_REFERENCE_DIR,
    SETTING_COLUMNS,
    SOURCE_KINDS,
    load_reference,
    stating,
)
from finebench.report.render import MISSING, RULE_LABELS, fmt_mean_ci, fmt_number
from finebench.report.stats import CONFIDENCE, is_missing, mean_ci
from finebench.report.tables import NOT_RECORDED, joined, pretraining_note

RULES: dict[str, tuple[str, str]] = {"best-epoch": ("best", "best_top1"), "last-epoch": ("final", "top1")}
"""A reference's selection → (finebench's rule, the run column holding its test top-1)."""
KIND_LABELS: dict[str, str] = {"paper": "Paper", "official-code": "Official code", "reimplementation": "Reimpl."}
UNVERIFIED = "?"
"""Marks a reference whose source or note says it is unverified (not re-read from its source)."""
_KEYS = ("dataset", "backbone_label", "variant_name")


def _unique(values: pd.Series) -> Any:
    distinct = values.dropna().unique()
    return distinct[0] if len(distinct) == 1 else None


def _unverified(reference: pd.Series) -> bool:
    return any("unverified" in str(reference.get(column) or "").lower() for column in ("source", "note"))


def reproduction_table(runs: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration × selection rule that a reference number states: finebench's mean,
    CI and n under that rule, then per source kind the reference value, ``_diff`` (finebench −
    reference), ``_inside`` (the reference within finebench's 95% interval; None without an
    interval), ``_source``, ``_protocol`` and ``_unverified``. Several numbers of one kind take one
    row each."""
    rows: list[dict[str, Any]] = []
    unmatched = 0
    with_pretraining = "pretraining" in runs and runs["pretraining"].notna().any()
    for _, group in runs.groupby([*_KEYS, "settings"], dropna=False, sort=True):
        settings = {column: _unique(group[column]) for column in ("dataset", "backbone_label", "variant")}
        settings.update({c: _unique(group[c]) if c in group else None for c in SETTING_COLUMNS.values()})
        found = stating(reference, settings, "top1", names=[str(group["variant_name"].iloc[0])])
        if found.empty:
            unmatched += 1
            continue
        _check_kinds(found)
        for selection, (rule, column) in RULES.items():
            chosen = found[found["selection"] == selection]
            if chosen.empty:
                continue
            summary = mean_ci(pd.to_numeric(group[column], errors="coerce").dropna())
            by_kind = {kind: chosen[chosen["source_kind"] == kind] for kind in SOURCE_KINDS}
            for index in range(max(len(numbers) for numbers in by_kind.values())):
                row: dict[str, Any] = {key: group[key].iloc[0] for key in _KEYS}
                if with_pretraining:
                    row["pretraining"] = joined(group["pretraining"])
                row.update(rule=rule, n=summary.n, top1_mean=summary.mean, top1_ci=summary.half_width)
                for kind, numbers in by_kind.items():
                    row.update(_compared(kind, numbers.iloc[index] if index < len(numbers) else None, summary))
                rows.append(row)
    table = pd.DataFrame(rows)
    kinds = [kind for kind in SOURCE_KINDS if not table.empty and table[kind].notna().any()]
    if not table.empty:  # a kind no row has leaves no empty columns
        table = table.drop(columns=[c for kind in SOURCE_KINDS if kind not in kinds
                                    for c in table.columns if c == kind or c.startswith(f"{kind}_")])
    table.attrs.update(kinds=kinds, unmatched=unmatched,
                       mixed=pretraining_note(table["pretraining"]) if "pretraining" in table and len(table) else None)
    return table


def _check_kinds(found: pd.DataFrame) -> None:
    """A reference row placed beside a run must say what kind of number it is."""
    missing = found[found["source_kind"].isna()]
    if not missing.empty:
        first = missing.iloc[0]
        raise FinebenchError(f"reference table {first['reference_path']}, line {first['reference_line']}: source_kind "
                             f"is empty; expected {' or '.join(SOURCE_KINDS)}")


def _compared(kind: str, reference: pd.Series | None, summary: Any) -> dict[str, Any]:
    if reference is None:
        return {kind: math.nan, f"{kind}_diff": math.nan, f"{kind}_inside": None, f"{kind}_source": None,
                f"{kind}_protocol": None, f"{kind}_unverified": False}
    value = float(reference["value"])
    inside = None if is_missing(summary.half_width) else bool(abs(summary.mean - value) <= summary.half_width)
    return {kind: value, f"{kind}_diff": summary.mean - value, f"{kind}_inside": inside,
            f"{kind}_source": reference["source"], f"{kind}_protocol": reference.get("protocol"),
            f"{kind}_unverified": _unverified(reference)}


def format_reproduction(table: pd.DataFrame) -> pd.DataFrame:
    """Display text: finebench's mean ± CI (n) under the rule, then per kind the value, Δ and whether
    it lies inside the interval."""
    if table.empty:
        return pd.DataFrame({"Dataset": [], "Backbone": [], "Variant": [], "finebench": []})
    shown = pd.DataFrame(index=table.index)
    shown["Dataset"], shown["Backbone"], shown["Variant"] = table["dataset"], table["backbone_label"], table["variant_name"]
    if "pretraining" in table:
        shown["Pretraining"] = table["pretraining"].fillna(NOT_RECORDED)
    shown["Rule"] = [RULE_LABELS[rule] for rule in table["rule"]]
    shown["finebench"] = [f"{fmt_mean_ci(m, c)} (n={n})" for m, c, n in
                          zip(table["top1_mean"], table["top1_ci"], table["n"])]
    for kind in table.attrs.get("kinds", []):
        label = KIND_LABELS[kind]
        shown[label] = [fmt_number(v) + (UNVERIFIED if flag and not is_missing(v) else "")
                        for v, flag in zip(table[kind], table[f"{kind}_unverified"])]
        shown[f"Δ {label.lower()}"] = [fmt_number(v, signed=True) for v in table[f"{kind}_diff"]]
        shown[f"{label} in CI"] = [MISSING if inside is None or is_missing(inside) else ("yes" if inside else "no")
                                   for inside in table[f"{kind}_inside"]]
    return shown.reset_index(drop=True).astype(str)


def reproduction_reference(paths: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """The reference numbers ``--reproduce`` compares with: ``paths``, else every table shipped in
    ``results/reference/`` (the authors' logs) and ``results/reference/papers/`` (papers, official
    code, re-implementations)."""
    if paths:
        return load_reference(paths)
    root = DEFAULT_REFERENCE_DIR if DEFAULT_REFERENCE_DIR.is_dir() else Path("results") / "reference"
    return load_reference([root, root / "papers"])


def reproduction_caption(table: pd.DataFrame) -> str:
    lines = [
        (f"finebench: test top-1 (%), mean ± {CONFIDENCE:.0%} CI half-width (Student t, n−1 df) over seeds, under "
         "the reference's selection rule: a best-epoch reference (official scripts keep the epoch with the best "
         f"test accuracy) is compared with finebench's '{RULE_LABELS['best']}' column, a last-epoch one with the "
         "last epoch."),
        ("Δ: finebench − reference (negative: finebench below it); in CI: the reference lies inside finebench's "
         f"interval ({MISSING} with one run: no interval). Official code: the authors' released code, run by them "
         "(their logs) or by others (FGVCLib's table); Reimpl.: another library's re-implementation or a port."),
        (f"{UNVERIFIED}: the reference's source says the number was not re-read from it. A reference's training "
         "protocol may differ from the recipe's; source and protocol per row in CSV/JSON."),
    ]
    if table.attrs.get("unmatched"):
        lines.append(f"{table.attrs['unmatched']} configuration(s) without a reference number that states their "
                     "settings are not shown.")
    if table.attrs.get("mixed"):
        lines.append(table.attrs["mixed"])
    return "\n".join(lines)
