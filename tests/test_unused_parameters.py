"""Backbone layers a method never reads (those past the tap it pools): found by autograd, left out
of the parameter count, and ignored by DDP, which otherwise stops at the second step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gloo import on_two_workers
from tiny_data import tiny_recipe

from finebench.cost import CostCache
from finebench.methods import build_model, build_model_from_config
from finebench.models.network import used_parameter_count
from finebench.profile import profile_model
from finebench.recipe import expand_runs, load_recipe
from finebench.train.distributed import DDPContext

WRN = {"depth": 10, "width": 1}


def test_the_layers_past_the_pooled_tap_are_the_unused_ones() -> None:
    model = build_model("wrn", 5, "bcnn", {"tap": "group1"}, WRN)
    unused = model.unused_parameter_names()
    assert all(name.startswith(("backbone.groups.2.", "backbone.final_bn.")) for name in unused), unused
    convolutions_past = [name for name, _ in model.named_parameters() if name.startswith("backbone.groups.2.")
                         and name.endswith("weight") and "conv" in name]
    assert convolutions_past and set(convolutions_past) <= set(unused)
    assert {"backbone.final_bn.weight", "backbone.final_bn.bias"} <= set(unused)
    total = sum(p.numel() for p in model.parameters())
    past = sum(p.numel() for name, p in model.named_parameters() if name in set(unused))
    assert used_parameter_count(model) == total - past
    assert profile_model(model, 32).params == total - past


@pytest.mark.parametrize(("variant", "options"), [("baseline", {}), ("bcnn", {}), ("mcl", {"xi": 2}), ("pmg", {})])
def test_a_model_reading_the_whole_backbone_has_none(variant: str, options: dict) -> None:
    """WRN's deepest tap is its last map: a method pooling it reads every backbone layer."""
    assert build_model("wrn", 5, variant, options, WRN).unused_parameter_names() == []


def test_a_torchvision_models_layers_between_its_last_map_and_classifier_are_unused_under_bcnn() -> None:
    """MobileNet-V3's 576→1024 linear sits between its last feature map and the classifier finebench
    replaces: the baseline uses it, B-CNN pooling the last map does not (VGG's fc6/fc7 alike)."""
    assert build_model("torchvision:mobilenet_v3_small", 5).unused_parameter_names() == []
    unused = build_model("torchvision:mobilenet_v3_small", 5, "bcnn", {"reduce": 8}).unused_parameter_names()
    assert unused == ["backbone.net.classifier.0.weight", "backbone.net.classifier.0.bias"]


