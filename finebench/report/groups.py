"""``report --groups``: top-1 per group of images (iNat's supercategory) for each method, mean ± CI
over seeds, for runs on a store whose images carry a group (issue 31).

The run's own records hold no group, and need not: its final evaluation wrote every test image's
prediction (``predictions.parquet``, ids = positions in the prepared test split) and the store holds
every image's group (the ``group`` column; meta.json ``groups`` names them). Joining the two gives
per-group top-1 whether or not the class decides the group (iNat's kingdom level mixes
supercategories). A run recorded before per-image predictions existed falls back to its confusion
matrix where the store says the class decides the group (``groups.of_class``). The store is looked
up by the one data-root rule (``--data-root``, ``FINEBENCH_DATA``, else the root the run recorded), and checked to
be the one the run was tested on: the labels of the ids it predicted must be the store's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finebench.data import store
from finebench.data.loader import split_dirs
from finebench.data.root import resolve_data_root
from finebench.errors import FinebenchError
from finebench.predictions import read_predictions
from finebench.report.render import fmt_mean_ci, fmt_plain
from finebench.report.stats import group_accuracy, mean_ci
from finebench.results import RunDir


@dataclass(frozen=True)
class StoreGroups:
    """The groups of one store's test split(s), as a run's predictions index them."""

    kind: str
    """What a group is (``supercategory``)."""
    names: list[str]
    of_class: list[int] | None
    groups: np.ndarray
    """int64, one per test image (splits joined with ``+`` count on from the first)."""
    labels: np.ndarray


@dataclass(frozen=True)
class RunGroups:
    """One run's top-1 per group (NaN: no test image in that group) and the images in each."""

    kind: str
    names: list[str]
    top1: list[float]
    images: list[int]


def store_groups(data_root: Path, dataset: str, test_split: str) -> StoreGroups | None:
    """The group and label of every image of ``test_split``, or None for a store without groups;
    a store that is not there or cannot be read is a ``FinebenchError`` naming it."""
    import pyarrow as pa

    meta = store.read_meta(data_root, dataset)
    groups = meta.get("groups")
    if not isinstance(groups, dict):
        return None
    folders = split_dirs(store.store_dir(data_root, dataset), test_split, list(meta.get("splits") or {}), dataset)
    columns: dict[str, list[np.ndarray]] = {groups["column"]: [], "label": []}
    for folder in folders:
        try:
            table = store.read_split(folder)
            for name, parts in columns.items():
                parts.append(table.column(name).to_numpy())
        except (OSError, ValueError, KeyError, pa.ArrowException) as error:
            raise FinebenchError(f"{folder}: its {groups['column']!r} and 'label' columns cannot be read ({error}): "
                                 f"rebuild it with `{store.prepare_command(dataset, data_root, force=True)}`") from None
    return StoreGroups(str(groups["kind"]), [str(n) for n in groups["names"]], groups.get("of_class"),
                       np.concatenate(columns[groups["column"]]).astype(np.int64),
                       np.concatenate(columns["label"]).astype(np.int64))


def run_groups(run_dir: Path, found: StoreGroups) -> RunGroups:
    """The run's top-1 per group from its final evaluation's per-image predictions joined with the
    store's groups; without that file, from its confusion matrix where the class decides the group.
    A file that does not fit the store (other ids or labels) is a ``FinebenchError`` naming both."""
    count = len(found.names)
    path = RunDir.at(run_dir).predictions_path()
    if path.is_file():
        predictions = read_predictions(path)
        ids = predictions.ids
        if len(ids) and (ids.min() < 0 or ids.max() >= len(found.labels)):
            raise FinebenchError(f"{path}: image id {int(ids.max())} is outside the store's {len(found.labels)} "
                                 "test images: the store was prepared again since the run")
        if not np.array_equal(found.labels[ids], predictions.labels):
            raise FinebenchError(f"{path}: its labels are not the store's for the same images: the store was "
                                 "prepared again since the run")
        member = found.groups[ids]
        correct = predictions.correct()
        images = np.bincount(member, minlength=count)
        right = np.bincount(member, weights=correct.astype(np.float64), minlength=count)
        top1 = [100.0 * float(r) / int(n) if n else math.nan for r, n in zip(right, images, strict=True)]
        return RunGroups(found.kind, found.names, top1, [int(n) for n in images])
    confusion = RunDir.at(run_dir).read_confusion()
    if confusion is None or found.of_class is None:
        why = "no confusion matrix" if confusion is None else "classes that span several groups"
        raise FinebenchError(f"{path}: not found, and the run's {why} cannot give top-1 per {found.kind}")
    member = np.asarray(found.of_class, dtype=np.int64)
    images = np.bincount(member, weights=np.asarray(confusion, dtype=np.float64).sum(axis=1), minlength=count)
    return RunGroups(found.kind, found.names, group_accuracy(confusion, found.of_class, count),
                     [int(n) for n in images])


