"""``finebench report --groups``: top-1 per group of test images (iNat's supercategory) per method,
mean ± CI over seeds, from each run's per-image predictions joined with the store's group column."""

from __future__ import annotations

import json
import math
from pathlib import Path

import archives
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_builders import prepare_via_server
from test_trained import cli
from tiny_data import CLASSES, DATASET, bar_examples, tiny_recipe

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, Grouping, ParsedDataset
from finebench.data.prepare import prepare_dataset
from finebench.errors import FinebenchError
from finebench.predictions import PerImagePredictions, write_predictions
from finebench.report.groups import StoreGroups, group_table, run_groups
from finebench.report.stats import mean_ci
from finebench.results import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = ["even", "odd", "never"]
TEST_IMAGES = 41


def image_group(index: int) -> int:
    """The group of the test image at ``index``: by position, not by class, so a class spans both
    groups (as iNat's kingdom level spans supercategories) and only the per-image join is right."""
    return index % 2


def grouped_store(root: Path, with_groups: bool = True) -> Path:
    rng = np.random.default_rng(0)

    def bars(count: int) -> list[Example]:
        return bar_examples(count, rng, (lambda index, _label: image_group(index)) if with_groups else None)

    def parse(_raw: Path) -> ParsedDataset:
        return ParsedDataset([str(c) for c in range(CLASSES)], {"train": bars(64), "test": bars(TEST_IMAGES)},
                             grouping=Grouping("supercategory", GROUPS, None) if with_groups else None)

    spec = DatasetSpec(name=DATASET, num_classes=CLASSES, split_sizes={}, protocol="test", terms="test",
                       homepage="", parse=parse, offline=True)
    with registry.override(spec):
        prepare_dataset(DATASET, root, quiet=True)
    return root


def expected_top1(run_dir: Path) -> list[float]:
    """Per group, from the run's predictions.parquet read with pyarrow alone and the groups the
    test gave its own images (float64 ratios of integer counts, as the report computes them)."""
    frame = pq.read_table(run_dir / "predictions.parquet").to_pandas()
    shown = frame[frame["prediction"] == "test_top1"]
    assert len(shown) == TEST_IMAGES
    right = (shown["class_1"] == shown["label"]).to_numpy()
    member = np.array([image_group(int(i)) for i in shown["id"]])
    return [100.0 * int(right[member == g].sum()) / int((member == g).sum()) if (member == g).any() else math.nan
            for g in range(len(GROUPS))]


@pytest.mark.slow
def test_report_groups_gives_top1_per_supercategory_per_method_over_seeds(tmp_path: Path) -> None:
    data_root = grouped_store(tmp_path / "data")
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(seeds=(0, 1), variants=("baseline", "attention"), attention_depth=1,
                                  attention_width=1))
    results = tmp_path / "results"
    done = cli("run", str(recipe), "--data-root", str(data_root), "--results-dir", str(results), "--quiet")
    assert done.returncode == 0, done.stderr
    done = cli("report", str(results), "--groups", "--format", "json", "-o", str(tmp_path / "report.json"))
    assert done.returncode == 0, done.stderr
    table = pd.DataFrame(json.loads((tmp_path / "report_groups.json").read_text()))
    per_variant: dict[str, list[list[float]]] = {}
    for summary in sorted(results.glob("*/*/summary.json")):
        variant = json.loads(summary.read_text())["variant_name"]
        per_variant.setdefault(variant, []).append(expected_top1(summary.parent))
    assert sorted(per_variant) == sorted(table["variant_name"].unique()) and len(per_variant) == 2
    for variant, seeds in per_variant.items():
        rows = table[table["variant_name"] == variant]
        assert list(rows["group"]) == GROUPS and list(rows["kind"]) == ["supercategory"] * 3
        assert list(rows["images"]) == [21, 20, 0]
        for g, row in enumerate(rows.itertuples()):
            summary = mean_ci(seed[g] for seed in seeds)
            if g == 2:  # no test image in the group: no number, not a zero
                assert row.n == 0 and pd.isna(row.top1_mean)  # JSON null
                continue
            # JSON keeps 6 decimals (render rounds every table so): compare at that resolution.
            assert row.n == 2 and row.top1_mean == pytest.approx(summary.mean, abs=5e-7)
            assert row.top1_ci == pytest.approx(summary.half_width, abs=5e-7)
    done = cli("report", str(results), "--groups", "--error", "--format", "json", "-o", str(tmp_path / "error.json"))
    errors = pd.DataFrame(json.loads((tmp_path / "error_groups.json").read_text()))
    measured = table["top1_mean"].notna()
    # each side rounded to 6 decimals by the JSON writer: they agree within two half-units of 1e-6
    assert list(errors["error_mean"][measured]) == pytest.approx(list(100.0 - table["top1_mean"][measured]), abs=1e-6)
    shown = cli("report", str(results), "--groups", "--data-root", str(data_root))
    assert shown.returncode == 0 and "Supercategory" in shown.stdout and "odd" in shown.stdout, shown.stdout


