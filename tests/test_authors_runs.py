"""Every run the authors logged is a shipped recipe with their settings.

``results/reference/settings/authors_runs.csv`` holds one row per ``log.json`` of
prlz77/attend-and-rectify and prlz77/painless-attention.pytorch (dev), with the log's path as its
source (a subfolder: ``finebench report`` reads the CSVs directly in ``results/reference/`` as
tables of the authors' numbers, which this is not). Each recipe is
resolved exactly as ``finebench run`` resolves it and compared cell by cell; a blank cell is a
setting the log does not state. A recipe that names a log must have its row, and the reverse.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finebench.cli import app
from finebench.models import BACKBONES
from finebench.recipe import expand_runs, load_recipe
from finebench.terminal import logged_settings, recipe_settings, variant_settings

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "results" / "reference" / "settings" / "authors_runs.csv"
RECIPES = ROOT / "recipes"
FINE_GRAINED = {"stanford_dogs", "cub200", "stanford_cars", "uec_food100", "adience"}
TRAIN_COLUMNS = ("lr", "backbone_lr_mult", "batch_size", "accumulation_steps", "epochs", "gamma", "weight_decay",
                 "warmup_epochs", "eval_every")
ATTENTION_COLUMNS = ("attention_depth", "attention_width", "gates", "output_mode", "reg_w")
FIDELITY_COLUMNS = ("optimizer", "batchnorm_group", "stem", "shortcut", "classifier_init", "batchnorm_init")
"""The log-time code's settings (docs/MECHANISM.md §4) every variant has; blank where a backbone has no such option."""
ATTENTION_FIDELITY_COLUMNS = ("tap_norm", "reg_masks")


def table() -> list[dict[str, str]]:
    with TABLE.open(newline="") as handle:
        return list(csv.DictReader(handle))


def same(expected: str, actual: object) -> bool:
    """A cell against a resolved value: numbers as numbers, the rest as text."""
    if isinstance(actual, bool) or not isinstance(actual, int | float):
        return expected == str(actual)
    return float(expected) == float(actual)


def resolved(row: dict[str, str]) -> dict[str, object]:
    """The settings the row's recipe gives the row's variant, in the table's terms."""
    runs = [run for run in expand_runs(load_recipe(RECIPES / f"{row['recipe']}.toml")) if run.variant_kind == row["variant"]]
    assert len({run.variant_name for run in runs}) == 1, f"{row['recipe']}: expected one {row['variant']} variant"
    config = runs[0].config
    model, train = config["model"], config["train"]
    options = {**BACKBONES[model["backbone"]].options, **model["options"]}
    values: dict[str, object] = {
        "dataset": config["dataset"]["name"],
        "backbone": model["backbone"],
        "pretrained": model["pretrained"] or "none",
        "milestones": "/".join(str(m) for m in train["milestones"]),
        **{key: options.get(key, "") for key in ("depth", "width", "dropout", "stem", "shortcut", "classifier_init")},
        **{key: train[key] for key in (*TRAIN_COLUMNS, "optimizer", "batchnorm_group")},
        "batchnorm_init": model["batchnorm_init"],
    }
    if row["variant"] == "attention":
        values.update(config["variant"]["options"])
    return values


def test_the_table_holds_every_logged_attention_run_once() -> None:
    rows = table()
    attention = [row for row in rows if row["variant"] == "attention"]
    assert len(attention) == 9  # 3 CIFAR-10, 1 CIFAR-100, 4 fine-grained, 1 ImageNet
    assert len({row["source"] for row in rows}) == len(rows)
    for row in rows:
        assert re.fullmatch(r"prlz77/(attend-and-rectify|painless-attention\.pytorch@dev):logs/\S+\.json", row["source"])


@pytest.mark.parametrize("row", table(), ids=lambda row: f"{row['recipe']}-{row['variant']}")
def test_each_logged_run_has_a_recipe_with_exactly_its_settings(row: dict[str, str]) -> None:
    values = resolved(row)
    compared = ("dataset", "depth", "width", "dropout", "pretrained", "milestones", *TRAIN_COLUMNS, *FIDELITY_COLUMNS)
    if row["variant"] == "attention":
        compared += ATTENTION_COLUMNS + ATTENTION_FIDELITY_COLUMNS
    wrong = {key: (row[key], values[key]) for key in compared if row[key] != "" and not same(row[key], values[key])}
    assert not wrong, f"{row['recipe']} differs from {row['source']} (logged, recipe): {wrong}"
    # ResNeXt: the log does not say which one; every other backbone exactly
    assert str(values["backbone"]).startswith(row["backbone"])


def test_every_logged_run_trains_with_its_log_time_optimizer_and_schedule() -> None:
    """The issue-20 facts, stated once more outright: CIFAR plain momentum except the dropout
    run (Nesterov); ResNeXt ImageNet drops after 31/61/91 epochs; every row names its code; and
    issue 27's: every run but ResNeXt's (code unpublished) starts its BatchNorms as PyTorch 0.4 did."""
    for row in table():
        values = resolved(row)
        if row["dataset"] in ("cifar10", "cifar100"):
            expected = "nesterov" if "dr=0.3" in row["run"] else "sgd"
            assert values["optimizer"] == expected, row["run"]
            assert values["batchnorm_group"] == 64  # ngpu 2 at batch 128
            assert re.fullmatch(r"painless-attention\.pytorch@[0-9a-f]{7}", row["code"]), row["run"]
        if row["dataset"] == "imagenet":
            assert values["milestones"] == "31/61/91"
        else:  # the 12 runs whose code is published ran on PyTorch 0.4: BatchNorm weights uniform in [0, 1)
            assert values["batchnorm_init"] == "uniform", row["run"]


