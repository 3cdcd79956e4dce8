"""Two variants on the same test images: where they disagree, and whether that is more than chance.

The report's paired t-test compares two variants over seeds: it asks whether one is better on
average over training runs. One seed's two runs can be compared too, image by image, from the
per-image predictions of their final evaluations (``finebench.predictions``): McNemar's exact test
asks whether the images only A gets right outnumber those only B gets right by more than a fair
coin would (a binomial test on the discordant pairs, ``scipy.stats.binomtest``; statsmodels'
``mcnemar(exact=True)`` gives the same p), and a paired bootstrap over test images
(``scipy.stats.bootstrap``, percentile interval, fixed seed) gives a confidence interval of the
accuracy difference. Both speak of this test set and these two trained models only: variation
between training runs is not in them, which is what the t-test over seeds is for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from finebench.errors import FinebenchError
from finebench.predictions import PerImagePredictions, read_predictions
from finebench.report.records import load_runs
from finebench.report.render import fmt_p
from finebench.report.tables import DEFAULT_BY
from finebench.results import RunDir, read_json

CONFIDENCE = 0.95
RESAMPLES = 9999
BOOTSTRAP_SEED = 0
"""The bootstrap's seed: the same two files give the same interval every time."""
BOOTSTRAP_BATCH = 200
"""Resamples per vectorised batch: memory stays at 200 x images numbers (CIFAR's 10,000: 32 MB)."""


class Disagreement(NamedTuple):
    """Two runs' final evaluations of one test set, image by image."""

    images: int
    a_top1: float
    b_top1: float
    a_only: int
    """Images A classifies right and B wrong."""
    b_only: int
    p_value: float
    """McNemar's exact test (two-sided) on ``a_only`` against ``b_only``."""
    difference: float
    """A's top-1 minus B's, in points."""
    ci_low: float
    ci_high: float


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided p of McNemar's exact test: under "A and B are equally good" each discordant image
    is A's with probability 1/2. No discordant image: nothing tells them apart, p = 1."""
    discordant = a_only + b_only
    return 1.0 if discordant == 0 else float(stats.binomtest(a_only, discordant, 0.5).pvalue)


def _difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return a.mean(axis=axis) - b.mean(axis=axis)