def fake_run(folder: Path, data_root: Path, dataset: str = DATASET) -> pd.DataFrame:
    """A run folder with the config.json the report looks the store up from, as a runs-table row."""
    folder.mkdir(parents=True)
    RunDir.at(folder).write_config({"dataset": {"name": dataset, "root": str(data_root), "test_split": "test"}})
    return pd.DataFrame([{"run_dir": str(folder), "dataset": dataset, "backbone_label": "wrn",
                          "variant_name": "baseline", "settings": "x"}])


def test_a_store_without_groups_gives_no_rows_and_a_missing_store_one_warning(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINEBENCH_DATA", raising=False)
    plain = grouped_store(tmp_path / "plain", with_groups=False)
    table, warnings = group_table(fake_run(tmp_path / "a", plain))
    assert table.empty and warnings == []
    table, warnings = group_table(fake_run(tmp_path / "b", tmp_path / "nowhere"))
    assert table.empty and len(warnings) == 1
    assert str(tmp_path / "b") in warnings[0] and "is not prepared in" in warnings[0] and "\n" not in warnings[0]
    table, warnings = group_table(fake_run(tmp_path / "c", tmp_path / "nowhere"), data_root=plain)  # --data-root
    assert table.empty and warnings == []


def predictions(ids: list[int], labels: list[int], top1: list[int]) -> PerImagePredictions:
    count = len(ids)
    classes = np.stack([np.asarray(top1), *(np.full(count, 9) for _ in range(4))], axis=1).astype(np.int64)
    return PerImagePredictions(np.asarray(ids, np.int64), np.asarray(labels, np.int64), {"test_top1": classes},
                               {"test_top1": np.full((count, 5), 0.2, np.float32)})


STORE = StoreGroups("supercategory", ["a", "b"], None, groups=np.array([0, 1, 1, 0, 1]),
                    labels=np.array([3, 3, 4, 4, 5]))


def test_run_groups_joins_each_image_with_its_group(tmp_path: Path) -> None:
    write_predictions(RunDir.at(tmp_path).predictions_path(), predictions([0, 1, 2, 3, 4], [3, 3, 4, 4, 5],
                                                                          [3, 0, 4, 0, 5]))
    result = run_groups(tmp_path, STORE)
    # group a: images 0 (right) and 3 (wrong); group b: 1 (wrong), 2 and 4 (right)
    assert (result.names, result.images, result.top1) == (["a", "b"], [2, 3], [50.0, 100.0 * 2 / 3])


def test_predictions_of_another_store_build_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = RunDir.at(tmp_path).predictions_path()
    write_predictions(path, predictions([0, 1, 2, 3, 4], [3, 3, 4, 4, 6], [3, 3, 4, 4, 6]))
    with pytest.raises(FinebenchError, match=f"^{path}: its labels are not the store's"):
        run_groups(tmp_path, STORE)
    write_predictions(path, predictions([0, 7], [3, 3], [3, 3]))
    with pytest.raises(FinebenchError, match=f"^{path}: image id 7 is outside the store's 5 test images"):
        run_groups(tmp_path, STORE)


def test_without_predictions_the_confusion_matrix_serves_where_the_class_decides_the_group(tmp_path: Path) -> None:
    confusion = [[3, 1, 0], [0, 2, 2], [1, 0, 0]]
    RunDir.at(tmp_path).write_confusion(confusion)
    by_class = StoreGroups("supercategory", ["a", "b"], [0, 1, 0], groups=np.zeros(0, np.int64),
                           labels=np.zeros(0, np.int64))
    result = run_groups(tmp_path, by_class)
    assert (result.images, result.top1) == ([5, 4], [100.0 * 3 / 5, 100.0 * 2 / 4])
    with pytest.raises(FinebenchError, match="classes that span several groups cannot give top-1 per supercategory"):
        run_groups(tmp_path, STORE)


def test_report_groups_on_an_inat_store_prepared_from_its_official_files(tmp_path: Path, local_http_server) -> None:
    """The tests' miniature of iNat 2021 mini (official archive and JSON layout, two supercategories)
    prepared by the real builder, one run trained on it: one row per supercategory with its test
    images, and the run's own top-1 is their image-weighted mean."""
    mini = archives.inat("2021_mini")
    prepare_via_server(mini, local_http_server, tmp_path / "data")
    recipe = tmp_path / "inat.toml"
    recipe.write_text(tiny_recipe(dataset=mini.name, batch_size=4, eval_batch_size=4))
    results = tmp_path / "results"
    done = cli("run", str(recipe), "--data-root", str(tmp_path / "data"), "--results-dir", str(results), "--quiet")
    assert done.returncode == 0, done.stderr
    done = cli("report", str(results), "--groups", "--format", "json", "-o", str(tmp_path / "report.json"))
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "report_groups.json").read_text())
    assert [(row["kind"], row["group"], row["images"], row["n"]) for row in rows] == [
        ("supercategory", name, count, 1) for name, count in zip(mini.extra["groups"], (2, 2), strict=True)]
    [overall] = json.loads((tmp_path / "report.json").read_text())
    # two groups of two images: the run's top-1 is the mean of theirs (JSON rounds each to 6 decimals)
    assert overall["top1_mean"] == pytest.approx((rows[0]["top1_mean"] + rows[1]["top1_mean"]) / 2, abs=1e-6)
