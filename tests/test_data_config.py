"""The run's data settings resolved once (``finebench.data.config``): the per-dataset default input
size in each ``DatasetSpec``, the resolver's answers, and the rule that resolved values stay out of
run ids (issue 30)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from finebench.data import registry
from finebench.data.config import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    planned_input_size,
    resolve_data_config,
)
from finebench.data.presets import ColorJitter, EvalTransform
from finebench.errors import FinebenchError
from finebench.recipe import expand_runs, load_recipe

SMALL = {"name": "small", "image_max_side": 32, "image_size": [32, 32]}
PHOTOS = {"name": "photos", "image_max_side": 500, "image_size": None}


def _recipe(tmp_path: Path, dataset: str, extra: str = "") -> Path:
    path = tmp_path / "r.toml"
    path.write_text(f'seeds = [0]\n[dataset]\nname = "{dataset}"\n{extra}\n[model]\nbackbone = "wrn"\n'
                    '[[variants]]\nkind = "baseline"\n[train]\nepochs = 1\nbatch_size = 8\nschedule = "constant"\n')
    return path


def test_the_default_input_size_before_the_store_is_read_is_the_dataset_specs(tmp_path: Path) -> None:
    # Before issue 30 a table in recipe.py held it; now a dataset declares it, so a new one is one file.
    loaded = load_recipe(_recipe(tmp_path, "mnist5k"))
    assert loaded.input_size() == registry.get_spec("mnist5k").input_size == 28
    with registry.override(replace(registry.get_spec("mnist5k"), input_size=40)):
        assert loaded.input_size() == 40
    assert load_recipe(_recipe(tmp_path, "cub200")).input_size() == 224  # photos: the imagenet crop
    assert load_recipe(_recipe(tmp_path, "mnist5k", "input_size = 20")).input_size() == 20


@pytest.mark.slow
def test_each_specs_default_is_what_its_prepared_store_resolves_to(tmp_path: Path) -> None:
    from finebench.data.loader import plan_loaders
    from finebench.data.prepare import prepare_dataset
    from finebench.data.store import read_meta

    prepare_dataset("mnist5k", tmp_path, quiet=True)
    meta = read_meta(tmp_path, "mnist5k")
    spec = registry.get_spec("mnist5k")
    assert resolve_data_config({}, meta).input_size == planned_input_size({}, spec) == 28
    assert plan_loaders("mnist5k", tmp_path).input_size == 28


def test_small_images_of_one_size_keep_it_with_the_cifar_augmentation() -> None:
    data = resolve_data_config({}, SMALL)
    assert data == DataConfig("cifar", None, None, True, CIFAR_MEAN, CIFAR_STD, None, 32)
    assert data.input_size == 32
    assert resolve_data_config({"input_size": 24}, SMALL).input_size == 24


def test_photos_resize_to_256_over_224_of_the_crop_and_take_imagenet_statistics() -> None:
    data = resolve_data_config({"input_size": 112}, PHOTOS)
    assert (data.augmentation, data.crop, data.resize, data.mean, data.std) == ("imagenet", 112, 128, IMAGENET_MEAN,
                                                                                IMAGENET_STD)
    assert resolve_data_config({}, PHOTOS).input_size == 224
    assert resolve_data_config({"resize": [300, 260]}, PHOTOS).resize == (300, 260)  # config.json's list form


def test_only_training_flips_and_jitters() -> None:
    jitter = {"brightness": 0.2}  # as a run's config.json holds it
    data = resolve_data_config({"color_jitter": jitter, "normalize": "half"}, PHOTOS)
    assert data.color_jitter == ColorJitter(brightness=0.2) and data.mean == (0.5, 0.5, 0.5)
    train, test = data.transform(train=True), data.transform(train=False)
    assert (train.flip, train.jitter) == (True, ColorJitter(brightness=0.2))
    assert (test.flip, test.jitter, test.train) == (False, None, False)
    assert EvalTransform.of(test) == EvalTransform("imagenet", 224, 256, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize(("settings", "meta", "expected"), [
    ({"augmentation": "crop"}, SMALL, "augmentation 'crop' is not valid"),
    ({"augmentation": "none"}, PHOTOS, "augmentation 'none' needs input_size"),
    ({"resize": 20}, PHOTOS, "dataset.resize = 20: smaller than the 224 px crop"),
    ({"resize": 40}, SMALL, "dataset.resize = 40: augmentation 'cifar' has no resize"),
])
def test_settings_the_store_cannot_take_are_one_line_errors(settings: dict, meta: dict, expected: str) -> None:
    with pytest.raises(FinebenchError, match=expected) as error:
        resolve_data_config(settings, meta)
    assert "\n" not in str(error.value)


def test_resolved_values_stay_out_of_the_run_id(tmp_path: Path) -> None:
    # The id hashes what the recipe says; the input size the store resolves to is recorded, not hashed.
    unset = expand_runs(load_recipe(_recipe(tmp_path, "mnist5k")))[0]
    assert unset.config["dataset"].get("input_size") is None
    given = expand_runs(load_recipe(_recipe(tmp_path, "mnist5k", "input_size = 28")))[0]
    assert given.run_id != unset.run_id
