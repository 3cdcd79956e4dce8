"""Attend and Rectify and its peers on any timm or torchvision CNN, tapped by name.

Every model here is one of timm's tiny test architectures (``test_*``) or a small torchvision
model, built with random weights on small images: nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finebench.errors import FinebenchError
from finebench.methods import build_model
from finebench.models import parameter_groups
from finebench.models.output import mixture_loss
from finebench.models.registry import list_taps
from finebench.profile import profile_model, profile_variants, tap_flops

torch.set_num_threads(1)

SIZE = 64
TIMM = ["timm:test_resnet", "timm:test_convnext", "timm:test_efficientnet", "timm:test_byobnet"]
TORCHVISION = ["torchvision:resnet18", "torchvision:mobilenet_v3_small"]


def model(backbone: str, variant: str = "attention", classes: int = 5, **options: object):  # noqa: ANN201
    torch.manual_seed(0)
    return build_model(backbone, classes, variant, options or None)


def images(batch: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


# ---- taps by depth and by name -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "deepest_first"),
    [
        ("timm:test_resnet", ["layer3", "layer2", "layer1", "act1"]),
        ("timm:test_convnext", ["stages.2", "stages.1", "stages.0"]),
        ("timm:test_efficientnet", ["blocks.3", "blocks.2", "blocks.1", "blocks.0"]),
        ("torchvision:resnet18", ["layer3", "layer2", "layer1", "relu"]),
        ("torchvision:mobilenet_v3_small", ["features.8", "features.3", "features.1", "features.0"]),
    ],
)
def test_attention_depth_takes_the_deepest_taps_before_the_final_stage(backbone: str, deepest_first: list) -> None:
    net = model(backbone, attention_depth=1).backbone
    for depth in range(1, len(deepest_first) + 1):
        assert net.attention_taps(depth) == deepest_first[:depth]
    assert model(backbone, attention_depth=2).attention_taps == deepest_first[:2]
    with pytest.raises(FinebenchError, match=f"attention_depth={len(deepest_first) + 1} is out of range"):
        net.attention_taps(len(deepest_first) + 1)


@pytest.mark.parametrize("backbone", [*TIMM, *TORCHVISION])
def test_declared_taps_have_the_channels_and_stride_of_the_feature_maps(backbone: str) -> None:
    net = model(backbone, "baseline").backbone.eval()
    names = [tap.name for tap in net.tap_points]
    pooled, taps = net(images(1), list(reversed(names)))  # asked deepest first, returned by name
    assert pooled.shape == (1, net.out_channels)
    with torch.no_grad():  # the library's own forward, classifier removed: the same features
        own = net.model(images(1)) if backbone.startswith("timm:") else net.net(images(1))
    assert torch.allclose(pooled, own, atol=1e-5)
    for tap in net.tap_points:
        assert taps[tap.name].shape == (1, tap.channels, SIZE // tap.stride, SIZE // tap.stride), tap
        alone = net(images(1), [tap.name], stop_after_taps=True)[1][tap.name]
        assert torch.allclose(alone, taps[tap.name], atol=1e-5), tap


def test_taps_by_name_are_put_deepest_first_and_sized_to_their_channels() -> None:
    classifier = model("timm:test_resnet", taps=["layer1", "layer3"])
    assert classifier.attention_taps == ["layer3", "layer1"]
    channels = [module.conv.in_channels for module in classifier.attention.attention_modules]
    assert channels == [192, 32]


def test_a_torchvision_tap_can_be_any_graph_node() -> None:
    classifier = model("torchvision:resnet18", taps=["layer2.1.add", "layer3"])
    assert classifier.attention_taps == ["layer3", "layer2.1.add"]
    assert classifier.backbone.tap_point("layer2.1.add").channels == 128
    assert classifier.backbone.tap_point("layer2.1.add").stride == 8
    output = classifier.eval()(images())
    assert output.log_probs.shape == (2, 5) and len(output.module_logits) == 2


@pytest.mark.parametrize(
    ("backbone", "taps", "message"),
    [
        ("timm:test_resnet", ["layer9"], "unknown tap point 'layer9'.*act1, layer1"),
        ("torchvision:resnet18", ["layer9"], "unknown tap 'layer9'.*graph node name"),
        ("torchvision:resnet18", ["fc"], "not a B×C×H×W feature map"),
        ("timm:test_resnet", ["layer1", "layer1"], "distinct"),
    ],
)
def test_bad_tap_names_are_user_errors_listing_valid_ones(backbone: str, taps: list, message: str) -> None:
    with pytest.raises(FinebenchError, match=message):
        model(backbone, taps=taps)


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        ("timm:no_such_net", "unknown timm model 'no_such_net'"),
        ("torchvision:no_such_net", "unknown torchvision model 'no_such_net'"),
        ("keras:resnet50", "expected a registered name or timm:<model name> or torchvision:<model name>"),
        ("torchvision:squeezenet1_0", "no final nn.Linear"),
        ("timm:test_resnet.no_such_tag", "backbone timm:test_resnet.no_such_tag: Invalid pretrained tag"),
    ],
)
def test_unknown_models_are_user_errors(backbone: str, message: str) -> None:
    with pytest.raises(FinebenchError, match=message):
        model(backbone, "baseline")


def test_timm_options_reach_the_model_and_bad_ones_are_user_errors() -> None:
    net = build_model("timm:test_convnext", 5, backbone_options={"drop_path_rate": 0.1}).backbone
    assert any(getattr(m, "drop_prob", 0) > 0 for m in net.modules())
    with pytest.raises(FinebenchError, match="backbone timm:test_convnext: bad option"):
        build_model("timm:test_convnext", 5, backbone_options={"depth": 3})
    with pytest.raises(FinebenchError, match="option 'pretrained' for backbone timm:test_convnext is set by finebench"):
        build_model("timm:test_convnext", 5, backbone_options={"pretrained": True})


# ---- the mechanism on these backbones ------------------------------------------------------------


@pytest.mark.parametrize("backbone", [*TIMM, *TORCHVISION])
def test_attention_outputs_have_the_right_shapes_and_masks_sum_to_one(backbone: str) -> None:
    classifier = model(backbone, attention_depth=2, attention_width=3).eval()
    x = images()
    output = classifier(x)
    assert output.log_probs.shape == output.logits.shape == (2, 5)
    assert len(output.module_logits) == 2 and output.gates.shape == (2, 3)
    with torch.no_grad():
        _, taps = classifier.backbone(x, classifier.attention_taps)
        for name, module in zip(classifier.attention_taps, classifier.attention.attention_modules, strict=True):
            _, masks = module(taps[name])
            tap = classifier.backbone.tap_point(name)
            assert masks.shape == (2, 3, SIZE // tap.stride, SIZE // tap.stride)
            assert torch.allclose(masks.sum((2, 3)), torch.ones(2, 3), atol=1e-5)


@pytest.mark.parametrize("backbone", ["timm:test_resnet", "timm:test_efficientnet", "torchvision:resnet18"])
def test_gradients_reach_every_module(backbone: str) -> None:
    classifier = model(backbone, attention_depth=2).train()
    output = classifier(images(4))
    mixture_loss(output, torch.tensor([0, 1, 2, 3])).backward()  # the attention method's loss
    # timm zero-initialises each residual branch's last BN scale, so only "reached" holds backbone-wide
    assert [name for name, p in classifier.named_parameters() if p.grad is None] == []
    for name, p in [*classifier.attention.named_parameters(), *classifier.classifier.named_parameters()]:
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backbone", ["timm:test_convnext", "torchvision:mobilenet_v3_small"])
def test_parameter_overhead_is_nine_c_k_n_plus_two_per_module(backbone: str) -> None:
    classes, width = 7, 3
    baseline = model(backbone, "baseline", classes)
    attention = model(backbone, classes=classes, attention_depth=3, attention_width=width)
    net = attention.backbone
    modules = sum(9 * net.tap_point(tap).channels * width * (classes + 2) for tap in attention.attention_taps)
    global_gate = net.out_channels * 4 + 2 * 4  # Linear(C_last, D+1) and BatchNorm1d(D+1)
    params = [sum(p.numel() for p in m.parameters()) for m in (baseline, attention)]
    assert params[1] - params[0] == modules + global_gate


@pytest.mark.parametrize("backbone", ["timm:test_resnet", "timm:test_convnext", "torchvision:resnet18"])
def test_early_prediction_stops_at_the_tap(backbone: str) -> None:
    classifier = model(backbone, attention_depth=2).eval()
    x = images()
    with torch.no_grad():
        full = classifier(x)
        for index, tap in enumerate(classifier.attention_taps):
            assert torch.allclose(classifier.early_prediction(x, tap), full.module_logits[index], atol=1e-4)
    costs = tap_flops(classifier, 32)
    deep, shallow = classifier.attention_taps
    baseline_flops = profile_model(model(backbone, "baseline"), 32).flops
    assert costs[shallow] < costs[deep] < baseline_flops


# ---- peers through timm's attention layers -------------------------------------------------------


@pytest.mark.parametrize("backbone", ["timm:test_resnet", "timm:test_byobnet"])
@pytest.mark.parametrize(("variant", "layer"), [("se", "SEModule"), ("cbam", "CbamModule"), ("eca", "EcaModule")])
def test_se_cbam_eca_build_into_timm_blocks_and_train_one_step(backbone: str, variant: str, layer: str) -> None:
    # timm zero-initialises each branch's last BN, which would hold the new layers' gradients at 0
    torch.manual_seed(0)
    peer = build_model(backbone, 5, variant, backbone_options={"zero_init_last": False}).train()
    attention_layers = peer.backbone.plugin_modules()
    assert attention_layers and all(type(m).__name__ == layer for m in attention_layers)
    head = {id(p) for p in parameter_groups(peer)["head"]}
    assert all(id(p) in head for m in attention_layers for p in m.parameters())
    baseline = model(backbone, "baseline")
    # timm's attn_layer replaces a block's own attention (test_byobnet's blocks come with SE)
    own = [m for m in baseline.modules() if type(m).__name__ in ("SEModule", "CbamModule", "EcaModule")]
    extra = sum(p.numel() for p in peer.parameters()) - sum(p.numel() for p in baseline.parameters())
    assert extra == sum(p.numel() for m in attention_layers for p in m.parameters()) - sum(
        p.numel() for m in own for p in m.parameters())
    before = [p.detach().clone() for m in attention_layers for p in m.parameters()]
    optimizer = torch.optim.SGD(peer.parameters(), lr=0.1)
    loss = F.nll_loss(peer(images(4)).log_probs, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    after = [p.detach() for m in attention_layers for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_reduction_reaches_timm_se() -> None:
    hidden = [m.fc1.out_channels for m in model("timm:test_resnet", "se", reduction=4).backbone.plugin_modules()]
    hidden_16 = [m.fc1.out_channels for m in model("timm:test_resnet", "se").backbone.plugin_modules()]
    # timm rounds the bottleneck up to a multiple of 8, so only the wider blocks differ
    assert all(a >= b for a, b in zip(hidden, hidden_16, strict=True)) and sum(hidden) > sum(hidden_16)


@pytest.mark.parametrize(
    ("backbone", "variant", "message"),
    [
        ("timm:test_convnext", "se", "family \\(convnext\\) takes no block attention layer.*resnet, byobnet"),
        ("torchvision:resnet18", "cbam", "need a registered backbone or a timm model"),
        ("resnet18", "eca", "expected a timm backbone"),
    ],
)
def test_peers_where_no_block_takes_them_are_user_errors(backbone: str, variant: str, message: str) -> None:
    with pytest.raises(FinebenchError, match=message):
        model(backbone, variant)


# ---- weights: local files and timm's cache, never a download --------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_load_from_a_local_file(tmp_path: Path, suffix: str) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model("test_resnet")  # with its classifier, as timm saves it
    file = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.state_dict()}, file)
    else:
        save_file(source.state_dict(), file)
    for variant in ("attention", "se"):  # SE's new layers start fresh, everything else is the file's
        loaded = build_model("timm:test_resnet", 5, variant, pretrained=str(file)).backbone.model.state_dict()
        expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
        assert expected and all(torch.equal(loaded[k], v) for k, v in expected.items())
        assert any(".se." in k for k in loaded) == (variant == "se")


def test_timm_weights_that_do_not_fit_or_are_missing_are_user_errors(tmp_path: Path) -> None:
    import timm

    with pytest.raises(FinebenchError, match="does not exist"):
        build_model("timm:test_resnet", 5, pretrained=str(tmp_path / "none.safetensors"))
    file = tmp_path / "convnext.pth"
    torch.save(timm.create_model("test_convnext").state_dict(), file)
    with pytest.raises(FinebenchError, match="do not fit timm:test_resnet"):
        build_model("timm:test_resnet", 5, pretrained=str(file))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(FinebenchError, match="not a safetensors file"):
        build_model("timm:test_resnet", 5, pretrained=str(tmp_path / "junk.safetensors"))


def _empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    hub = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))  # what torch.hub.set_dir sets
    return hub


def test_timm_weights_missing_from_the_cache_say_where_to_put_them(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    _empty_caches(tmp_path, monkeypatch)
    with pytest.raises(FinebenchError) as error:
        build_model("timm:test_resnet.r160_in1k", 5, pretrained="timm")
    message = str(error.value)
    assert "\n" not in message and "no download happens" in message
    assert "huggingface.co/timm/test_resnet.r160_in1k" in message and str(tmp_path / "hf") in message


def test_timm_weights_load_from_timms_hugging_face_cache(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import timm
    from safetensors.torch import save_file

    hub = _empty_caches(tmp_path, monkeypatch)
    repo = hub / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    torch.manual_seed(4)
    source = timm.create_model("test_resnet")
    save_file(source.state_dict(), snapshot / "model.safetensors")
    loaded = build_model("timm:test_resnet.r160_in1k", 5, pretrained="timm").backbone.model
    assert torch.equal(loaded.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_torchvision_node_weights_load_from_a_local_file(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(5)
    source = torchvision.models.resnet18(weights=None).eval()
    file = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), file)
    net = build_model("torchvision:resnet18", 5, pretrained=str(file)).backbone.eval()
    x = images(1)
    with torch.no_grad():
        expected = torch.flatten(source.avgpool(source.layer4(source.layer3(source.layer2(source.layer1(
            source.maxpool(source.relu(source.bn1(source.conv1(x))))))))), 1)
        assert torch.allclose(net(x)[0], expected, atol=1e-5)
    with pytest.raises(FinebenchError, match="pretrained='timm' for torchvision:resnet18"):
        build_model("torchvision:resnet18", 5, pretrained="timm")


def test_torchvision_node_imagenet_weights_come_from_the_hub_cache_only(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import torchvision

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    expected = tmp_path / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    with pytest.raises(FinebenchError, match=f"place mobilenet_v3_small-047dcff4.pth .* at {expected}"):
        build_model("torchvision:mobilenet_v3_small", 5, pretrained="imagenet")
    torch.manual_seed(6)
    expected.parent.mkdir()
    source = torchvision.models.mobilenet_v3_small(weights=None)
    torch.save(source.state_dict(), expected)
    loaded = build_model("torchvision:mobilenet_v3_small", 5, pretrained="imagenet").backbone.net
    assert torch.equal(loaded.features[3].block[1][0].weight, source.features[3].block[1][0].weight)


# ---- recipes and the command line ----------------------------------------------------------------


def test_a_recipe_names_taps_or_a_depth_but_not_both(tmp_path: Path) -> None:
    from finebench.recipe import expand_runs, load_recipe

    text = """
