"""recipes/foundation_*.toml (issue 31, part 4): linear probe and full fine-tuning of DINOv2, CLIP
and ImageNet-21k ViT-B towers on five fine-grained sets. Each recipe must feed its backbone the
images its weights were trained on (timm's ``pretrained_cfg`` mean/std and input size), a probe
must train nothing but the classifier in every epoch, and a recipe whose weights are not cached
must stop in one line naming where to put them."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from in_process import finebench_in_process

from finebench.data import registry
from finebench.data.config import normalization
from finebench.methods import build_model, get_method
from finebench.models.network import parameter_groups, unwrap
from finebench.models.registry import missing_pretrained_weights
from finebench.recipe import TrainSection, expand_runs, load_recipe
from finebench.train.step import build_train_step

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("foundation_*.toml"))
TAGS = {"dinov2": "vit_base_patch14_dinov2.lvd142m", "clip": "vit_base_patch16_clip_quickgelu_224.openai",
        "in21k": "vit_base_patch16_224.augreg_in21k"}
DATASETS = ("cub200", "nabirds", "stanford_dogs", "stanford_cars", "flowers102")


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("foundation_recipes", ROOT / "tools" / "foundation_recipes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_the_grid_is_three_backbones_by_two_protocols_by_five_datasets() -> None:
    names = {path.name for path in RECIPES}
    expected = {f"foundation_{b}_{p}_{d}.toml" for b in TAGS for p in ("probe", "finetune") for d in DATASETS}
    assert names == expected
    for dataset in DATASETS:  # each a registered dataset (get_spec refuses an unknown name)
        assert registry.get_spec(dataset).name == dataset


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_normalisation_and_input_size_are_timms_pretrained_cfg_of_the_tag(path: Path) -> None:
    """Read from the TOML and through finebench's own resolution (what the loaders will use), both
    against timm's cfg. The numbers are decimal literals copied from timm's Python floats, which
    round-trip exactly, so the comparison is exact (float64 on both sides)."""
    data = tomllib.loads(path.read_text())
    backbone = data["model"]["backbone"]
    tag = TAGS[path.stem.split("_")[1]]
    assert backbone == f"timm:{tag}" and data["model"]["pretrained"] == "timm"
    cfg = timm.models.get_pretrained_cfg(tag)
    assert data["dataset"]["input_size"] == cfg.input_size[1] == cfg.input_size[2]
    assert tuple(data["dataset"]["normalize"]["mean"]) == tuple(cfg.mean)
    assert tuple(data["dataset"]["normalize"]["std"]) == tuple(cfg.std)
    recipe = load_recipe(path, check_dataset=False).recipe
    mean, std = normalization(recipe.dataset.normalize, ((0.0,) * 3, (1.0,) * 3))
    assert (tuple(mean), tuple(std)) == (tuple(cfg.mean), tuple(cfg.std))
    assert recipe.dataset.input_size == cfg.input_size[-1]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_the_header_names_the_tag_source_and_licence_and_the_protocol_is_set(path: Path) -> None:
    text = path.read_text()
    header = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    tag = TAGS[path.stem.split("_")[1]]
    assert f"Weights: timm:{tag};" in header
    assert re.search(r"source: \S", header) and re.search(r"licence: (Apache-2\.0|MIT) ", header), header
    recipe = load_recipe(path, check_dataset=False).recipe
    train = recipe.train
    if "_probe_" in path.name:
        assert train.head_only_epochs == train.epochs, "a linear probe trains only the head in every epoch"
    else:
        assert train.head_only_epochs == 0
    assert recipe.dataset.train_split == ("train+val" if path.stem.endswith("flowers102") else "train")
    runs = expand_runs(load_recipe(path, check_dataset=False))
    assert [run.seed for run in runs] == [0, 1, 2] and len({run.run_id for run in runs}) == 3


def test_the_recipes_are_what_the_generator_writes() -> None:
    written = generator().every_recipe()
    assert sorted(written) == [path.name for path in RECIPES]
    for path in RECIPES:
        assert path.read_text() == written[path.name], f"{path.name}: rerun python tools/foundation_recipes.py"


def test_a_linear_probe_on_a_timm_vit_moves_only_the_linear_classifier_in_every_epoch() -> None:
    """A two-block ViT-Ti at 32 px as the timm ViT baseline of the recipes: with head_only_epochs =
    epochs the head group is exactly the new Linear, and no backbone tensor (class token, position
    embedding, LayerNorms included) moves in any epoch under momentum, while the Linear does."""
    torch.manual_seed(0)
    epochs = 3
    model = build_model("timm:vit_tiny_patch16_224", 4, "baseline", {}, {"img_size": 32, "depth": 2})
    groups = parameter_groups(model)
    classifier = [module for module in unwrap(model).modules() if isinstance(module, torch.nn.Linear)][-1]
    assert {id(p) for p in groups["head"]} == {id(classifier.weight), id(classifier.bias)}
    assert any(p is unwrap(model).backbone.model.cls_token for p in groups["backbone"])
    train = TrainSection(epochs=epochs, batch_size=8, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0,
                         schedule="cosine", precision="fp32", device="cpu", threads=1, head_only_epochs=epochs)
    step = build_train_step(model, train, steps_per_epoch=2, method=get_method("baseline"))
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    start = [p.detach().clone() for p in groups["backbone"]]
    for epoch in range(1, epochs + 1):
        step.epoch = epoch
        head = [p.detach().clone() for p in groups["head"]]
        step(images, labels)
        assert all(not torch.equal(old, new) for old, new in zip(head, groups["head"], strict=True)), epoch
    assert all(torch.equal(old, new) for old, new in zip(start, groups["backbone"], strict=True))


def _no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty Hugging Face and torch hub cache, whatever this machine holds."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))


@pytest.mark.parametrize("tag", sorted(TAGS.values()))
def test_weights_not_in_the_cache_are_one_line_naming_where_to_put_them(tag: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cache(monkeypatch, tmp_path)
    problem = missing_pretrained_weights(f"timm:{tag}", "timm")
    assert problem is not None and "\n" not in problem
    hub_id = timm.models.get_pretrained_cfg(tag).hf_hub_id
    assert f"timm weights for {tag} are not in timm's cache" in problem and f"huggingface.co/{hub_id}" in problem


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_dry_runs_without_weights(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """``--set model.pretrained=none``: the three runs planned, nothing written; without it, the
    dry run warns in one line that the run would stop on the uncached weights."""
    code, out, err = finebench_in_process(monkeypatch, capsys, "run", str(path), "--dry-run", "--set",
                                          "model.pretrained=none", "--data-root", str(tmp_path / "data"),
                                          "--results-dir", str(tmp_path / "results"), columns=250)
    assert code == 0, err
    assert out.count("│ new ") == 3, out
    assert not (tmp_path / "results").exists()
    if path.stem.endswith("_cub200"):
        _no_cache(monkeypatch, tmp_path)
        code, out, err = finebench_in_process(monkeypatch, capsys, "run", str(path), "--dry-run", "--data-root",
                                              str(tmp_path / "data"), "--results-dir", str(tmp_path / "results"),
                                              columns=250)
        tag = TAGS[path.stem.split("_")[1]]
        warning = [line for line in (out + err).splitlines() if "not in timm's cache" in line]
        assert code == 0 and len(warning) == 1 and tag in warning[0], (out, err)
