"""Issue 22 (reliability, second round): what a new user and a hostile tester broke, one test each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finebench.errors import FinebenchError
from finebench.profile import profile_recipe_backbones
from finebench.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """
seeds = [0]
[dataset]
name = "mnist5k"
input_size = 32
[model]
backbone = ["timm:resnet10t", "torchvision:resnet18"]
[[variants]]
kind = "baseline"
[train]
epochs = 1
batch_size = 8
lr = 0.05
schedule = "constant"
"""


def finebench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finebench", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize(("edit", "message"), [
    (("lr = 0.05", 'lr = "0.05"'), "train.lr: Input should be a valid number"),
    (("epochs = 1", "epochs = true"), "train.epochs: Input should be a valid integer"),
    (("seeds = [0]", "seeds = [true]"), "seeds.0: Input should be a valid integer"),
    (("input_size = 32", "input_size = 32.0"), "dataset.input_size: Input should be a valid integer"),
])
def test_a_quoted_number_or_a_boolean_where_a_number_goes_is_an_error(tmp_path: Path, edit, message) -> None:
    """Item 5: the schema no longer coerces "0.05" to 0.05 or true to 1 (an int where a float goes still works)."""
    recipe = tmp_path / "typed.toml"
    recipe.write_text(RECIPE.replace(*edit))
    with pytest.raises(FinebenchError, match=message):
        load_recipe(recipe)
    (tmp_path / "ok.toml").write_text(RECIPE.replace("lr = 0.05", "lr = 1"))
    assert load_recipe(tmp_path / "ok.toml").recipe.train.lr == 1.0


def test_set_with_a_boolean_for_an_integer_exits_2_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text(RECIPE)
    result = finebench("run", "r.toml", "--dry-run", "--set", "train.epochs=true", cwd=tmp_path)
    assert result.returncode == 2
    assert "train.epochs: Input should be a valid integer" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_the_shipped_several_backbone_recipe_dry_runs_and_profiles_each_backbone(tmp_path: Path) -> None:
    """Item 6: ``finebench run recipes/any_backbone_cub200.toml --dry-run`` died in recipe_settings."""
    dry = finebench("run", str(ROOT / "recipes" / "any_backbone_cub200.toml"), "--dry-run", "--data-root",
                    str(tmp_path), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-1500:]
    assert "Traceback" not in dry.stderr
    (tmp_path / "r.toml").write_text(RECIPE)
    reports = profile_recipe_backbones(str(tmp_path / "r.toml"))
    assert [report.backbone for report in reports] == ["timm:resnet10t", "torchvision:resnet18"]
    assert reports[0].rows[0].params != reports[1].rows[0].params
    listed = finebench("profile", "r.toml", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-1500:]
    assert [entry["backbone"] for entry in json.loads(listed.stdout)] == ["timm:resnet10t", "torchvision:resnet18"]


def test_pretrained_none_turns_a_recipes_weights_off_and_bad_values_fail_at_load(tmp_path: Path) -> None:
    """Item 13: ``--set model.pretrained=none`` means no weights; "" and a missing file are one-line
    errors when the recipe is loaded (so at --dry-run), not when the run starts."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.replace('backbone = ["timm:resnet10t", "torchvision:resnet18"]',
                                     'backbone = "timm:resnet10t"\npretrained = "timm"'))
    assert load_recipe(recipe).recipe.model.pretrained == "timm"
    assert load_recipe(recipe, ["model.pretrained=none"]).recipe.model.pretrained is None
    with pytest.raises(FinebenchError, match="model.pretrained: .*is empty: expected 'none'"):
        load_recipe(recipe, ['model.pretrained=""'])
    with pytest.raises(FinebenchError, match="model.pretrained: .*weights file './missing.pth' does not exist"):
        load_recipe(recipe, ["model.pretrained=./missing.pth"])
    result = finebench("run", "r.toml", "--dry-run", "--set", "model.pretrained=", cwd=tmp_path)
    assert result.returncode == 2 and "is empty: expected 'none'" in result.stderr


@pytest.mark.parametrize(("backbone", "kind", "options", "backbone_options", "size"), [
    ("wrn", "baseline", None, {"depth": 10, "width": 1}, 32),
    ("wrn", "attention", {"attention_depth": 2, "attention_width": 2}, {"depth": 10, "width": 1}, 32),
    ("wrn", "cbam", None, {"depth": 10, "width": 1}, 32),
    ("wrn", "bcnn", None, {"depth": 10, "width": 1}, 32),
    ("resnext_cifar", "se", None, {"depth": 11, "cardinality": 2, "base_width": 4}, 32),
    ("timm:resnet10t", "attention", None, None, 64),
    ("timm:resnet10t", "eca", None, None, 64),
    ("torchvision:resnet18", "attention", {"attention_depth": 1}, None, 64),
])
def test_fvcore_agrees_with_torchs_flop_counter_on_convolutions_and_matrix_products(
    backbone, kind, options, backbone_options, size
) -> None:
    """Item 12: fvcore (no release since 2022, traces through deprecated TorchScript) is checked by
    ``profile`` against torch.utils.flop_counter on every model; here on every method and family."""
    from finebench.methods import build_model, get_method
    from finebench.profile import TensorOutputs, cross_check_flops

    model = build_model(backbone, 10, kind, options, backbone_options).eval()
    check = cross_check_flops(TensorOutputs(model, get_method(kind)), size)
    assert check.fvcore_macs > 0
    assert check.agrees, str(check)


def test_a_resume_that_fails_changes_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 4: an unreadable last.pt used to rewrite summary.json first (epochs_completed 1 -> 0)."""
    from tiny_data import prepare_tiny_bars, tiny_recipe

    from finebench.errors import Interrupted
    from finebench.recipe import expand_runs
    from finebench.results import RunDir
    from finebench.runner import run_recipe

    root = prepare_tiny_bars(tmp_path / "data", 32, 16)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(epochs=3) + "threads = 1\n")
    loaded = load_recipe(recipe)
    run_dir = RunDir(tmp_path / "results", "tiny", expand_runs(loaded)[0].run_id)
    save = RunDir.save_checkpoint

    def save_then_stop(self: RunDir, state) -> None:  # noqa: ANN001
        save(self, state)
        raise KeyboardInterrupt  # as Ctrl-C right after the first epoch's checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True)
    assert run_dir.state().kind == "resumable"
    run_dir.checkpoint_path.write_bytes(b"not a checkpoint")
    before = {path.name: path.read_bytes() for path in run_dir.path.iterdir() if path.is_file()}
    with pytest.raises(FinebenchError):
        run_recipe(loaded, results_dir=tmp_path / "results", data_root=root, quiet=True)
    after = {path.name: path.read_bytes() for path in run_dir.path.iterdir() if path.is_file()}
    assert after == before