def test_fidelity_released_restores_the_released_code_for_every_variant() -> None:
    for recipe in sorted({row["recipe"] for row in table()}):
        for run in expand_runs(load_recipe(RECIPES / f"{recipe}.toml", ["fidelity=released"])):
            options = {**BACKBONES.get(run.config["model"]["backbone"], BACKBONES["wrn"]).options,
                       **run.config["model"]["options"]}
            assert run.config["train"]["optimizer"] == "nesterov" and run.config["train"]["batchnorm_group"] == 0
            assert "logged" not in run.config and run.config["fidelity"] == "released"
            assert run.config["model"]["batchnorm_init"] == "ones"
            if run.config["model"]["backbone"] == "wrn":
                assert (options["stem"], options["shortcut"], options["classifier_init"]) == ("bn_relu", "input", "kaiming")
            if run.variant_kind == "attention":
                assert run.config["variant"]["options"]["reg_masks"] == "pooled"
                assert run.config["variant"]["options"]["tap_norm"] == "shared"


@pytest.mark.parametrize("recipe", sorted({row["recipe"] for row in table() if row["variant"] == "attention"}))
def test_a_paper_recipe_keeps_its_baseline_and_fine_grained_ones_three_seeds(recipe: str) -> None:
    loaded = load_recipe(RECIPES / f"{recipe}.toml")
    kinds = [variant.kind for variant in loaded.recipe.variants]
    assert kinds.count("baseline") == 1 and kinds.count("attention") == 1, kinds
    if loaded.recipe.dataset.name in FINE_GRAINED:
        assert len(loaded.recipe.seeds) >= 3


def test_a_recipe_names_every_log_it_reproduces_and_the_table_has_it() -> None:
    by_recipe: dict[str, set[str]] = {}
    for row in table():
        by_recipe.setdefault(row["recipe"], set()).add(row["source"].split(":", 1)[1])
    for path in sorted(RECIPES.glob("*.toml")):
        comments = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#"))
        named = set(re.findall(r"logs/\S+\.json", comments))
        assert named == by_recipe.get(path.stem, set()), path.name
        assert "DESIGN.md" not in comments, path.name


@pytest.mark.parametrize("row", [row for row in table() if row["variant"] == "attention"], ids=lambda row: row["recipe"])
def test_the_dry_run_lines_state_the_logged_settings(row: dict[str, str]) -> None:
    # what `finebench run RECIPE --dry-run` prints: a settings column per variant, a caption for the rest
    loaded = load_recipe(RECIPES / f"{row['recipe']}.toml")
    (attention,) = [v for v in loaded.recipe.variants if v.kind == "attention"]
    settings = variant_settings(attention)
    assert settings == (f"AD{row['attention_depth']} AW{row['attention_width']} gates {row['gates']} "
                        f"output {row['output_mode']} reg_w {float(row['reg_w']):g}")
    caption = recipe_settings(loaded)
    assert f"lr {float(row['lr']):g}" in caption and f"{row['epochs']} epochs" in caption
    assert f"after epochs {row['milestones']}" in caption and f"lr x{float(row['gamma']):g}" in caption
    assert f"batch {row['batch_size']}" in caption
    if row["weight_decay"]:
        assert f"wd {float(row['weight_decay']):g}" in caption
    if row["backbone_lr_mult"] not in ("", "1"):
        assert f"(backbone x{float(row['backbone_lr_mult']):g})" in caption
    assert "fidelity logged" in caption
    (run,) = [r for r in expand_runs(loaded) if r.variant_kind == "attention" and r.seed == loaded.recipe.seeds[0]
              and r.fold in (None, 0)]
    cell = logged_settings(run.config.get("logged"))  # the per-variant part of the settings column
    caption_optimizer = loaded.recipe.train.optimizer
    if row["optimizer"] and row["optimizer"] != caption_optimizer:
        assert f"optimizer {row['optimizer']}" in cell
    for key in ("batchnorm_group", "stem", "shortcut", "classifier_init", "tap_norm", "reg_masks", "batchnorm_init"):
        default = {"batchnorm_group": "0", "stem": "bn_relu", "shortcut": "input", "classifier_init": "kaiming",
                   "tap_norm": "shared", "reg_masks": "pooled", "batchnorm_init": "ones"}[key]
        if row[key] and row[key] != default:
            assert f"{key} {row[key]}" in cell, (key, cell)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted({row["recipe"] for row in table() if row["variant"] == "attention"}))
def test_finebench_run_dry_run_prints_the_logged_settings(recipe: str) -> None:
    rows = [row for row in table() if row["recipe"] == recipe and row["variant"] == "attention"]
    result = CliRunner().invoke(app, ["run", str(RECIPES / f"{recipe}.toml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    for row in rows:
        assert (f"AD{row['attention_depth']} AW{row['attention_width']} gates {row['gates']} "
                f"output {row['output_mode']} reg_w {float(row['reg_w']):g}") in result.stdout
        assert f"lr {float(row['lr']):g}" in result.stdout
        assert f"lr x{float(row['gamma']):g} after epochs {row['milestones']}" in result.stdout
        assert "as logged" in result.stdout and "fidelity logged" in result.stdout
