"""Mutual-Channel Loss (``finebench.methods.mcl``): its terms and mask against the official
PRIS-CV/Mutual-Channel-Loss golden tensors, and the method on every backbone family."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finebench.errors import FinebenchError
from finebench.methods import build_model, get_method, parse_options
from finebench.methods.mcl import discriminality_scores, diversity_loss, draw_channel_mask

GOLDEN = Path(__file__).parent / "data" / "golden" / "mcl" / "golden.safetensors"
FAMILIES = [("wrn", {"depth": 10, "width": 1}), ("resnext_cifar", {"depth": 11, "cardinality": 2, "base_width": 4}),
            ("timm:resnet10t", None), ("torchvision:resnet18", None)]


def generated(seed: int, *shape: int, relu: bool = False) -> torch.Tensor:
    """The golden script's seeded float64 inputs (tools/golden/common.py states the same rule)."""
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return values.clamp_min(0) if relu else values


def test_the_golden_tensors_name_the_official_commit() -> None:
    with safe_open(GOLDEN, "pt") as file:
        assert file.metadata() == {"repository": "PRIS-CV/Mutual-Channel-Loss",
                                   "commit": "befb3692cd0d5382eb32fa4e093226247f609fd9"}


def test_a_seeded_mask_is_the_official_draw() -> None:
    random.seed(0)
    mask = draw_channel_mask(200, 3, 1)
    assert torch.equal(mask, load_file(GOLDEN)["mask"])
    assert mask.view(200, 3).sum(1).eq(2).all()


def test_both_terms_and_their_gradient_equal_the_official_supervisor_in_float64() -> None:
    golden = load_file(GOLDEN)
    features = generated(10, 2, 600, 14, 14, relu=True).requires_grad_(True)
    assert torch.equal(features.detach().sum().reshape(1), golden["features_checksum"])
    dis = torch.nn.functional.cross_entropy(discriminality_scores(features, 3, golden["mask"]), golden["labels"])
    div = diversity_loss(features, 3)
    (1.5 * dis + 20.0 * div).backward()
    close = {"rtol": 1e-10, "atol": 1e-13}
    torch.testing.assert_close(dis.reshape(1), golden["dis"], **close)
    torch.testing.assert_close(div.reshape(1), golden["div"], **close)
    torch.testing.assert_close(features.grad[:, :30], golden["grad_head"], **close)
    torch.testing.assert_close(features.grad.norm().reshape(1), golden["grad_norm"], **close)


def test_options_have_the_official_defaults_and_reject_a_mask_that_drops_every_channel() -> None:
    options = parse_options("mcl", {})
    assert (options.xi, options.drop, options.alpha, options.beta) == (3, 1, 1.5, 20.0)
    assert get_method("mcl").table_name(options) == "mcl"
    assert get_method("mcl").table_name(parse_options("mcl", {"xi": 4, "alpha": 2})) == "mcl-xi4-alpha2"
    with pytest.raises(Exception, match="drop=3 must be below xi=3"):
        parse_options("mcl", {"drop": 3})


@pytest.mark.parametrize(("backbone", "options"), FAMILIES)
def test_mcl_attaches_on_every_family_and_its_loss_trains_the_channels(backbone: str, options: dict | None) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, 4, "mcl", {"xi": 2}, options).train()
    assert model.classifier.in_features == 8
    output = model(torch.randn(2, 3, 32, 32), channel_mask=torch.tensor([1.0, 0.0] * 4))
    (scores,) = output.aux
    assert scores.shape == (2, 4) and output.reg_loss is not None
    labels = torch.tensor([0, 3])
    loss = get_method("mcl").loss(output, labels)
    plain = torch.nn.functional.cross_entropy(output.logits, labels)
    expected = plain + output.reg_loss + 1.5 * torch.nn.functional.cross_entropy(scores, labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        tested = model(torch.randn(2, 3, 32, 32))
    assert tested.aux == () and tested.reg_loss is None


def test_a_backbone_with_xi_times_classes_channels_needs_no_projection() -> None:
    tiny = {"depth": 10, "width": 1}
    channels = build_model("wrn", 2, "baseline", None, tiny).backbone.tap_points[-1].channels
    matched = build_model("wrn", channels // 2, "mcl", {"xi": 2}, tiny)
    assert isinstance(matched.project, torch.nn.Identity)
    projected = build_model("wrn", channels // 2 - 1, "mcl", {"xi": 2}, tiny)
    assert projected.project[0].in_channels == channels and projected.project[0].out_channels == channels - 2


def test_a_bad_option_is_one_line_at_build() -> None:
    with pytest.raises((FinebenchError, ValueError)):
        build_model("wrn", 4, "mcl", {"xi": 0}, {"depth": 10, "width": 1})


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_engines_step_trains_on_the_mutual_channel_loss(accumulation: int) -> None:
    """The engine's own step calls ``MCL.loss``: its logged loss is CE + both MC terms, the masks
    drawn from Python ``random`` once per forward (one per accumulated part)."""
    import copy

    from finebench.train_settings import TrainSection
    from finebench.train.step import build_train_step

    torch.manual_seed(0)
    model = build_model("wrn", 4, "mcl", {"xi": 2}, {"depth": 10, "width": 1})
    reference = copy.deepcopy(model).train()
    method = get_method("mcl")
    train = TrainSection(epochs=1, batch_size=4, schedule="constant", precision="fp32",
                         accumulation_steps=accumulation)
    step = build_train_step(model, train, steps_per_epoch=1, method=method)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    random.seed(5)
    loss, _ = step(images, labels)
    random.seed(5)
    parts = zip(images.chunk(accumulation), labels.chunk(accumulation), strict=True)
    expected = sum(method.loss(reference(x), y) for x, y in parts) / accumulation
    plain = torch.nn.functional.cross_entropy(reference.eval()(images).logits, labels)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert loss > plain + 1.0  # the MC terms are in it (beta 20 x L_div alone is several units)


def test_alpha_reaches_the_loss_through_the_bound_method_not_the_model() -> None:
    """One model output, two variants: each bound method weighs L_dis by its own alpha (the model
    built with the default alpha carries none)."""
    from finebench.methods import method_of

    torch.manual_seed(0)
    model = build_model("wrn", 4, "mcl", {"xi": 2}, {"depth": 10, "width": 1}).train()
    output = model(torch.randn(2, 3, 32, 32), channel_mask=torch.tensor([1.0, 0.0] * 4))
    labels = torch.tensor([0, 3])
    (scores,) = output.aux
    dis = torch.nn.functional.cross_entropy(scores, labels)
    base = method_of(parse_options("mcl", {"xi": 2, "alpha": 0.0})).loss(output, labels)
    weighted = method_of(parse_options("mcl", {"xi": 2, "alpha": 3.0})).loss(output, labels)
    # float32 sums of terms of a few units: a few ulps of 10
    torch.testing.assert_close(weighted - base, 3.0 * dis, rtol=1e-5, atol=1e-5)
