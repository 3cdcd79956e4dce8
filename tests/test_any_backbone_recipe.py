"""recipes/any_backbone_cub200.toml: its grid, and a tiny offline version of it run end to end on
cluttered MNIST (real digits, a few hundred canvases) with timm's tiny test models."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from finebench.data import registry
from finebench.data.builders import mnist
from finebench.data.builders.base import Example, ParsedDataset
from finebench.data.prepare import prepare_dataset
from finebench.errors import FinebenchError
from finebench.profile import profile_recipe
from finebench.recipe import expand_runs, load_recipe
from finebench.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "any_backbone_cub200.toml"


def test_the_recipe_runs_baseline_and_attention_on_each_of_its_backbones() -> None:
    runs = expand_runs(load_recipe(RECIPE))
    grid = [(run.config["model"]["backbone"], run.variant_kind) for run in runs]
    backbones = ["timm:resnet50.a1_in1k", "timm:convnext_tiny.fb_in1k", "timm:efficientnet_b0.ra_in1k"]
    assert grid == [(b, kind) for b in backbones for kind in ("baseline", "attention")]
    assert len({run.run_id for run in runs}) == 6
    single = expand_runs(load_recipe(RECIPE, ["model.backbone=timm:convnext_tiny.fb_in1k"]))
    assert [run.run_id for run in single] == [run.run_id for run in runs[2:4]]  # the same runs as alone


def test_a_recipe_with_several_backbones_is_profiled_one_at_a_time() -> None:
    with pytest.raises(FinebenchError, match="lists 3 backbones: profile one with --set model.backbone=timm:resnet50"):
        profile_recipe(str(RECIPE))


def test_repeated_backbones_are_a_recipe_error(tmp_path: Path) -> None:
    text = RECIPE.read_text().replace('"timm:convnext_tiny.fb_in1k"', '"timm:resnet50.a1_in1k"')
    (tmp_path / "twice.toml").write_text(text)
    with pytest.raises(FinebenchError, match="model: .*backbone names must be unique"):
        load_recipe(tmp_path / "twice.toml")


@pytest.fixture(scope="module")
def cluttered_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred cluttered-MNIST canvases made by the real builder's ``clutter`` from real digits."""
    images, labels = mnist._load_digits()

    def parse(raw_dir: Path) -> ParsedDataset:
        splits = {}
        for split, (start, count) in {"train": (0, 96), "test": (4000, 40)}.items():
            digits = slice(start, start + count)
            canvases, sources = mnist.clutter(images[digits], 1, mnist.ClutterProtocol(), np.random.default_rng(0))
            splits[split] = [Example(c, int(labels[digits][s])) for c, s in zip(canvases, sources, strict=True)]
        return ParsedDataset(list(mnist.CLASSES), splits, info={"no_flip": True})

    spec = registry.get_spec("cluttered_mnist")
    root = tmp_path_factory.mktemp("data")
    with registry.override(replace(spec, parse=parse, split_sizes={})):
        prepare_dataset("cluttered_mnist", root, quiet=True)
    return root


def tiny_recipe(folder: Path) -> Path:
    """The recipe with tiny timm models, one epoch and small batches on 60×60 cluttered MNIST."""
    data = tomllib.loads(RECIPE.read_text())
    data["dataset"] = {"name": "cluttered_mnist", "input_size": 60, "augmentation": "none"}
    data["model"] = {"backbone": ["timm:test_resnet", "timm:test_convnext"]}
    data["variants"][1]["attention_depth"] = 2
    data["train"].update(epochs=1, batch_size=32, eval_batch_size=40, lr=0.05, milestones=[1], workers=0,
                         precision="fp32", channels_last=False)
    recipe = folder / "any_backbone_tiny.toml"
    recipe.write_text(_toml(data))
    return recipe


def test_a_dry_run_costs_each_backbone_against_its_own_baseline(tmp_path: Path) -> None:
    outcomes = run_recipe(load_recipe(tiny_recipe(tmp_path)), results_dir=tmp_path / "results", dry_run=True,
                          quiet=True)
    params = [o.summary["params"] for o in outcomes]
    assert params[0] < params[1] and params[2] < params[3] and params[0] != params[2]
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_tiny_offline_version_runs_end_to_end_on_cluttered_mnist(tmp_path: Path, cluttered_root: Path) -> None:
    outcomes = run_recipe(load_recipe(tiny_recipe(tmp_path)), results_dir=tmp_path / "results",
                          data_root=cluttered_root, quiet=True)
    assert [o.status for o in outcomes] == ["finished"] * 4
    summaries = [json.loads((o.path / "summary.json").read_text()) for o in outcomes]
    assert [(s["backbone"], s["variant"]) for s in summaries] == [
        ("timm:test_resnet", "baseline"), ("timm:test_resnet", "attention"),
        ("timm:test_convnext", "baseline"), ("timm:test_convnext", "attention"),
    ]
    expected_taps = (["layer3", "layer2"], ["stages.2", "stages.1"])
    for (baseline, attention), taps in zip((summaries[:2], summaries[2:]), expected_taps, strict=True):
        assert attention["params_baseline"] == baseline["params"] < attention["params"]
        assert list(attention["module_flops"]) == taps  # early prediction: stops at the tap
        assert all(flops < attention["flops"] for flops in attention["module_flops"].values())


def _toml(data: dict) -> str:
    """A minimal TOML writer for the recipe's tables (strings, numbers, booleans, lists)."""
    def value(v: object) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict | list) or k == "seeds"]
    for key in ("dataset", "model", "train"):
        lines += [f"[{key}]", *(f"{k} = {value(v)}" for k, v in data[key].items())]
    for variant in data["variants"]:
        lines += ["[[variants]]", *(f"{k} = {value(v)}" for k, v in variant.items())]
    return "\n".join(lines) + "\n"
