"""The statistics of the report: means with Student-t confidence intervals, paired comparisons, and
the mean per-class accuracy of a confusion matrix.

Gains in this field are often a few tenths of a point over three seeds, so a mean alone says
little: every mean gets its 95% confidence interval (t with n−1 degrees of freedom) and every gain
is the mean of differences paired by seed (and fold), with its own interval and a two-sided
paired t-test (``scipy.stats.ttest_rel``). Pairing removes what the two runs of one seed share
(data order, initialisation of the shared layers), which is most of the seed-to-seed spread.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


class MeanCI(NamedTuple):
    n: int
    mean: float
    std: float
    """Sample standard deviation (ddof=1); NaN for n < 2."""
    half_width: float
    """Half-width of the 95% t interval; NaN for n < 2 (no interval from one run)."""


class Paired(NamedTuple):
    n_pairs: int
    mean: float
    """Mean of variant − baseline over the pairs; NaN without pairs."""
    half_width: float
    p_value: float
    """Two-sided paired t-test; NaN below two pairs or when every difference is the same."""
    unpaired: int
    """Runs of either side whose (seed, fold) has no partner: left out of the comparison."""

    @property
    def significant(self) -> bool:
        """The 95% interval of the mean difference excludes 0."""
        return self.n_pairs >= 2 and not math.isnan(self.half_width) and abs(self.mean) > self.half_width


def t_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    if n < 2 or math.isnan(std):
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))


def mean_ci(values: Iterable[float]) -> MeanCI:
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = int(data.size)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan)
    std = float(data.std(ddof=1)) if n > 1 else math.nan
    return MeanCI(n, float(data.mean()), std, t_half_width(std, n))


def paired_difference(variant: Mapping[Hashable, float], baseline: Mapping[Hashable, float]) -> Paired:
    """``variant − baseline`` over the keys (seed, fold) both sides have."""
    keys = [k for k in variant if k in baseline and not is_missing(variant[k]) and not is_missing(baseline[k])]
    unpaired = (len(variant) - len(keys)) + (len(baseline) - len(keys))
    if not keys:
        return Paired(0, math.nan, math.nan, math.nan, unpaired)
    a = np.asarray([variant[k] for k in keys], dtype=float)
    b = np.asarray([baseline[k] for k in keys], dtype=float)
    differences = mean_ci(a - b)
    p_value = math.nan
    if len(keys) >= 2 and differences.std > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p_value = float(stats.ttest_rel(a, b).pvalue)
    return Paired(len(keys), differences.mean, differences.half_width, p_value, unpaired)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN, outside the family).

    Written here because scipy offers only the Benjamini-Hochberg/Yekutieli false-discovery rates
    (``false_discovery_control``), not a family-wise correction; Holm is uniformly more powerful than
    Bonferroni and assumes nothing about how the tests depend on each other (they share a baseline).
    """
    finite = [(p, i) for i, p in enumerate(p_values) if not is_missing(p)]
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[index] = running
    return adjusted


def mean_class_accuracy(confusion: Sequence[Sequence[float]]) -> float:
    """Mean over classes of each class's recall (rows: true class), in percent.

    Classes absent from the evaluated split have no recall and are left out of the mean.
    """
    matrix = np.asarray(confusion, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.size == 0:
        raise ValueError(f"a confusion matrix must be square, got shape {matrix.shape}")
    support = matrix.sum(axis=1)
    present = support > 0
    if not present.any():
        return math.nan
    return float(100.0 * (np.diag(matrix)[present] / support[present]).mean())


def group_accuracy(confusion: Sequence[Sequence[float]], group_of_class: Sequence[int], groups: int) -> list[float]:
    """Top-1 of each group of classes (iNat's supercategories), in percent, from a confusion matrix.

    Exact only where the class decides the group (every image of a class is in its class's group),
    which is what a store's ``groups.of_class`` promises. A group without images is NaN.
    """
    matrix = np.asarray(confusion, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(group_of_class):
        raise ValueError(f"a {len(group_of_class)}-class confusion matrix was expected, got shape {matrix.shape}")
    member = np.asarray(group_of_class, dtype=int)
    correct = np.bincount(member, weights=np.diag(matrix), minlength=groups)
    support = np.bincount(member, weights=matrix.sum(axis=1), minlength=groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(v) for v in np.where(support > 0, 100.0 * correct / support, math.nan)]


def is_missing(value: Any) -> bool:
    """None or NaN: a cell the report shows as missing (pandas gives NaN, JSON gives None)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
