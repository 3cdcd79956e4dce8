"""Comparisons across many variants and datasets: Holm's correction of the gains' p-values, average
ranks with the Friedman test and the Nemenyi critical difference (``report --ranks``), each checked
against scipy or statsmodels on the same numbers and against Demšar's (JMLR 2006) published table."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from test_report import write_run

from finebench import report
from finebench.errors import FinebenchError
from finebench.report.ranks import cliques, nemenyi_critical_difference, rank_methods
from finebench.report.stats import holm

# top-1 of three methods on three datasets, two seeds each: the means rank A > B > C on cifar10 and
# cub200, and B > A > C on dogs
SCORES = {
    "cifar10": {"baseline": (90.0, 90.4), "attention": (92.0, 92.2), "se": (91.0, 91.4)},
    "cub200": {"baseline": (80.0, 80.2), "attention": (83.0, 83.4), "se": (81.0, 81.0)},
    "dogs": {"baseline": (70.0, 70.4), "attention": (71.0, 71.2), "se": (72.0, 72.6)},
}


def three_by_three(root: Path) -> Path:
    for dataset, methods in SCORES.items():
        for variant, values in methods.items():
            for seed, top1 in enumerate(values):
                write_run(root, variant=variant, variant_name=variant, seed=seed, top1=top1, dataset=dataset,
                          recipe=f"peers_{dataset}")
    return root


def two_by_two(root: Path) -> Path:
    """Two methods (baseline, se) on two datasets: one method short of a Friedman test."""
    for dataset in ("cifar10", "cub200"):
        for variant in ("baseline", "se"):
            write_run(root, variant=variant, variant_name=variant, seed=0, top1=90.0, dataset=dataset,
                      recipe=f"r_{dataset}")
    return root


@pytest.mark.parametrize("seed", range(5))
def test_holm_equals_statsmodels(seed: int) -> None:
    p_values = np.random.default_rng(seed).uniform(0, 0.2, size=6)
    expected = multipletests(p_values, method="holm")[1]
    assert holm(list(p_values)) == pytest.approx(list(expected), rel=1e-12)
    with_missing = holm([p_values[0], math.nan, p_values[1]])
    assert math.isnan(with_missing[1])
    assert [with_missing[0], with_missing[2]] == pytest.approx(list(multipletests(p_values[:2], method="holm")[1]))


def test_average_ranks_and_friedman_equal_scipy(tmp_path: Path) -> None:
    runs = report.load_runs([three_by_three(tmp_path / "results")]).runs
    result = rank_methods(runs)
    means = {d: {m: float(np.mean(v)) for m, v in methods.items()} for d, methods in SCORES.items()}
    order = ["attention", "baseline", "se"]
    matrix = np.array([[means[d][m] for d in SCORES] for m in order])
    ranks = np.column_stack([stats.rankdata(-matrix[:, j]) for j in range(3)])
    assert dict(result.average_ranks) == pytest.approx(dict(zip(order, ranks.mean(axis=1))))
    assert list(result.average_ranks.index) == ["attention", "se", "baseline"]  # best first
    chi2, p_value = stats.friedmanchisquare(*matrix)
    assert (result.friedman_chi2, result.friedman_p) == pytest.approx((chi2, p_value))
    k, n = 3, 3
    assert result.iman_davenport_f == pytest.approx((n - 1) * chi2 / (n * (k - 1) - chi2))
    assert result.iman_davenport_p == pytest.approx(stats.f.sf(result.iman_davenport_f, k - 1, (k - 1) * (n - 1)))
    # the error ranks are the same ranks (lower error is better)
    assert dict(rank_methods(runs, error=True).average_ranks) == pytest.approx(dict(result.average_ranks))


def test_critical_difference_uses_demsars_q_values() -> None:
    """Demšar (2006), Table 5(a): q_0.05 = 2.343 for 3 classifiers, 3.164 for 10."""
    assert nemenyi_critical_difference(3, 3) == pytest.approx(2.343 * math.sqrt(3 * 4 / (6 * 3)), abs=1e-3)
    assert nemenyi_critical_difference(10, 14) == pytest.approx(3.164 * math.sqrt(10 * 11 / (6 * 14)), abs=1e-3)


def test_cliques_join_methods_within_the_critical_difference() -> None:
    import pandas as pd

    average = pd.Series({"a": 1.0, "b": 1.5, "c": 2.9, "d": 3.2})
    assert cliques(average, 1.0) == [["a", "b"], ["c", "d"]]
    assert cliques(average, 3.0) == [["a", "b", "c", "d"]]
    assert cliques(average, 0.1) == []


def test_ranks_need_three_methods_and_two_complete_datasets(tmp_path: Path) -> None:
    root = two_by_two(tmp_path / "results")
    with pytest.raises(FinebenchError, match=r"^report --ranks: 2 method\(s\) \(baseline, se\); the Friedman test "
                                             r"compares at least 3 methods$"):
        rank_methods(report.load_runs([root]).runs)
    write_run(root, variant="attention", variant_name="attention", seed=0, top1=91.0, dataset="cifar10",
              recipe="r_cifar10")
    with pytest.raises(FinebenchError, match=r"1 dataset\(s\) where all 3 methods have a finished run \(cifar10\); "
                                             r"ranks across datasets need at least 2 \(left out: cub200\)"):
        rank_methods(report.load_runs([root]).runs)


def test_p_values_of_several_variants_against_one_baseline_are_holm_corrected(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for seed, (base, att, se) in enumerate([(90.0, 91.0, 90.5), (90.4, 91.6, 90.6), (90.2, 91.1, 91.0)]):
        write_run(root, variant="baseline", variant_name="baseline", seed=seed, top1=base)
        write_run(root, variant="attention", variant_name="attention", seed=seed, top1=att)
        write_run(root, variant="se", variant_name="se", seed=seed, top1=se)
    table = report.summary_table(report.load_runs([root]).runs)
    variants = table[table["variant_name"] != "baseline"]
    expected = multipletests(list(variants["p_value"]), method="holm")[1]
    assert list(variants["p_holm"]) == pytest.approx(list(expected))
    assert table.attrs["holm"] and "Holm-corrected" in report.table_note(table)
    text = report.render(table, "markdown", wide=True)
    for name, corrected in zip(variants["variant_name"], variants["p_holm"], strict=True):
        assert f"{corrected:.3f}"[:4] in text, name


def test_cli_ranks_print_the_friedman_test_and_write_the_diagram(tmp_path: Path) -> None:
    root = three_by_three(tmp_path / "results")
    plots = tmp_path / "plots"
    done = subprocess.run([sys.executable, "-m", "finebench", "report", str(root), "--ranks", "--plots", str(plots)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "| attention" in done.stdout and "1.33" in done.stdout  # attention: ranks 1, 1, 2
    assert "Friedman chi2 = 4.67, p = 0.097" in done.stdout and "Nemenyi critical difference" in done.stdout
    assert (plots / "critical_difference.png").stat().st_size > 0 and (plots / "critical_difference.svg").exists()


def test_cli_ranks_with_two_methods_is_a_one_line_error(tmp_path: Path) -> None:
    root = two_by_two(tmp_path / "results")
    done = subprocess.run([sys.executable, "-m", "finebench", "report", str(root), "--ranks"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().startswith("error: report --ranks: 2 method(s)") and len(done.stderr.splitlines()) == 1
