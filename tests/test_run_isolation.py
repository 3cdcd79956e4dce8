"""A run computes the same thing whatever ran before it in the process: ``--only``, ``--jobs`` and
the whole recipe train one run id alike. The costs the runner records (a baseline built to compare
against) once drew from the run's RNG after seeding, so WS-DAN, whose crops and drops draw from that
RNG, trained differently when the baseline had not been costed earlier in the process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_data import prepare_tiny_bars, tiny_recipe

from finebench.plan import RunSelection
from finebench.recipe import load_recipe
from finebench.train_settings import MACHINE_FIELDS
from finebench.runner import run_recipe


def rows(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in MACHINE_FIELDS} for line in lines]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tiny_bars(tmp_path_factory.mktemp("data"), train_images=64, test_images=40)


def test_a_run_alone_trains_as_it_does_after_the_baseline_in_the_same_process(tmp_path: Path, data_root: Path) -> None:
    recipe = tmp_path / "isolation.toml"
    recipe.write_text(tiny_recipe(variants=("baseline", "ws_dan"), input_size=32, extra_train="threads = 1"))
    whole = run_recipe(load_recipe(recipe), results_dir=tmp_path / "whole", data_root=data_root, quiet=True)
    alone = run_recipe(load_recipe(recipe), results_dir=tmp_path / "alone", data_root=data_root, quiet=True,
                       selection=RunSelection(("ws_dan",)))
    after_baseline, = [outcome for outcome in whole if outcome.path.name == alone[0].path.name]
    assert rows(alone[0].path) == rows(after_baseline.path)