[dataset]
name = "cifar10"
[model]
backbone = "timm:test_resnet"
[[variants]]
kind = "attention"
taps = ["layer1", "layer2"]
[[variants]]
kind = "eca"
[train]
epochs = 1
batch_size = 2
schedule = "constant"
"""
    recipe = tmp_path / "taps.toml"
    recipe.write_text(text)
    runs = expand_runs(load_recipe(recipe))
    assert [run.variant_name for run in runs] == ["attention-ad2-aw4-taps-layer1+layer2", "eca"]
    assert runs[0].config["variant"]["options"]["taps"] == ["layer1", "layer2"]
    assert runs[0].config["variant"]["options"]["attention_depth"] == 2
    recipe.write_text(text.replace('taps = ["layer1", "layer2"]', 'taps = ["layer1"]\nattention_depth = 2'))
    with pytest.raises(FinebenchError, match="taps or attention_depth, not both"):
        load_recipe(recipe)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finebench", *args], capture_output=True, text=True, timeout=120)


def test_cli_models_taps_lists_a_timm_models_taps_with_channels_and_stride() -> None:
    result = cli("models", "--taps", "timm:test_convnext", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [(t["name"], t["channels"], t["stride"]) for t in listing["tap_points"]] == [
        ("stages.0", 24, 4), ("stages.1", 32, 8), ("stages.2", 48, 16), ("stages.3", 64, 32)
    ]
    assert listing["attention_candidates"] == ["stages.2", "stages.1", "stages.0"]
    with pytest.raises(FinebenchError, match="unknown timm model 'no_such_net'"):
        list_taps("timm:no_such_net")


def test_stage_ends_are_found_inside_trunks_and_containers_that_return_tuples() -> None:
    from torch import nn

    from finebench.models.torchvision_nodes import stage_taps

    def down(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU())

    class Body(nn.Module):  # returns two maps: no feature map of its own
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(down(3, 4), nn.Conv2d(4, 4, 1), down(4, 8), down(8, 16))
            self.last = down(16, 32)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.trunk(x)
            return y, self.last(y)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.pool, self.fc = Body(), nn.AdaptiveAvgPool2d(1), nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.body(x)[1]).flatten(1))

    taps = [(t.name, t.channels, t.stride) for t in stage_taps(Net(), size=64)]
    assert taps == [("body.trunk.1", 4, 2), ("body.trunk.2", 8, 4), ("body.trunk.3", 16, 8), ("body.last", 32, 16)]


def test_list_taps_of_a_torchvision_model() -> None:
    listing = list_taps("torchvision:resnet18")
    assert [(t.name, t.channels, t.stride) for t in listing.tap_points] == [
        ("relu", 64, 2), ("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16), ("layer4", 512, 32)
    ]
    assert listing.out_channels == 512


def test_profile_counts_attention_on_a_timm_backbone() -> None:
    rows = profile_variants("timm:test_resnet", 10, SIZE, [("att", "attention", {"attention_depth": 2})])
    baseline, attention = rows
    net = model("timm:test_resnet", classes=10, attention_depth=2).backbone
    modules = sum(9 * net.tap_point(t).channels * 4 * 12 for t in ("layer3", "layer2"))
    assert attention.params - baseline.params == modules + net.out_channels * 3 + 6
    conv_macs = sum(9 * net.tap_point(t).channels * 4 * 12 * (SIZE // net.tap_point(t).stride) ** 2
                    for t in ("layer3", "layer2"))
    assert attention.flops - baseline.flops >= conv_macs
