"""k-fold protocols (adience, uec_food100): one run per held-out fold inside the variant × seed grid.

The end-to-end tests train the shipped recipes, shrunk by ``--set`` overrides to a WRN-10-1 on
16 px images, on miniature stores with five folds of one image each, prepared through
finebench's real store under the datasets' own names.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finebench.data import registry
from finebench.data.builders.base import Example, ParsedDataset
from finebench.data.prepare import prepare_dataset
from finebench.errors import FinebenchError
from finebench.models.registry import build_backbone
from finebench.recipe import expand_runs, load_recipe
from finebench.results import RunDir
from finebench.runner import run_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
KFOLD_RECIPES = {"adience": "wrn50_adience.toml", "uec_food100": "wrn50_uec_food100.toml"}


@pytest.mark.parametrize("dataset", sorted(KFOLD_RECIPES))
def test_a_kfold_recipe_runs_every_held_out_fold_for_every_variant_and_seed(dataset: str) -> None:
    loaded = load_recipe(RECIPES / KFOLD_RECIPES[dataset])
    runs = expand_runs(loaded)
    assert len(runs) == 2 * len(loaded.recipe.seeds) * 5
    assert len({run.run_id for run in runs}) == len(runs)
    for run in runs:
        split = run.config["dataset"]
        assert split["fold"] == run.fold and "folds" not in split
        assert split["test_split"] == f"fold{run.fold}"
        assert split["train_split"] == "+".join(f"fold{k}" for k in range(5) if k != run.fold)
    grid = {(run.variant_kind, run.seed, run.fold) for run in runs}
    assert grid == {(kind, seed, fold) for kind in ("baseline", "attention")
                    for seed in loaded.recipe.seeds for fold in range(5)}


def test_dataset_folds_chooses_the_held_out_folds() -> None:
    runs = expand_runs(load_recipe(RECIPES / "wrn50_adience.toml", ["dataset.folds=[3, 1]", "seeds=[0]"]))
    assert [(run.variant_kind, run.fold) for run in runs] == [
        ("baseline", 3), ("baseline", 1), ("attention", 3), ("attention", 1)]


def test_fixed_split_runs_have_no_fold() -> None:
    runs = expand_runs(load_recipe(RECIPES / "wrn_cifar10.toml"))
    assert all(run.fold is None and "fold" not in run.config["dataset"] for run in runs)
    assert runs[0].config["dataset"]["train_split"] == "train"


@pytest.mark.parametrize("recipe, override, message", [
    ("wrn50_adience.toml", "dataset.folds=[5]", r"dataset\.folds: got \[5\]; expected distinct fold indices in 0\.\.4"),
    ("wrn50_adience.toml", "dataset.folds=[1, 1]", r"dataset\.folds: got \[1, 1\]"),
    ("wrn50_adience.toml", "dataset.folds=[]", r"dataset\.folds: got \[\]"),
    ("wrn50_uec_food100.toml", "dataset.train_split=fold1", r"dataset\.train_split: uec_food100 is a 5-fold dataset"),
    ("wrn_cifar10.toml", "dataset.folds=[0]", r"dataset\.folds: cifar10 has a fixed train/test split"),
])
def test_fold_settings_that_cannot_work_are_one_line_errors(recipe: str, override: str, message: str) -> None:
    with pytest.raises(FinebenchError, match=message) as error:
        load_recipe(RECIPES / recipe, [override])
    assert recipe in str(error.value) and "\n" not in str(error.value)


# ---- end to end on miniature stores -----------------------------------------------------------------


def miniature_store(data_root: Path, name: str) -> None:
    """Five folds of one 16x16 image each, stored as ``name`` by the real prepare code."""
    spec = registry.get_spec(name)
    classes = ["female", "male"] if name == "adience" else [f"food {k}" for k in range(spec.num_classes)]

    def parse(raw_dir: Path) -> ParsedDataset:
        rng = np.random.default_rng(0)
        return ParsedDataset(classes, {
            f"fold{k}": [Example(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), k % 2)] for k in range(5)
        })

    tiny = dataclasses.replace(spec, parse=parse, sources=(), manual=False, offline=True)
    with registry.override(tiny):
        prepare_dataset(name, data_root, quiet=True)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dataset", sorted(KFOLD_RECIPES))
def test_the_kfold_recipe_trains_one_run_per_fold_end_to_end(dataset: str, tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    miniature_store(data_root, dataset)
    weights = tmp_path / "backbone.pth"  # stands in for the ImageNet weights, through the same loading code
    torch.save(build_backbone("wrn", {"depth": 10, "width": 1}).state_dict(), weights)
    loaded = load_recipe(RECIPES / KFOLD_RECIPES[dataset], [
        "seeds=[0]", "dataset.input_size=16", "model.backbone=wrn", "model.options={ depth = 10, width = 1 }",
        f"model.pretrained={weights}", "train.epochs=1", "train.batch_size=4", "train.precision=fp32",
        "train.channels_last=false", "train.workers=0",
    ])
    outcomes = run_recipe(loaded, results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    assert [(o.run.variant_kind, o.run.fold, o.status) for o in outcomes] == [
        (kind, fold, "finished") for kind in ("baseline", "attention") for fold in range(5)]
    for outcome in outcomes:
        run_dir = RunDir(tmp_path / "results", loaded.name, outcome.run.run_id).path
        config = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        assert config["dataset"]["fold"] == summary["fold"] == outcome.run.fold
        assert config["dataset"]["test_split"] == f"fold{outcome.run.fold}"
        # four folds train, the held-out one (one image) tests
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["test_top1"] in (0.0, 100.0)
        assert summary["status"] == "finished"


def test_each_fold_run_reads_its_own_splits_as_a_typed_section() -> None:
    """The pre-flight check reads a run's dataset through ``RunSpec.dataset_section``; a k-fold
    run's config also names its held-out fold, which is the run's ``fold``, not a recipe field."""
    from pathlib import Path

    from finebench.recipe import expand_runs, load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "wrn50_adience.toml"
    runs = expand_runs(load_recipe(recipe, ["seeds=[0]"], check_dataset=False), ["baseline"])
    sections = [run.dataset_section() for run in runs]
    assert [run.fold for run in runs] == list(range(5))
    assert [section.test_split for section in sections] == [f"fold{fold}" for fold in range(5)]
    assert all(f"fold{run.fold}" not in section.train_split for run, section in zip(runs, sections))
