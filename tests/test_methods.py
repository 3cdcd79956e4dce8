"""The method registry: every command reads a method's options, name, attachment and cost from its module."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch

import finebench.methods
from finebench.errors import FinebenchError
from finebench.methods import (
    METHODS,
    Method,
    MethodOptions,
    build_model,
    get_method,
    parse_options,
)
from finebench.methods.registry import list_methods
from finebench.models.output import ModelOutput
from finebench.recipe import (
    Recipe,
    expand_runs,
    load_recipe,
    variant_name,
)
from finebench.train.evaluate import evaluate
from finebench.train_settings import TrainSection

TINY_WRN = {"depth": 10, "width": 1}


def test_every_method_module_is_discovered_and_registered_baseline_first() -> None:
    """Every module of finebench/methods/ that declares a ``METHOD`` is registered under its kind
    by importing the package (no list to keep): the machinery modules (base, registry, the shared
    parts) declare none. Baseline leads the listings; the rest follow their kinds' names."""
    package = Path(finebench.methods.__file__).parent
    modules = sorted(path.stem for path in package.glob("*.py") if not path.stem.startswith("_"))
    declared = {name: getattr(importlib.import_module(f"finebench.methods.{name}"), "METHOD", None) for name in modules}
    methods = {name: method for name, method in declared.items() if method is not None}
    assert {method.kind for method in methods.values()} == set(METHODS)
    assert all(METHODS[method.kind] is method for method in methods.values())
    assert list(METHODS) == ["baseline", *sorted(set(METHODS) - {"baseline"})]
    assert {"base", "registry"} <= set(declared) - set(methods)
    assert all(isinstance(method, Method) and method.kind == kind for kind, method in METHODS.items())


def test_the_recipe_variant_union_is_the_registry() -> None:
    variants = Recipe.model_fields["variants"].annotation.__args__[0]  # list[Annotated[Union[...], ...]]
    union = variants.__origin__.__args__ if hasattr(variants, "__origin__") else variants.__args__
    assert {option.model_fields["kind"].annotation.__args__[0] for option in union} == set(METHODS)


@pytest.mark.parametrize(
    ("kind", "options", "name"),
    [
        ("baseline", {}, "baseline"),
        ("attention", {}, "attention-ad3-aw4"),
        ("attention", {"attention_depth": 2, "gates": "sigmoid", "output_mode": "50"}, "attention-ad2-aw4-gates-sigmoid-out50"),
        ("se", {}, "se"),
        ("se", {"reduction": 8}, "se-r8"),
        ("cbam", {"reduction": 4}, "cbam-r4"),
        ("eca", {}, "eca"),
    ],
)
def test_each_method_names_its_table_rows(kind: str, options: dict, name: str) -> None:
    assert variant_name(parse_options(kind, options)) == name


def test_attention_settings_are_in_the_papers_terms() -> None:
    options = parse_options("attention", {"attention_width": 2, "gates": "sigmoid"})
    assert get_method("attention").settings(options) == "AD3 AW2 gates sigmoid output mixture reg_w 0.001"
    assert get_method("se").settings(parse_options("se", {})) == "reduction 16"
    assert get_method("baseline").settings(parse_options("baseline", {})) == "-"


def test_a_run_config_with_taps_and_their_depth_rebuilds_the_same_options() -> None:
    options = parse_options("attention", {"taps": ["group2", "group1"]})
    assert options.attention_depth == 2
    assert parse_options("attention", options.options()) == options  # config.json holds both
    with pytest.raises(FinebenchError, match="not both"):
        parse_options("attention", {"taps": ["group2"], "attention_depth": 3})


@pytest.mark.parametrize(
    ("backbone", "kind", "message"),
    [
        ("wrn", "eca", "variant 'eca' on wrn: expected a timm backbone \\(timm:<name>\\)"),
        ("torchvision:resnet18", "se", "variant 'se' on torchvision:resnet18: .*registered backbone or a timm model"),
    ],
)
def test_a_method_that_cannot_attach_says_what_works_in_one_line(backbone: str, kind: str, message: str) -> None:
    with pytest.raises(FinebenchError, match=message) as caught:
        get_method(kind).check_backbone(backbone, parse_options(kind, {}))
    assert "\n" not in str(caught.value)


def test_the_dry_run_reports_a_method_that_cannot_attach(tmp_path: Path) -> None:
    from tiny_data import DATASET, prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 16, 8)
    recipe = tmp_path / "eca.toml"
    recipe.write_text(tiny_recipe(variants=("baseline",)).replace('kind = "baseline"', 'kind = "eca"'))
    assert DATASET in recipe.read_text()
    result = subprocess.run(
        [sys.executable, "-m", "finebench", "run", str(recipe), "--data-root", str(root), "--dry-run",
         "--results-dir", str(tmp_path / "results")], capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "variant 'eca' on wrn: expected a timm backbone" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "results").exists()


