"""Recipes: validation errors name file and field, overrides, expansion into runs, stable run ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from finebench.errors import FinebenchError
from finebench.overrides import apply_overrides
from finebench.recipe import expand_runs, load_recipe, run_id_for

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

MINIMAL = """
seeds = [0, 1]
[dataset]
name = "mnist5k"
[model]
backbone = "wrn"
options = { depth = 10, width = 1 }
[[variants]]
kind = "baseline"
[[variants]]
kind = "attention"
attention_depth = 2
attention_width = 2
[train]
epochs = 2
batch_size = 16
schedule = "cosine"
"""


def write(tmp_path: Path, text: str, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_recipe_expands_to_every_variant_for_every_seed(tmp_path):
    loaded = load_recipe(write(tmp_path, MINIMAL))
    runs = expand_runs(loaded)
    assert loaded.name == "tiny"
    assert [(r.variant_name, r.seed) for r in runs] == [
        ("baseline", 0), ("baseline", 1), ("attention-ad2-aw2", 0), ("attention-ad2-aw2", 1)
    ]
    assert len({r.run_id for r in runs}) == 4
    assert runs[2].config["variant"]["options"]["attention_width"] == 2
    assert runs[2].config["train"]["epochs"] == 2 and runs[2].config["seed"] == 0


def test_run_ids_are_stable_and_ignore_paths_and_worker_counts(tmp_path):
    first = expand_runs(load_recipe(write(tmp_path, MINIMAL)))
    again = expand_runs(load_recipe(write(tmp_path, MINIMAL), ["dataset.root=/elsewhere", "train.workers=4"]))
    changed = expand_runs(load_recipe(write(tmp_path, MINIMAL), ["train.lr=0.01"]))
    assert [r.run_id for r in first] == [r.run_id for r in again]
    assert not {r.run_id for r in first} & {r.run_id for r in changed}
    assert run_id_for({"b": 1, "a": 2}) == run_id_for({"a": 2, "b": 1})
    explicit_default = expand_runs(load_recipe(write(tmp_path, MINIMAL), ["train.label_smoothing=0.0"]))
    assert [r.run_id for r in first] == [r.run_id for r in explicit_default]


def test_only_keeps_variants_by_name_or_kind_and_rejects_unknown_names(tmp_path):
    loaded = load_recipe(write(tmp_path, MINIMAL))
    assert {r.variant_name for r in expand_runs(loaded, ["attention"])} == {"attention-ad2-aw2"}
    assert {r.variant_name for r in expand_runs(loaded, ["baseline"])} == {"baseline"}
    with pytest.raises(FinebenchError, match=r"--only se: not a variant"):
        expand_runs(loaded, ["se"])


def test_dotted_overrides_parse_toml_values_and_index_lists():
    data = {"train": {"epochs": 200}, "variants": [{"kind": "baseline"}, {"kind": "attention"}]}
    apply_overrides(data, ["train.epochs=1", "train.milestones=[1, 2]", "variants.1.gates=sigmoid",
                           "train.precision=fp32"], "r.toml")
    assert data["train"] == {"epochs": 1, "milestones": [1, 2], "precision": "fp32"}
    assert data["variants"][1]["gates"] == "sigmoid"
    with pytest.raises(FinebenchError, match="expected KEY=VALUE"):
        apply_overrides(data, ["train.epochs"], "r.toml")
    with pytest.raises(FinebenchError, match="variants.5"):
        apply_overrides(data, ["variants.5.gates=none"], "r.toml")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("[train]", "[train]\nepochz = 3"), r"tiny\.toml: train\.epochz: unknown key$"),
        (("epochs = 2", 'epochs = "two"'), r"tiny\.toml: train\.epochs: Input should be a valid integer.*'two'"),
        (("epochs = 2", "epochs = 0"), r"tiny\.toml: train\.epochs: Input should be greater than or equal to 1"),
        (("attention_width = 2", "attention_width = 2\ngates = 'relu'"), r"variants\.1\.gates: Input should be"),
        (('kind = "baseline"', 'kind = "transformer"'), r"variants\.0: Input tag 'transformer'"),
        (('name = "mnist5k"', 'name = "imagenet22k"'), r"tiny\.toml: dataset\.name: unknown dataset 'imagenet22k'"),
        (('schedule = "cosine"', 'schedule = "multistep"'), r"train: Value error, schedule 'multistep' needs"),
    ],
)
def test_bad_recipes_raise_one_line_naming_file_and_field(tmp_path, edit, message):
    path = write(tmp_path, MINIMAL.replace(*edit))
    with pytest.raises(FinebenchError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


def test_an_override_with_a_wrong_type_is_reported_like_a_file_error(tmp_path):
    with pytest.raises(FinebenchError, match=r"train\.batch_size: Input should be a valid integer"):
        load_recipe(write(tmp_path, MINIMAL), ["train.batch_size=big"])


def test_invalid_toml_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(FinebenchError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[train\n"))
    with pytest.raises(FinebenchError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.toml")


def test_duplicate_variants_must_be_named(tmp_path):
    text = MINIMAL + '\n[[variants]]\nkind = "baseline"\n'
    with pytest.raises(FinebenchError, match=r"variant names must be unique, \['baseline'\]"):
        load_recipe(write(tmp_path, text.replace("[train]", "[train]", 1)))


def test_every_shipped_recipe_is_valid_and_the_paper_settings_are_there():
    loaded = {path.stem: load_recipe(path) for path in sorted(RECIPES.glob("*.toml"))}
    for name in ("wrn_cifar10", "wrn_cifar100", "wrn50_stanford_dogs", "wrn50_cub200", "wrn50_stanford_cars",
                 "wrn50_uec_food100", "wrn50_adience", "resnext_imagenet", "ablation_cifar100",
                 "peers_cifar100", "quickstart"):
        assert name in loaded, name
    cifar10 = loaded["wrn_cifar10"].recipe
    assert cifar10.model.options == {"depth": 28, "width": 10, "dropout": 0.0}
    assert (cifar10.train.epochs, cifar10.train.milestones, cifar10.train.gamma) == (200, [60, 120, 160], 0.2)
    assert loaded["wrn_cifar100"].recipe.model.options["depth"] == 40
    ablation = {r.variant_name for r in expand_runs(loaded["ablation_cifar100"])}
    assert {f"attention-ad{d}-aw{w}" for d in (1, 2, 3) for w in (1, 2, 4)} <= ablation
    assert {v.kind for v in loaded["peers_cifar100"].recipe.variants} == {"baseline", "attention", "se", "cbam"}
    dogs = loaded["wrn50_stanford_dogs"].recipe
    assert (dogs.model.backbone, dogs.train.backbone_lr_mult, dogs.train.milestones) == ("wide_resnet50_2", 0.1, [40, 80])


def test_peers_fgvc_aircraft_is_the_cub200_protocol_on_aircraft_trainval():
    """The peers table on FGVC-Aircraft is comparable with cub200's: only the data differ."""
    cub = load_recipe(RECIPES / "peers_cub200.toml").recipe.model_dump()
    aircraft = load_recipe(RECIPES / "peers_fgvc_aircraft.toml").recipe.model_dump()
    assert aircraft["dataset"] == {**cub["dataset"], "name": "fgvc_aircraft", "train_split": "train+val"}
    assert {k: v for k, v in aircraft.items() if k not in ("dataset", "description")} == {
        k: v for k, v in cub.items() if k not in ("dataset", "description")
    }
