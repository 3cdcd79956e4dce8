"""Issue 29, part 6: each run records the weights it started from (tag, the loaded file's SHA-256,
the pretraining data the tag names) and the report shows it per row, saying so when a table mixes
pretraining sources."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from test_report import write_run
from tiny_data import prepare_tiny_bars, tiny_recipe

from finebench import report
from finebench.models.provenance import (
    UNKNOWN,
    timm_pretraining,
    torchvision_pretraining,
    weights_provenance,
)
from finebench.recipe import expand_runs, load_recipe
from finebench.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_wrn_weights(path: Path) -> Path:
    """A random-weight WRN-10-1 state dict, as a user's pretrained weights file."""
    from finebench.methods import build_model

    torch.manual_seed(1)
    model = build_model("wrn", 4, backbone_options={"depth": 10, "width": 1})
    torch.save(model.backbone.state_dict(), path)
    return path


def test_a_weights_file_is_recorded_with_its_sha256_and_unknown_pretraining(tmp_path: Path) -> None:
    file = _random_wrn_weights(tmp_path / "weights.pth")
    record = weights_provenance("wrn", str(file))
    assert record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert record["tag"] == str(file.resolve()) and record["file"] == str(file)
    assert record["pretraining"] == UNKNOWN  # a file names no data: never guessed
    none = weights_provenance("wrn", None)
    assert none["sha256"] is None and none["tag"] is None and none["pretraining"] == "none"


@pytest.mark.parametrize(("tag", "data"), [
    ("augreg_in21k", "ImageNet-21k"),
    ("orig_in21k", "ImageNet-21k"),
    ("augreg_in21k_ft_in1k", "ImageNet-21k → ImageNet-1k"),
    ("ms_in22k", "ImageNet-22k"),
    ("a1_in1k", "ImageNet-1k"),
    ("lvd142m", "LVD-142M"),
    ("openai", "WIT-400M (CLIP)"),
    ("fb_ssl_yfcc100m_ft_in1k", UNKNOWN),  # 'ssl' is not known: the whole answer is unknown, not ImageNet-1k
    ("mystery", UNKNOWN),
])
def test_timm_tags_name_their_pretraining_data_or_unknown(tag: str, data: str) -> None:
    assert timm_pretraining(tag) == data


def test_torchvision_weights_name_their_pretraining_data() -> None:
    assert torchvision_pretraining("IMAGENET1K_V2") == "ImageNet-1k"
    assert torchvision_pretraining("COCO_V1") == UNKNOWN


def test_a_run_records_the_weights_it_loaded_without_changing_its_run_id(tmp_path: Path) -> None:
    file = _random_wrn_weights(tmp_path / "weights.pth")
    data_root = prepare_tiny_bars(tmp_path / "data", 20, 10)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tiny_recipe(extra_model=f'pretrained = "{file}"'))
    (planned,) = expand_runs(load_recipe(recipe))
    (outcome,) = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=data_root, quiet=True)
    summary = json.loads((outcome.path / "summary.json").read_text())
    assert summary["run_id"] == planned.run_id
    assert summary["pretrained"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert summary["pretrained"]["tag"] == str(file.resolve()) and summary["pretrained"]["pretraining"] == UNKNOWN
    assert "pretrained" not in (outcome.path / "metrics.jsonl").read_text()
    (row,) = report.load_runs([tmp_path / "results"]).runs.itertuples()
    assert row.pretrained_sha256 == summary["pretrained"]["sha256"] and row.pretraining == UNKNOWN


def _with_pretraining(run_dir: Path, pretraining: str, tag: str) -> None:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary["pretrained"] = {"tag": tag, "file": "/cache/x", "sha256": "ab" * 32, "pretraining": pretraining}
    path.write_text(json.dumps(summary))


def test_the_report_shows_pretraining_per_row_and_says_when_a_table_mixes_sources(tmp_path: Path) -> None:
    for seed in (0, 1):
        _with_pretraining(write_run(tmp_path, variant="baseline", variant_name="in1k", seed=seed, top1=90.0 + seed,
                                    backbone_label="timm:vit_base_patch16_224.augreg_in1k"),
                          "ImageNet-1k", "timm:vit_base_patch16_224.augreg_in1k")
        _with_pretraining(write_run(tmp_path, variant="baseline", variant_name="in21k", seed=seed, top1=92.0 + seed,
                                    backbone_label="timm:vit_base_patch16_224.augreg_in21k"),
                          "ImageNet-21k", "timm:vit_base_patch16_224.augreg_in21k")
    table = report.summary_table(report.load_runs([tmp_path]).runs)
    assert sorted(table["pretraining"]) == ["ImageNet-1k", "ImageNet-21k"]
    assert set(table["pretrained_sha256"]) == {"ab" * 32}
    note = report.table_note(table)
    assert "Mixed pretraining" in note and "ImageNet-1k (1 row)" in note and "ImageNet-21k (1 row)" in note
    assert "Pretraining" in report.format_table(table).columns
    assert "Pretraining" in report.wide_view(table).columns
    one_source = report.summary_table(report.load_runs([tmp_path]).runs.query("pretraining == 'ImageNet-1k'"))
    assert "Mixed pretraining" not in report.table_note(one_source)


def test_records_without_provenance_keep_the_table_as_it_was(tmp_path: Path) -> None:
    write_run(tmp_path, variant="baseline", variant_name="baseline", seed=0, top1=90.0)
    table = report.summary_table(report.load_runs([tmp_path]).runs)
    assert "pretraining" not in table and "retraining" not in report.table_note(table)
    # beside a run that records its weights, an older record is "not recorded", not another source
    _with_pretraining(write_run(tmp_path, variant="se", variant_name="se", seed=0, top1=90.5),
                      "ImageNet-1k", "torchvision:ResNet50_Weights.IMAGENET1K_V1")
    table = report.summary_table(report.load_runs([tmp_path]).runs)
    assert sorted(table["pretraining"]) == ["ImageNet-1k", "not recorded"]
    note = report.table_note(table)
    assert "Mixed pretraining" not in note and "1 row(s) from records written before" in note


def test_the_ranks_caption_says_when_methods_start_from_different_pretraining(tmp_path: Path) -> None:
    from test_ranks import three_by_three

    from finebench.report.ranks import format_ranks, rank_methods, ranks_caption

    root = three_by_three(tmp_path / "results")
    assert "Mixed pretraining" not in ranks_caption(rank_methods(report.load_runs([root]).runs))
    for summary_path in root.rglob("summary.json"):
        summary = json.loads(summary_path.read_text())
        data = "ImageNet-21k" if summary["variant"] == "attention" else "ImageNet-1k"
        summary["pretrained"] = {"tag": "t", "file": "f", "sha256": "0" * 64, "pretraining": data}
        summary_path.write_text(json.dumps(summary))
    result = rank_methods(report.load_runs([root]).runs)
    assert "Mixed pretraining" in ranks_caption(result) and "ImageNet-1k (2 rows)" in ranks_caption(result)
    assert dict(zip(format_ranks(result)["Method"], format_ranks(result)["Pretraining"])) == {
        "attention": "ImageNet-21k", "baseline": "ImageNet-1k", "se": "ImageNet-1k"}
