"""Transformer backbones from timm (ViT, Swin) at their own image size through ``finebench run
--dry-run``, ``profile`` and a one-epoch ``run``: they accept no other input size, so every pass
finebench makes on its own (the unread-parameter probe included) must use the run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_data import prepare_tiny_bars, tiny_recipe
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT_SIZE = 32
BACKBONES = {
    # Two blocks of ViT-Ti/16 at 32 px: 2x2 patches.
    "vit": ("timm:vit_tiny_patch16_224", f"{{ img_size = {INPUT_SIZE}, depth = 2 }}"),
    # One block per stage of a narrow Swin-T at 32 px: 8x8 patches in 2x2 windows, down to 1x1.
    "swin": ("timm:swin_tiny_patch4_window7_224", (f"{{ img_size = {INPUT_SIZE}, window_size = 2, "
                                                   "depths = [1, 1, 1, 1], embed_dim = 24, num_heads = [1, 1, 1, 1] }")),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tiny_bars(tmp_path_factory.mktemp("data"), 48, 20)


def recipe(tmp_path: Path, family: str, variants: tuple[str, ...] = ("baseline", "attention")) -> Path:
    backbone, options = BACKBONES[family]
    path = tmp_path / f"{family}.toml"
    path.write_text(tiny_recipe(variants=variants, attention_depth=1, attention_width=1, input_size=INPUT_SIZE,
                                backbone=backbone, model_options=options, extra_model='pretrained = "none"',
                                extra_train="threads = 1"))
    return path


def invoke(*args: str) -> str:
    from finebench.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


@pytest.mark.parametrize("family", list(BACKBONES))
def test_a_transformer_at_its_own_image_size_profiles_and_dry_runs(family: str, tmp_path: Path,
                                                                  data_root: Path) -> None:
    path = recipe(tmp_path, family)
    report = json.loads(invoke("profile", str(path), "--json"))
    assert report["input_size"] == INPUT_SIZE
    baseline, attention = report["rows"]
    assert attention["flops"] > baseline["flops"] > 0 and attention["params"] > baseline["params"] > 0
    table = invoke("run", str(path), "--data-root", str(data_root), "--results-dir", str(tmp_path / "results"),
                   "--dry-run")
    assert table.count("│ new ") == 2, table  # both runs planned, nothing on disk
    for row in (baseline, attention):  # the dry run's counts are profile's (the table's K/M units)
        params = f"{row['params'] / 1e6:.2f}M" if row["params"] >= 1e6 else f"{row['params'] / 1e3:.2f}K"
        assert f" {params} │" in table, (row, table)
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(BACKBONES))
def test_a_transformer_at_its_own_image_size_trains_an_epoch(family: str, tmp_path: Path, data_root: Path) -> None:
    path = recipe(tmp_path, family, ("baseline",))
    invoke("run", str(path), "--data-root", str(data_root), "--results-dir", str(tmp_path / "results"), "--quiet")
    [summary_file] = (tmp_path / "results").glob("*/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert (summary["status"], summary["epochs_completed"], summary["input_size"]) == ("finished", 1, INPUT_SIZE)
    assert summary["params"] > 0 and summary["flops"] > 0
