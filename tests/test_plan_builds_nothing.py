"""The planner only checks and decides (issue 30): building the model, the loaders and the cost is
the run's (``finebench.factory``, ``finebench.cost``); ``finebench run``'s selection flags reach
every way of running as one ``RunSelection``."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_data import CLASSES, prepare_tiny_bars, tiny_recipe
from typer.testing import CliRunner

import finebench.data.loader
import finebench.launch
import finebench.methods
from finebench.cli import app
from finebench.errors import FinebenchError
from finebench.launch import Launch, run_recipe_command
from finebench.plan import RunSelection, decide_runs, plan_runs, preflight
from finebench.recipe import load_recipe
from finebench.train.runtime import DistContext


def test_the_planner_checks_and_decides_without_building_a_model_or_a_loader(tmp_path: Path, monkeypatch) -> None:
    data_root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(variants=("baseline", "attention"), input_size=16))
    loaded = load_recipe(recipe)

    def refuse(*args, **kwargs):
        raise AssertionError("the planner built something")

    monkeypatch.setattr(finebench.methods, "build_model_from_config", refuse)
    monkeypatch.setattr(finebench.data.loader, "build_loaders", refuse)
    plan = plan_runs(loaded, results_dir=tmp_path / "results", data_root=data_root, only=())
    decisions = decide_runs(plan, RunSelection())
    to_train = [run for run in plan.runs if decisions[run.run_id] == "train"]
    assert len(to_train) == 2
    preflight(loaded, plan, to_train, DistContext(), quiet=True)
    # what the runner then builds from: the data's class count and input side, as the loaders read them
    assert (plan.num_classes, plan.input_size) == (CLASSES, 16)
    assert not (tmp_path / "results").exists()  # nothing written


def test_the_selection_flags_reach_the_launch_as_one_object_and_round_trip(tmp_path: Path, monkeypatch) -> None:
    """The processes a command starts (``--jobs``, ``--submit``, workers) get the selection back as
    ``RunSelection.argv()``: parsed again, it is the same selection."""
    seen: list[tuple[RunSelection, Launch]] = []

    def capture(recipe, overrides, *, selection, launch, **kwargs) -> int:
        seen.append((selection, launch))
        return 0

    monkeypatch.setattr(finebench.launch, "run_recipe_command", capture)
    chosen = RunSelection(("baseline", "attention"), retry_failed=True, restart=True, discard_finished=True)
    result = CliRunner().invoke(app, ["run", "r.toml", *chosen.argv(), "--jobs", "3"])
    assert result.exit_code == 0, result.output
    [(selection, launch)] = seen
    assert selection == chosen
    assert launch == Launch(jobs=3)
    result = CliRunner().invoke(app, ["run", "r.toml"])
    assert result.exit_code == 0 and seen[-1][0] == RunSelection()


@pytest.mark.parametrize("launch", [Launch(jobs=2, nproc_per_node=2), Launch(jobs=2, submit="local"),
                                    Launch(submit="slurm", nproc_per_node=2)])
def test_two_ways_of_running_at_once_are_one_line_and_exit_2(tmp_path: Path, launch: Launch) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe())
    with pytest.raises(FinebenchError, match="give one of them") as raised:
        run_recipe_command(str(recipe), [], results_dir=str(tmp_path / "results"), data_root=None,
                           selection=RunSelection(), launch=launch)
    assert raised.value.exit_code == 2
    assert not (tmp_path / "results").exists()
