"""Backbones, the registries, parameter groups and pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods import build_model
from finebench.models import BACKBONES, ModelOutput, list_backbones, parameter_groups
from finebench.models.plugins import CBAM, SqueezeExcite
from finebench.models.torchvision import ARCHITECTURES, imagenet_weights_path

torch.set_num_threads(1)

TINY = {
    "wrn": {"depth": 10, "width": 1},
    "resnext_cifar": {"depth": 11, "cardinality": 2, "base_width": 4},
}


def tiny_model(backbone: str = "wrn", variant: str = "baseline", **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(backbone, 5, variant, backbone_options=TINY.get(backbone), **kwargs)


# ---- registry errors ---------------------------------------------------------------------------


def test_unknown_backbone_is_a_user_error_listing_the_valid_names() -> None:
    with pytest.raises(FinebenchError, match="unknown backbone 'vgg'.*wrn.*wide_resnet50_2"):
        build_model("vgg", 10)


def test_unknown_variant_is_a_user_error_listing_the_valid_names() -> None:
    with pytest.raises(FinebenchError, match="unknown variant 'nonlocal'.*baseline, api_net, attention, bcnn"):
        build_model("wrn", 10, "nonlocal", backbone_options=TINY["wrn"])


@pytest.mark.parametrize(
    ("variant", "options", "message"),
    [
        ("attention", {"heads": 2}, "unknown option 'heads'.*attention_depth, attention_width"),
        ("attention", {"gates": "relu"}, "gates='relu'.*softmax, sigmoid, none"),
        ("attention", {"output_mode": "70"}, "output_mode='70'.*mixture, 50"),
        ("attention", {"attention_width": "4"}, "wrong type"),
        ("se", {"ratio": 4}, "unknown option 'ratio'.*reduction"),
        ("se", {"reduction": 0}, "reduction=0 is invalid for se.*>= 1"),
        ("cbam", {"reduction": -2}, "reduction=-2 is invalid for cbam.*>= 1"),
        ("baseline", {"x": 1}, "unknown option 'x'.*none"),
    ],
)
def test_bad_variant_options_are_user_errors(variant: str, options: dict, message: str) -> None:
    with pytest.raises(FinebenchError, match=message):
        build_model("wrn", 10, variant, options, TINY["wrn"])


def test_bad_backbone_options_are_user_errors() -> None:
    with pytest.raises(FinebenchError, match="unknown option 'cardinality'.*depth, width, dropout"):
        build_model("wrn", 10, backbone_options={"cardinality": 8})
    with pytest.raises(FinebenchError, match="depth=17.*6n\\+4"):
        build_model("wrn", 10, backbone_options={"depth": 17})
    with pytest.raises(FinebenchError, match="unknown option 'depth'.*valid options are last_stride"):
        build_model("resnet18", 10, backbone_options={"depth": 18})


# ---- backbones ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "size", "variant"),
    [("wrn", 32, variant) for variant in ("baseline", "attention", "se", "cbam")]
    + [(backbone, size, variant) for backbone, size in (("wrn", 60), ("resnext_cifar", 32), ("resnet18", 64))
       for variant in ("baseline", "attention")]
    + [("resnext_cifar", 32, "se"), ("resnet18", 48, "cbam")],
)
def test_every_variant_returns_model_output_for_any_input_size(backbone: str, size: int, variant: str) -> None:
    model = tiny_model(backbone, variant).eval()
    output = model(torch.randn(2, 3, size, size))
    assert isinstance(output, ModelOutput)
    assert output.log_probs.shape == output.logits.shape == (2, 5)
    total = output.log_probs.exp().sum(1)
    if variant == "attention":  # a weighted geometric mean of distributions: not normalised, sums to <= 1
        assert (total <= 1 + 1e-6).all()
    else:
        assert torch.allclose(total, torch.ones(2), atol=1e-5)
    assert len(output.module_logits) == (3 if variant == "attention" else 0)


@pytest.mark.parametrize(("backbone", "size"), [("wrn", 32), ("resnext_cifar", 32), ("resnet18", 64)])
def test_declared_tap_points_match_the_feature_maps(backbone: str, size: int) -> None:
    net = tiny_model(backbone).backbone.eval()
    names = [tap.name for tap in net.tap_points]
    pooled, taps = net(torch.randn(1, 3, size, size), names)
    assert pooled.shape == (1, net.out_channels)
    for tap in net.tap_points:
        assert taps[tap.name].shape == (1, tap.channels, size // tap.stride, size // tap.stride), tap


def test_wrn_matches_the_reference_layout_and_parameter_count() -> None:
    # WRN-28-10 has 36,479,194 parameters (Zagoruyko & Komodakis); the authors' layout adds the
    # stem BN (16 weights + 16 biases). Counted on the meta device.
    with torch.device("meta"):
        model = build_model("wrn", 10, backbone_options={"depth": 28, "width": 10})
    assert sum(p.numel() for p in model.parameters()) == 36_479_194 + 32
    block = model.backbone.groups[1][0]
    assert block.bn0.num_features == 160 and block.shortcut.stride == (2, 2)
    assert model.backbone.groups[1][1].shortcut is None


def test_wrn_projection_shortcut_reads_the_raw_block_input() -> None:
    block = tiny_model().backbone.groups[1][0].eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        residual = block.conv1(F.relu(block.bn1(block.conv0(F.relu(block.bn0(x))))))
        assert torch.allclose(block(x), residual + block.shortcut(x), atol=1e-6)


def test_wrn_tap_is_the_preactivated_group_output() -> None:
    net = tiny_model().backbone.eval()
    captured = []
    net.groups[1][0].bn0.register_forward_hook(lambda _m, _i, out: captured.append(F.relu(out)) and None)
    _, taps = net(torch.randn(1, 3, 32, 32), ["group0"])
    assert torch.equal(taps["group0"], captured[0])


def test_stop_after_taps_ends_the_pass_at_the_tap() -> None:
    net = tiny_model().backbone.eval()
    x = torch.randn(1, 3, 32, 32)
    pooled, early = net(x, ["group1"], stop_after_taps=True)
    assert pooled is None and set(early) == {"group1"}
    assert torch.equal(early["group1"], net(x, ["group1"])[1]["group1"])


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_torchvision_backbones_declare_their_taps_and_match_torchvision(name: str) -> None:
    import torchvision.models as tvm

    with torch.device("meta"):
        ours = build_model(name, 1000)
        theirs = getattr(tvm, name)(weights=None)
    assert {k for k in theirs.state_dict() if not k.startswith("fc.")} == set(ours.backbone.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert [t.stride for t in ours.backbone.tap_points] == [4, 8, 16, 32]


def test_list_backbones_reports_taps_and_parameter_counts() -> None:
    infos = {info.name: info for info in list_backbones()}
    assert set(infos) == set(BACKBONES)
    assert infos["wrn"].params == 36_479_194 + 32
    assert [(t.name, t.channels, t.stride) for t in infos["wrn"].tap_points] == [
        ("group0", 160, 1), ("group1", 320, 2), ("group2", 640, 4)
    ]
    assert infos["wide_resnet50_2"].attention_taps == ("layer3", "layer2", "layer1")
    assert infos["resnet50"].params == 25_557_032


# ---- plug-ins and parameter groups ---------------------------------------------------------------


@pytest.mark.parametrize(("variant", "plugin"), [("se", SqueezeExcite), ("cbam", CBAM)])
def test_block_plugins_go_into_every_residual_block(variant: str, plugin: type) -> None:
    for backbone in ("wrn", "resnext_cifar", "resnet18"):
        model = tiny_model(backbone, variant, variant_options={"reduction": 4})
        blocks = model.backbone.residual_blocks()
        assert blocks and all(isinstance(block.plugin, plugin) for block in blocks)


@pytest.mark.parametrize("variant", ["baseline", "attention", "se", "cbam"])
def test_parameter_groups_split_backbone_from_head_exactly(variant: str) -> None:
    model = tiny_model("wrn", variant)
    groups = parameter_groups(model)
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    baseline_backbone = {n for n, _ in tiny_model("wrn").backbone.named_parameters()}
    backbone_names = {n for n, p in model.backbone.named_parameters() if any(p is q for q in groups["backbone"])}
    assert backbone_names == baseline_backbone  # plug-in and attention weights are all head
    assert any(p is model.classifier.weight for p in groups["head"])


def test_parameter_groups_see_through_wrappers() -> None:
    model = tiny_model("wrn", "attention")
    wrapper = nn.Module()
    wrapper.module = model
    assert [id(p) for p in parameter_groups(wrapper)["head"]] == [id(p) for p in parameter_groups(model)["head"]]


# ---- pretrained weights ------------------------------------------------------------------------


def test_local_weights_file_loads_into_the_backbone(tmp_path: Path) -> None:
    source = tiny_model("wrn", "attention")
    file = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict()}, file)
    model = build_model("wrn", 5, "se", backbone_options=TINY["wrn"], pretrained=str(file))
    assert torch.equal(model.backbone.stem_conv.weight, source.backbone.stem_conv.weight)


def test_unfit_or_missing_local_weights_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(FinebenchError, match="does not exist"):
        build_model("wrn", 5, backbone_options=TINY["wrn"], pretrained=str(tmp_path / "none.pth"))
    file = tmp_path / "other.pth"
    torch.save(tiny_model("resnext_cifar").state_dict(), file)
    with pytest.raises(FinebenchError, match="do not fit WideResNet"):
        build_model("wrn", 5, backbone_options=TINY["wrn"], pretrained=str(file))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FinebenchError, match="cannot read"):
        build_model("wrn", 5, backbone_options=TINY["wrn"], pretrained=str(tmp_path / "junk.pth"))


def test_imagenet_weights_missing_from_the_cache_name_the_path(tmp_path: Path) -> None:
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        expected = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
        assert imagenet_weights_path(ARCHITECTURES["resnet18"].weights) == expected
        with pytest.raises(FinebenchError, match=f"place resnet18-f37072fd.pth .* at {expected}"):
            build_model("resnet18", 10, pretrained="imagenet")
    finally:
        torch.hub.set_dir(previous)


def test_imagenet_weights_load_from_the_hub_cache(tmp_path: Path) -> None:
    import torchvision.models as tvm

    torch.manual_seed(1)
    reference = tvm.resnet18(weights=None)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        file = imagenet_weights_path(ARCHITECTURES["resnet18"].weights)
        file.parent.mkdir(parents=True)
        # torchvision's original (V1) files predate BatchNorm's num_batches_tracked
        old_style = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
        torch.save(old_style, file)
        model = build_model("resnet18", 7, "attention", {"attention_depth": 1}, pretrained="imagenet").eval()
    finally:
        torch.hub.set_dir(previous)
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = torch.flatten(reference.avgpool(reference.layer4(reference.layer3(reference.layer2(
            reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))), 1)
        assert torch.allclose(model.backbone(x)[0], features, atol=1e-5)


def test_imagenet_weights_for_a_cifar_backbone_are_a_user_error() -> None:
    with pytest.raises(FinebenchError, match="has no ImageNet weights.*resnet18"):
        build_model("wrn", 10, backbone_options=TINY["wrn"], pretrained="imagenet")


def test_the_new_classifier_of_an_imagenet_backbone_is_kaiming_normal() -> None:
    # the authors' finetune(): kaiming_normal on the new Linear's weight; torch's default would be
    # uniform within +-1/sqrt(fan_in), whose std is sqrt(6) times smaller than Kaiming's sqrt(2/fan_in)
    torch.manual_seed(0)
    weight = build_model("resnet18", 200).classifier.weight.detach()
    fan_in = weight.shape[1]
    assert abs(weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.03
    assert weight.abs().max().item() > 2 / fan_in**0.5  # normal tails, far outside the uniform bound