def group_table(runs: pd.DataFrame, error: bool = False,
                data_root: str | Path | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per dataset × backbone × variant (× settings) × group: the test images of the group
    and top-1 (or error) mean ± CI over the runs; and one warning line per run left out (a store that
    is not there, does not fit the run's predictions, ...). Runs on stores without groups are not
    rows and not warnings. ``data_root``: report's --data-root (the one rule: the flag, then
    FINEBENCH_DATA, then the root each run recorded)."""
    metric = "error" if error else "top1"
    stores: dict[tuple[Path, str, str], StoreGroups | None | str] = {}
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for run in runs.itertuples(index=False):
        run_dir = Path(run.run_dir)
        try:
            config = json.loads(RunDir.at(run_dir).config_path.read_text(encoding="utf-8"))
            dataset_section = config["dataset"]
            key = (resolve_data_root(data_root, dataset_section.get("root")), str(dataset_section["name"]),
                   str(dataset_section.get("test_split") or "test"))
        except (OSError, ValueError, KeyError, TypeError) as problem:
            warnings.append(f"{RunDir.at(run_dir).config_path}: no dataset to find groups in ({problem}); "
                            "left out of the per-group table")
            continue
        if key not in stores:
            try:
                stores[key] = store_groups(*key)
            except FinebenchError as problem:
                stores[key] = str(problem)
        found = stores[key]
        if found is None:
            continue
        try:
            if isinstance(found, str):
                raise FinebenchError(found)
            result = run_groups(run_dir, found)
        except FinebenchError as problem:
            warnings.append(f"{run_dir}: left out of the per-group table: {problem}")
            continue
        for order, (name, top1, images) in enumerate(zip(result.names, result.top1, result.images, strict=True)):
            rows.append({"dataset": run.dataset, "backbone_label": run.backbone_label,
                         "variant_name": run.variant_name, "settings": run.settings, "kind": result.kind,
                         "order": order, "group": name, "images": images,
                         "value": 100.0 - top1 if error else top1})
    columns = ["dataset", "backbone_label", "variant_name", "kind", "group", "images", "n", f"{metric}_mean",
               f"{metric}_std", f"{metric}_ci"]
    if not rows:
        table = pd.DataFrame(columns=columns)
    else:
        data = pd.DataFrame(rows)
        keys = ["dataset", "backbone_label", "variant_name", "settings", "kind", "order", "group"]
        out = []
        for key, group in data.groupby(keys, sort=True):
            summary = mean_ci(group["value"])
            out.append({**dict(zip(keys, key)), "images": int(group["images"].max()), "n": summary.n,
                        f"{metric}_mean": summary.mean, f"{metric}_std": summary.std, f"{metric}_ci": summary.half_width})
        table = pd.DataFrame(out)[columns].reset_index(drop=True)
    table.attrs.update(metric=metric, kind="groups")
    return table, warnings


def shown_groups(table: pd.DataFrame) -> pd.DataFrame:
    """The table's text cells: each group named under its kind's header, top-1 as mean ± CI."""
    metric = table.attrs.get("metric", "top1")
    kinds: Sequence[str] = sorted(set(table["kind"])) if not table.empty else ["group"]
    return pd.DataFrame({
        "Dataset": table["dataset"].map(fmt_plain), "Backbone": table["backbone_label"].map(fmt_plain),
        "Variant": table["variant_name"].map(fmt_plain), " / ".join(k.capitalize() for k in kinds): table["group"],
        "Images": table["images"].map(fmt_plain), "n": table["n"].map(fmt_plain),
        "Error" if metric == "error" else "Top-1": [fmt_mean_ci(m, c) for m, c in
                                                    zip(table[f"{metric}_mean"], table[f"{metric}_ci"])],
    })


def groups_caption(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no finished runs on a store whose images carry groups, e.g. iNat's supercategories)"
    measure = "test error (100 − top-1)" if table.attrs.get("metric") == "error" else "test top-1"
    return (f"final-epoch {measure} within each group of test images (iNat: supercategory), %, from each run's "
            "per-image predictions and the store's group column; mean ± 95% CI half-width (Student t, n−1 df) "
            "over seeds; Images: test images in the group; n runs.")
