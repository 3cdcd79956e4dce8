"""B-CNN (``kind = "bcnn"``): equal to the HaoMood/bilinear-cnn port's head from its golden tensors,
attached to every backbone family at its last stage, and trainable end to end from a recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from finebench.methods import build_model
from finebench.methods.bcnn import BilinearClassifier, bilinear_pool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "golden"))
import bcnn_common as common  # noqa: E402  (the seeded inputs the harness also used)

GOLDEN = ROOT / "tests" / "data" / "golden" / "bcnn" / "head.safetensors"
FAMILIES = [  # (backbone, options, input size): one of each family finebench has
    ("wrn", {"depth": 10, "width": 1}, 16),
    ("resnext_cifar", {"depth": 11, "cardinality": 2, "base_width": 4}, 16),
    ("torchvision:resnet18", None, 32),
    ("timm:resnet10t", None, 32),
]


def test_the_ports_head_from_its_golden_tensors_in_float64() -> None:
    with safe_open(str(GOLDEN), "pt") as handle:
        golden = {key: handle.get_tensor(key) for key in handle.keys()}
        assert handle.metadata()["commit"] == "bcc2883c43c1f5fad1b58b906014354876d76911"
    # WRN-10-8 ends in 512 channels, as VGG-16's relu5_3: the same classifier shape as the port's
    model = build_model("wrn", common.CLASSES, "bcnn", {"sqrt": "plus_eps"}, {"depth": 10, "width": 8}).double()
    assert isinstance(model, BilinearClassifier)
    weight, bias = common.classifier()
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    features = common.features().requires_grad_()
    logits = model.head(features)
    loss = F.cross_entropy(logits, common.labels())
    loss.backward()
    exact = dict(rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(logits, golden["logits"], **exact)
    torch.testing.assert_close(loss.reshape(1), golden["loss"], **exact)
    torch.testing.assert_close(features.grad[:, :8, :4, :4], golden["grad_features_slice"], **exact)
    torch.testing.assert_close(model.classifier.weight.grad[:4, :256], golden["grad_weight_slice"], **exact)
    torch.testing.assert_close(model.classifier.bias.grad, golden["grad_bias"], **exact)
    for name, grad in (("features", features.grad), ("weight", model.classifier.weight.grad)):
        projected = torch.stack([(grad * r).sum() for r in common.projections(grad.shape)])
        torch.testing.assert_close(projected, golden[f"grad_{name}_projections"], rtol=1e-9, atol=1e-14)


def test_the_papers_signed_root_is_the_default_and_differs_from_the_ports() -> None:
    features = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))  # signed (no final ReLU)
    signed = bilinear_pool(features, "signed")
    gram = torch.einsum("bchw,bdhw->bcd", features, features).flatten(1) / 9
    torch.testing.assert_close(signed, F.normalize(gram.sign() * gram.abs().sqrt(), dim=1))
    assert torch.isnan(bilinear_pool(features, "plus_eps")).any()  # the port's root assumes relu5_3's x >= 0
    relu_features = 0.01 * features.relu()  # small activations: the port's 1e-5 floor dominates some entries
    port = bilinear_pool(relu_features, "plus_eps")
    torch.testing.assert_close(port.norm(dim=1), torch.ones(2))
    assert (bilinear_pool(relu_features, "signed") - port).abs().max() > 1e-2  # the 1e-5 floor shows
    assert build_model("wrn", 3, "bcnn", None, {"depth": 10, "width": 1}).sqrt == "signed"


@pytest.mark.parametrize(("backbone", "options", "size"), FAMILIES)
def test_every_family_pools_its_last_stage_and_trains(backbone: str, options: dict | None, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, 5, "bcnn", None, options)
    images = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():  # the map bilinear pooling reads is the one the baseline's pooling averages
        pooled, _ = model.backbone(images)
        torch.testing.assert_close(model.bilinear_features(images).mean((2, 3)), pooled)
    model.train()
    channels = model.backbone.out_channels
    assert model.classifier.in_features == channels * channels
    output = model(images)
    F.cross_entropy(output.logits, torch.tensor([0, 4])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_channel_reduction_shrinks_the_classifier() -> None:
    model = build_model("timm:resnet10t", 7, "bcnn", {"reduction": 16}, None)
    assert model.classifier.in_features == 16 * 16
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 7)


def test_a_recipe_trains_baseline_and_bcnn_from_the_cli_with_records_and_profile(tmp_path: Path) -> None:
    from tiny_data import prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 40, 20)
    recipe = tmp_path / "bcnn.toml"
    recipe.write_text(tiny_recipe(variants=("baseline", "bcnn")).replace(
        'kind = "bcnn"', 'kind = "bcnn"\nreduction = 8') + "threads = 1\n")
    results = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "finebench", "run", str(recipe), "--data-root", str(root),
                          "--results-dir", str(results)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summaries = [json.loads(path.read_text()) for path in results.glob("bcnn/*/summary.json")]
    assert sorted(s["variant_name"] for s in summaries) == ["baseline", "bcnn-r8"]
    assert all(s["status"] == "finished" for s in summaries)
    report = subprocess.run([sys.executable, "-m", "finebench", "report", str(results), "--format", "csv"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "bcnn-r8" in report.stdout
    profile = subprocess.run([sys.executable, "-m", "finebench", "profile", str(recipe), "--json"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert profile.returncode == 0, profile.stderr[-2000:]
    rows = {row["label"]: row for row in json.loads(profile.stdout)["rows"]}
    assert rows["bcnn-r8"]["params"] > rows["baseline"]["params"]
