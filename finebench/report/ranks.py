"""Methods compared across datasets: average ranks, the Friedman test and the critical difference.

A gain on one dataset says little about a method; a claim that it is better in general needs
several datasets, and accuracies of different datasets are not on one scale (a point on CIFAR-10 is
not a point on CUB). Demšar (JMLR 7, 2006) compares methods by their rank on each dataset instead:
the average rank over datasets, the Friedman test of "every method ranks alike" (with Iman and
Davenport's F form, which Demšar recommends as less conservative) and, after it, the Nemenyi
critical difference: two methods whose average ranks differ by less are not told apart at 5%.
The statistics are scipy's (``rankdata``, ``friedmanchisquare``, ``f``, ``studentized_range``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from finebench.errors import FinebenchError
from finebench.report.stats import mean_ci
from finebench.report.tables import joined, pretraining_note

ALPHA = 0.05


class Ranks(NamedTuple):
    table: pd.DataFrame
    """One row per method: mean ± CI on each dataset, its rank there, the average rank, cost."""
    average_ranks: pd.Series
    """Average rank per method over the datasets every method ran on (1 = best), best first."""
    datasets: list[str]
    """The datasets the ranks use: those where every method has a finished run."""
    left_out: list[str]
    """Datasets left out of the ranks because a method has no run there."""
    friedman_chi2: float
    friedman_p: float
    iman_davenport_f: float
    iman_davenport_p: float
    critical_difference: float
    """Nemenyi's critical difference at ``ALPHA`` for this many methods and datasets."""


def method_label(runs: pd.DataFrame) -> pd.Series:
    """A method is a variant on a backbone; the backbone is named only when the runs use several."""
    if runs["backbone_label"].nunique(dropna=True) > 1:
        return runs["backbone_label"].astype(str) + " " + runs["variant_name"].astype(str)
    return runs["variant_name"].astype(str)


def nemenyi_critical_difference(methods: int, datasets: int, alpha: float = ALPHA) -> float:
    """Demšar's eq. for CD: q_alpha * sqrt(k (k + 1) / (6 N)), q_alpha the studentized range over sqrt 2."""
    q_alpha = stats.studentized_range.ppf(1 - alpha, methods, np.inf) / math.sqrt(2)
    return float(q_alpha * math.sqrt(methods * (methods + 1) / (6 * datasets)))


def rank_methods(runs: pd.DataFrame, error: bool = False) -> Ranks:
    """Ranks of every method over the datasets in ``runs`` (finished runs as ``load_runs`` gives them)."""
    if runs.empty:
        raise FinebenchError("report --ranks: no finished runs to rank")
    data = runs.assign(method=method_label(runs), value=pd.to_numeric(runs["top1"], errors="coerce"))
    if error:
        data["value"] = 100.0 - data["value"]
    means = data.groupby(["method", "dataset"])["value"].mean().unstack("dataset")
    methods, all_datasets = list(means.index), list(means.columns)
    if len(methods) < 3:
        raise FinebenchError(f"report --ranks: {len(methods)} method(s) ({', '.join(methods)}); the Friedman test "
                             "compares at least 3 methods")
    complete = [name for name in all_datasets if means[name].notna().all()]
    left_out = [name for name in all_datasets if name not in complete]
    if len(complete) < 2:
        raise FinebenchError(f"report --ranks: {len(complete)} dataset(s) where all {len(methods)} methods have a "
                             f"finished run ({', '.join(complete) or 'none'}); ranks across datasets need at least 2"
                             + (f" (left out: {', '.join(left_out)})" if left_out else ""))
    scores = means[complete].to_numpy(dtype=float)  # methods x datasets
    # rank 1 is the best: the highest accuracy, or the lowest error; ties share the mean rank
    ranks = np.column_stack([stats.rankdata(scores[:, j] if error else -scores[:, j]) for j in range(len(complete))])
    average = pd.Series(ranks.mean(axis=1), index=methods).sort_values(kind="stable")
    k, n = len(methods), len(complete)
    if np.all(scores == scores[:1]):  # every method scores alike on every dataset: nothing to test
        chi2, p_chi2 = 0.0, 1.0
    else:
        chi2, p_chi2 = (float(v) for v in stats.friedmanchisquare(*scores))
    # Iman and Davenport's F form of the same statistic (Demšar, eq. after (2)), k - 1 and (k - 1)(N - 1) df
    f_value = (n - 1) * chi2 / (n * (k - 1) - chi2) if n * (k - 1) != chi2 else math.inf
    p_f = float(stats.f.sf(f_value, k - 1, (k - 1) * (n - 1))) if math.isfinite(f_value) else 0.0
    with_pretraining = "pretraining" in data and data["pretraining"].notna().any()
    rows = []
    for method in average.index:
        row: dict[str, object] = {"method": method, "average_rank": float(average[method])}
        own = data[data["method"] == method]
        for j, dataset in enumerate(complete):
            summary = mean_ci(own.loc[own["dataset"] == dataset, "value"].dropna())
            row[f"{dataset}_mean"], row[f"{dataset}_ci"], row[f"{dataset}_n"] = summary.mean, summary.half_width, summary.n
            row[f"{dataset}_rank"] = float(ranks[methods.index(method), j])
        for column in ("params_overhead_pct", "flops_overhead_pct"):
            row[column] = pd.to_numeric(own[column], errors="coerce").mean()
        if with_pretraining:
            row["pretraining"] = joined(own[own["dataset"].isin(complete)]["pretraining"])
        rows.append(row)
    table = pd.DataFrame(rows)
    critical = nemenyi_critical_difference(k, n)
    table.attrs.update(metric="error" if error else "top1", datasets=complete, left_out=left_out,
                       mixed=pretraining_note(table["pretraining"]) if with_pretraining else None)
    return Ranks(table, average, complete, left_out, chi2, p_chi2, f_value, p_f, critical)