def _ddp_steps(rank: int) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = build_model("wrn", 5, "bcnn", {"tap": "group1"}, WRN).train()
    wrapped = DDPContext(rank=rank, world_size=2).wrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(3):  # DDP checks the previous step's reduction at each forward after the first
        images, labels = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 5, (4,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(wrapped(images).logits, labels).backward()
        optimizer.step()
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def test_ddp_trains_a_model_with_unused_backbone_layers_and_keeps_the_ranks_equal() -> None:
    results = on_two_workers(_ddp_steps)
    for name, value in results[0].items():
        np.testing.assert_array_equal(results[1][name], value, err_msg=name)


def test_a_backbone_that_cannot_run_on_the_probe_counts_every_layer_as_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe is a blank image (the run's size; 128 px where none is known); a network that refuses
    it keeps the old count (all of its parameters) rather than failing the profile."""
    model = build_model("wrn", 5, "bcnn", {"tap": "group1"}, WRN)

    def refuses(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("Given input size: (16x1x1). Calculated output size: (16x0x0). Output size is too small")

    monkeypatch.setattr(model.backbone, "forward", refuses)
    assert model.unused_parameter_names() == []
    assert used_parameter_count(model) == sum(p.numel() for p in model.parameters())


VIT = {"img_size": 32, "depth": 2}
"""Two blocks of ViT-Ti/16 built for 32 px images: it takes no other size."""


def test_a_vit_is_probed_at_the_runs_input_size_and_ddp_reuses_that_probe() -> None:
    model = build_model("timm:vit_tiny_patch16_224", 5, backbone_options=VIT)
    total = sum(p.numel() for p in model.parameters())
    assert profile_model(model, 32).params == used_parameter_count(model, 32) == total
    assert model.unused_parameter_names() == []  # DDP's call knows no size: the 32 px probe's answer, no 128 px pass


def test_the_costing_of_a_runs_own_model_probes_it_at_the_runs_size_even_when_its_cost_is_known(
    tmp_path: Path,
) -> None:
    """The runner costs the model it trains (``CostCache.of(run, model)``) after the preflight costed
    a twin: that model must still learn its unread parameters at the run's size before DDP asks."""
    path = tmp_path / "vit.toml"
    path.write_text(tiny_recipe(input_size=32, backbone="timm:vit_tiny_patch16_224",
                                model_options="{ img_size = 32, depth = 2 }", extra_model='pretrained = "none"'))
    loaded = load_recipe(path)
    [run] = expand_runs(loaded)
    costs = CostCache(loaded, 10, 32)
    cost = costs.of(run)
    model = build_model_from_config(run.config, 10, pretrained=False)
    assert costs.of(run, model) == cost
    assert model.unused_parameter_names() == []


def test_the_probe_runs_on_the_meta_device_and_finds_what_the_pass_on_the_weights_finds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dry run probes every variant: on the meta device the pass costs no arithmetic. Where a network
    cannot run there (forced here), the pass on its weights gives the same names."""
    devices = []
    conv2d = F.conv2d

    def recording(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        devices.append(x.device.type)
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", recording)
    on_meta = build_model("wrn", 5, "bcnn", {"tap": "group1"}, WRN).unused_parameter_names(32)
    assert on_meta and devices and set(devices) == {"meta"}

    def no_meta(*_args: object, **_kwargs: object) -> None:
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(torch.func, "functional_call", no_meta)
    devices.clear()
    assert build_model("wrn", 5, "bcnn", {"tap": "group1"}, WRN).unused_parameter_names(32) == on_meta
    assert set(devices) == {"cpu"}


CNN_METHODS = {"baseline": {}, "attention": {"attention_depth": 1, "attention_width": 2}, "bcnn": {"reduce": 8},
               "mcl": {}, "pmg": {"feature_size": 8}, "ws_dan": {}, "cal": {}, "api_net": {"freeze_backbone_epochs": 0}}


def _method_steps(rank: int, kind: str) -> dict[str, np.ndarray]:
    """Three of the method's own training steps on this worker's half of each batch, under DDP."""
    from finebench.methods import get_method, parse_options
    from finebench.train.step import TrainStep

    torch.manual_seed(0)
    options = parse_options(kind, CNN_METHODS[kind])
    model = build_model("wrn", 4, options, backbone_options=WRN).train()
    wrapped = DDPContext(rank=rank, world_size=2).wrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(wrapped, optimizer, None, torch.device("cpu"), method=get_method(kind))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # DDP checks the previous step's reduction at each forward after the first
        images = torch.randn(8, 3, 32, 32, generator=generator)
        labels = torch.arange(8) % 4  # two images of each class: API-Net pairs each with one of its class
        share = slice(4 * rank, 4 * rank + 4)
        step(images[share], labels[share])
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", [kind if kind == "pmg" else pytest.param(kind, marks=pytest.mark.slow)
                                  for kind in sorted(CNN_METHODS)])  # about 10 s each at rest: PMG's is the regression
def test_every_methods_own_step_trains_on_two_gloo_workers_and_keeps_the_ranks_equal(kind: str) -> None:
    """PMG backpropagates one head per step: without DDP's search for the heads a backward does not
    reach, its second step stopped waiting for their gradients (found by tools/behaviour --mode gloo)."""
    results = on_two_workers(_method_steps, kind)
    for name, value in results[0].items():
        np.testing.assert_array_equal(results[1][name], value, err_msg=name)
