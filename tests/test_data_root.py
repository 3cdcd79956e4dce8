"""One data-root rule for every command: --data-root, then FINEBENCH_DATA, then the recipe's (or the
run's recorded) root, then ``data``; a run records the resolved root; a named root is never created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_data import prepare_tiny_bars, tiny_recipe

from finebench.bench import bench_recipe
from finebench.data.root import ENV_VAR, choose_data_root, resolve_data_root
from finebench.errors import FinebenchError
from finebench.recipe import load_recipe
from finebench.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = tiny_recipe(extra_train="threads = 1")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tiny_bars(tmp_path_factory.mktemp("elsewhere"), 48, 40)


def test_the_flag_wins_then_the_environment_then_the_recipe_then_data(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert choose_data_root() == (tmp_path / "data", "default")
    assert choose_data_root(None, "data") == (tmp_path / "data", "default")
    assert choose_data_root(None, "from_recipe") == (tmp_path / "from_recipe", "recipe")
    monkeypatch.setenv(ENV_VAR, "from_env")
    assert choose_data_root(None, "from_recipe") == (tmp_path / "from_env", ENV_VAR)
    assert choose_data_root("from_flag", "from_recipe") == (tmp_path / "from_flag", "--data-root")
    assert resolve_data_root("from_flag").is_absolute()


def test_run_with_a_missing_data_root_is_one_error_and_creates_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    missing = tmp_path / "nonexistent"
    with pytest.raises(FinebenchError, match=r"data root .*nonexistent \(from --data-root\) does not exist"):
        run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=missing, quiet=True)
    assert not missing.exists()
    assert not (tmp_path / "results").exists()
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(FinebenchError, match=r"\(from FINEBENCH_DATA\) does not exist"):
        run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", quiet=True)
    assert not missing.exists()


def test_run_uses_finebench_data_records_the_root_and_prepares_nothing_in_a_second_place(tmp_path, prepared) -> None:
    """The issue's reproduction: `prepare` into $FINEBENCH_DATA, then `run` in another folder."""
    (tmp_path / "tiny.toml").write_text(RECIPE)
    env = {**os.environ, ENV_VAR: str(prepared), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "finebench", "run", "tiny.toml", "--results-dir", "results", "-q"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "data").exists()  # the embedded mnist5k was not prepared again under ./data
    (config,) = (tmp_path / "results" / "tiny").glob("*/config.json")
    assert json.loads(config.read_text())["dataset"]["root"] == str(prepared)
    assert json.loads(config.with_name("summary.json").read_text())["status"] == "finished"


def test_bench_reads_the_epoch_size_from_the_root_in_finebench_data(tmp_path, prepared, monkeypatch) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    monkeypatch.setenv(ENV_VAR, str(prepared))
    (row,) = bench_recipe(str(recipe), images=16)
    assert row.train_images == 48  # the tiny store's, not the spec's size of the real mnist5k