def ranks_caption(result: Ranks, error: bool = False) -> str:
    """What the ranks table rests on, in words for its caption."""
    metric = "error (lower is better)" if error else "top-1 accuracy (higher is better)"
    text = (f"Average rank of {len(result.average_ranks)} methods over {len(result.datasets)} datasets "
            f"({', '.join(result.datasets)}), ranked by mean {metric} over seeds, 1 = best, ties share ranks. "
            f"Friedman chi2 = {result.friedman_chi2:.2f}, p = {result.friedman_p:.3g}; Iman-Davenport "
            f"F = {result.iman_davenport_f:.2f}, p = {result.iman_davenport_p:.3g}. Nemenyi critical difference "
            f"at {ALPHA:g}: {result.critical_difference:.2f} ranks (Demšar 2006).")
    if result.left_out:
        text += f" Left out (a method has no finished run there): {', '.join(result.left_out)}."
    if result.table.attrs.get("mixed"):
        text += f" {result.table.attrs['mixed']}"
    return text


def format_ranks(result: Ranks) -> pd.DataFrame:
    """The ranks table as text cells: mean ± CI (rank) per dataset, the average rank, the overheads."""
    shown = pd.DataFrame({"Method": result.table["method"], "Avg rank": result.table["average_rank"].map("{:.2f}".format)})
    for dataset in result.datasets:
        cells = []
        for _, row in result.table.iterrows():
            mean, ci, rank = row[f"{dataset}_mean"], row[f"{dataset}_ci"], row[f"{dataset}_rank"]
            interval = "" if math.isnan(ci) else f" ± {ci:.2f}"
            cells.append(f"{mean:.2f}{interval} ({rank:g})")
        shown[dataset] = cells
    for column, title in (("params_overhead_pct", "Params +%"), ("flops_overhead_pct", "FLOPs +%")):
        shown[title] = result.table[column].map(lambda v: "—" if math.isnan(v) else f"{v:+.1f}")
    if "pretraining" in result.table:
        shown["Pretraining"] = result.table["pretraining"]
    return shown


def cliques(average: pd.Series, critical: float) -> list[list[str]]:
    """Maximal runs of methods (in rank order) whose average ranks lie within the critical difference."""
    names, values = list(average.index), list(average.to_numpy())
    groups: list[list[str]] = []
    for start in range(len(names)):
        end = start
        while end + 1 < len(names) and values[end + 1] - values[start] < critical:
            end += 1
        if end > start and not any(start >= g0 and end <= g1 for g0, g1 in ((names.index(g[0]), names.index(g[-1]))
                                                                            for g in groups)):
            groups.append(names[start:end + 1])
    return groups
