"""Per-group (iNat supercategory) top-1: a store with a ``group`` column trains like any other, and ``finebench
eval`` breaks its top-1 down by group from the confusion matrix and the store's class -> group table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_trained import cli
from tiny_data import CLASSES, DATASET, bar_examples, tiny_recipe

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, Grouping, ParsedDataset
from finebench.data.prepare import prepare_dataset
from finebench.recipe import load_recipe
from finebench.report.stats import group_accuracy
from finebench.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = ["low", "high"]
GROUP_OF_CLASS = [0 if c < CLASSES // 2 else 1 for c in range(CLASSES)]


def test_group_accuracy_pools_the_classes_of_each_group():
    confusion = [[3, 1, 0], [0, 2, 2], [1, 0, 0]]  # class 2 has one image, wrong
    # group 0 = classes 0 and 2: 3 right of 4 + 1; group 1 = class 1: 2 of 4; group 2: no class
    assert group_accuracy(confusion, [0, 1, 0], 3)[:2] == [100.0 * 3 / 5, 100.0 * 2 / 4]
    assert math.isnan(group_accuracy(confusion, [0, 1, 0], 3)[2])
    with pytest.raises(ValueError, match="3-class confusion matrix"):
        group_accuracy([[1]], [0, 1, 0], 2)


def _grouped_bars(root: Path) -> Path:
    """The tiny bars set with a group per image (the first half of the classes "low"), through the real store."""
    rng = np.random.default_rng(0)

    def bars(count: int) -> list[Example]:
        return bar_examples(count, rng, lambda _index, label: GROUP_OF_CLASS[label])

    def parse(_raw: Path) -> ParsedDataset:
        return ParsedDataset([str(c) for c in range(CLASSES)], {"train": bars(64), "test": bars(41)},
                             grouping=Grouping("supercategory", GROUPS, GROUP_OF_CLASS))

    spec = DatasetSpec(name=DATASET, num_classes=CLASSES, split_sizes={}, protocol="test", terms="test",
                       homepage="", parse=parse, offline=True)
    with registry.override(spec):
        prepare_dataset(DATASET, root, quiet=True)
    return root


@pytest.mark.slow
def test_eval_reports_top1_per_supercategory_from_the_confusion_matrix(tmp_path):
    data_root = _grouped_bars(tmp_path / "data")
    meta = json.loads((data_root / DATASET / "meta.json").read_text())
    assert meta["groups"] == {"column": "group", "kind": "supercategory", "names": GROUPS, "of_class": GROUP_OF_CLASS}
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(seeds=(3,)))
    (outcome,) = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    done = cli("eval", str(outcome.path), "--data-root", str(data_root), "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    confusion = metrics["confusion"]
    expected = {}
    for group, name in enumerate(GROUPS):  # float64 sums of integers: exact
        rows = [c for c in range(CLASSES) if GROUP_OF_CLASS[c] == group]
        expected[name] = 100.0 * sum(confusion[c][c] for c in rows) / sum(sum(confusion[c]) for c in rows)
    assert metrics["group_top1"] == {"kind": "supercategory", "top1": expected}
    table = cli("eval", str(outcome.path), "--data-root", str(data_root), "--device", "cpu")
    assert "supercategory low top-1" in table.stdout and "supercategory high top-1" in table.stdout