def bootstrap_difference(a_correct: np.ndarray, b_correct: np.ndarray, *, seed: int = BOOTSTRAP_SEED,
                         resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of mean(a) - mean(b) over test images resampled in pairs (fractions).

    Where the two agree on every image each resample's difference is 0 and so is the interval
    (scipy would warn of a degenerate distribution and give nan)."""
    a, b = np.asarray(a_correct, dtype=float), np.asarray(b_correct, dtype=float)
    if np.array_equal(a, b):
        return 0.0, 0.0
    result = stats.bootstrap((a, b), _difference, paired=True, vectorized=True, n_resamples=resamples,
                             confidence_level=confidence, method="percentile", batch=BOOTSTRAP_BATCH,
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare(a: PerImagePredictions, b: PerImagePredictions, a_path: Path, b_path: Path) -> Disagreement:
    """The statistics of two files of the same test set; another test set is a one-line error."""
    if a.digest != b.digest:
        raise FinebenchError(f"{a_path} and {b_path}: predictions of different test sets (test-set digest "
                             f"{a.digest[:19]}… against {b.digest[:19]}…); expected two evaluations of one split")
    a_correct, b_correct = a.correct(), b.correct()  # both in id order, ids equal (the digest)
    a_only = int((a_correct & ~b_correct).sum())
    b_only = int((b_correct & ~a_correct).sum())
    low, high = bootstrap_difference(a_correct, b_correct)
    return Disagreement(len(a.ids), 100.0 * a_correct.mean(), 100.0 * b_correct.mean(), a_only, b_only,
                        mcnemar_exact(a_only, b_only), 100.0 * (a_correct.mean() - b_correct.mean()),
                        100.0 * low, 100.0 * high)


def predictions_file(run_dir: Path) -> Path:
    """The per-image file of a run's final evaluation; for a run recorded before runs wrote one, the
    file ``finebench eval`` writes for its test split, when there is one."""
    folder = RunDir.at(Path(run_dir))
    own = folder.predictions_path()
    if own.is_file():
        return own
    try:
        split = (read_json(folder.config_path).get("dataset") or {}).get("test_split") or "test"
    except (OSError, ValueError, AttributeError):
        return own
    evaluated = folder.predictions_path(split)
    return evaluated if evaluated.is_file() else own


class Pair(NamedTuple):
    key: dict[str, object]
    a_dir: Path
    b_dir: Path
    a_file: Path
    b_file: Path
    a: PerImagePredictions
    b: PerImagePredictions
    result: Disagreement


def disagreement(paths: Sequence[str | Path], a: str, b: str, by: Sequence[str] | None = None) -> list[Pair]:
    """A against B for every (``by`` columns, default dataset and backbone; seed; fold) both have a
    finished run of; a key with two runs of one variant is an error naming them (``--by`` tells them apart)."""
    if a == b:
        raise FinebenchError(f"report --disagree {a} {b}: the same variant twice; expected two variant names")
    runs = load_runs(paths).runs
    names = sorted(set(runs["variant_name"].dropna().astype(str))) if not runs.empty else []
    for name in (a, b):
        if name not in names:
            raise FinebenchError(f"report --disagree: no finished run of variant {name!r}; "
                                 f"expected one of {', '.join(names) or '(no finished runs)'}")
    keys = [*(by or DEFAULT_BY), "seed", "fold"]
    missing = [key for key in keys if key not in runs.columns]
    if missing:
        raise FinebenchError(f"--by {','.join(missing)}: not a column of the runs; expected e.g. {', '.join(DEFAULT_BY)}")

    def by_key(variant: str) -> dict[tuple, Path]:
        found: dict[tuple, Path] = {}
        for row in runs[runs["variant_name"] == variant].itertuples(index=False):
            record = row._asdict()
            key = tuple(_plain(record[k]) for k in keys)
            if key in found:
                where = ", ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True) if v is not None)
                raise FinebenchError(f"report --disagree: two runs of {variant!r} at {where} ({found[key]} and "
                                     f"{record['run_dir']}); add --by columns that tell them apart")
            found[key] = Path(record["run_dir"])
        return found

    a_runs, b_runs = by_key(a), by_key(b)
    shared = [key for key in a_runs if key in b_runs]
    if not shared:
        raise FinebenchError(f"report --disagree: {a!r} and {b!r} share no ({', '.join(keys)}); "
                             "expected runs of both on the same dataset, backbone and seed")
    pairs = []
    for key in sorted(shared, key=lambda k: tuple(str(v) for v in k)):
        a_file, b_file = predictions_file(a_runs[key]), predictions_file(b_runs[key])
        hint = "runs record it since finebench wrote per-image predictions; `finebench eval RUN_DIR` writes it"
        a_pred, b_pred = read_predictions(a_file, hint), read_predictions(b_file, hint)
        pairs.append(Pair(dict(zip(keys, key, strict=True)), a_runs[key], b_runs[key], a_file, b_file,
                          a_pred, b_pred, compare(a_pred, b_pred, a_file, b_file)))
    return pairs


def _plain(value: object) -> object:
    """A key cell as a hashable, comparable value (pandas' NaN for a missing fold becomes None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def disagreement_table(pairs: Sequence[Pair]) -> pd.DataFrame:
    """One row per pair, numbers as numbers (CSV, JSON); the fold column only where a run has one."""
    rows = [{**pair.key, **pair.result._asdict()} for pair in pairs]
    table = pd.DataFrame(rows)
    if "fold" in table and table["fold"].isna().all():
        table = table.drop(columns="fold")
    return table


def format_disagreement(table: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Display text: A and B top-1, the difference with its interval, the discordant counts, McNemar's p."""
    headers = {"dataset": "Dataset", "backbone_label": "Backbone", "seed": "Seed", "fold": "Fold", "images": "Images"}
    out = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column in Disagreement._fields:
            continue
        out[headers.get(column, column)] = [str(v) if v is not None else "—" for v in table[column]]
    out["Images"] = table["images"].astype(int).astype(str)
    out[f"{a} top-1"] = table["a_top1"].map(lambda v: f"{v:.2f}")
    out[f"{b} top-1"] = table["b_top1"].map(lambda v: f"{v:.2f}")
    out[f"{a} − {b}"] = table["difference"].map(lambda v: f"{v:+.2f}")
    out[f"{CONFIDENCE:.0%} CI"] = [f"[{low:+.2f}, {high:+.2f}]" for low, high in zip(table["ci_low"], table["ci_high"])]
    out[f"only {a}"] = table["a_only"].astype(int).astype(str)
    out[f"only {b}"] = table["b_only"].astype(int).astype(str)
    out["McNemar p"] = table["p_value"].map(fmt_p)
    return out


def disagreement_caption(a: str, b: str) -> str:
    return (f"{a} against {b} on the same test images, one seed at a time: \"only {a}\" counts the images {a} "
            f"classifies right and {b} wrong; McNemar p: the exact test on those two counts "
            f"(scipy.stats.binomtest, two-sided); CI: {CONFIDENCE:.0%} paired bootstrap over test images "
            f"({RESAMPLES} resamples, percentile, seed {BOOTSTRAP_SEED}) of the top-1 difference in points. "
            "Both hold for these trained models on this test set; across seeds the report's paired t-test applies.")