def test_list_methods_gives_each_methods_options_and_cost() -> None:
    infos = {info["kind"]: info for info in list_methods()}
    assert infos["attention"]["options"]["attention_width"] == 4
    assert infos["se"]["options"] == {"reduction": 16}
    assert infos["baseline"]["test_forward_passes"] == 1 and infos["baseline"]["train_passes_per_image"] == 1


class DoubledOptions(MethodOptions):
    kind: Literal["doubled_test"]
    epochs: int = 1
    """Train this method twice as long as the recipe says when 2."""


class Doubled(Method):
    """A method whose paper's protocol differs: its own train settings, and a record beyond top-1."""

    kind = "doubled_test"
    description = "test method: its own epochs and a record of its own"
    Options = DoubledOptions

    def train_settings(self, train: TrainSection, options: DoubledOptions) -> TrainSection:  # type: ignore[override]
        return train if options.epochs == 1 else train.model_copy(update={"epochs": train.epochs * options.epochs})

    def eval_counts(self, output, labels):  # noqa: ANN001, ANN201
        return [(output.logits.argmax(1) != labels).sum()]

    def eval_metrics(self, counts, images, model):  # noqa: ANN001, ANN201
        return {"test_error": 100.0 * counts[0] / images}


def test_a_methods_own_train_settings_enter_the_run_config_and_id_only_when_they_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiny_data import tiny_recipe

    monkeypatch.setitem(METHODS, "doubled_test", Doubled())
    path = tmp_path / "recipe.toml"
    path.write_text(tiny_recipe(epochs=2))
    loaded = load_recipe(path)
    plain = expand_runs(loaded)[0]
    runs = {}
    for epochs in (1, 3):
        variant = DoubledOptions(kind="doubled_test", epochs=epochs)
        recipe = loaded.recipe.model_copy(update={"variants": [variant]})
        runs[epochs] = expand_runs(type(loaded)(recipe, loaded.name, loaded.path))[0]
    assert runs[1].train == loaded.recipe.train and runs[1].config["train"] == plain.config["train"]
    assert runs[3].train.epochs == 6 and runs[3].config["train"]["epochs"] == 6
    assert runs[3].run_id != runs[1].run_id


def test_a_methods_records_beyond_top1_reach_the_evaluation() -> None:
    torch.manual_seed(0)
    model = build_model("wrn", 3, "baseline", None, TINY_WRN)
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    metrics = evaluate(model, [(images, labels)], device=torch.device("cpu"), method=Doubled())
    assert metrics["test_error"] == pytest.approx(100.0 - metrics["test_top1"])



class TwoViewOptions(MethodOptions):
    kind: Literal["two_view_test"]


class TwoView(Method):
    """Predicts from the image and its mirror image, logits averaged (WS-DAN's raw + crop, in shape)."""

    kind = "two_view_test"
    description = "test method: two passes per test prediction"
    Options = TwoViewOptions
    test_forward_passes = 2

    def predict(self, model, images):  # noqa: ANN001, ANN201
        """The documented idiom (docs/METHODS.md §4): a new output of the averaged logits and their
        log-softmax, not one pass's output with two fields replaced (its other fields are that pass's)."""
        logits = (model(images).logits + model(images.flip(3)).logits) / 2
        return ModelOutput(torch.log_softmax(logits.float(), dim=1), logits)


def test_a_methods_test_time_passes_are_what_is_evaluated_and_costed(monkeypatch: pytest.MonkeyPatch) -> None:
    from finebench.profile import profile_model, profile_variants

    torch.manual_seed(0)
    model = build_model("wrn", 3, "baseline", None, TINY_WRN).eval()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        expected = ((model(images).logits + model(images.flip(3)).logits) / 2).argmax(1)
    metrics = evaluate(model, [(images, labels)], device=torch.device("cpu"), method=TwoView())
    assert metrics["test_top1"] == pytest.approx(100.0 * float((expected == labels).float().mean()))
    one = profile_model(model, 16).flops
    assert profile_model(model, 16, TwoView()).flops == 2 * one
    monkeypatch.setitem(METHODS, "two_view_test", TwoView())
    rows = profile_variants("wrn", 3, 16, [("two-view", "two_view_test", None)], TINY_WRN)
    assert rows[1].flops == 2 * rows[0].flops and rows[1].test_forward_passes == 2
