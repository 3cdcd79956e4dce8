"""``model.batchnorm_init``: PyTorch 0.4's BatchNorm init for ``fidelity = "logged"`` (issue 27).

PyTorch 0.4, which every logged run used, drew a new BatchNorm's weight uniform in [0, 1) in its
constructor (``reset_parameters``: ``weight.data.uniform_()``; ones from 1.2, pytorch/pytorch#12259).
The replays below rebuild that stream by hand from the global generator, in the documented
construction order, so they do not share code with ``initial_batchnorm_weights``. Draws from the
same generator state are the same float32 numbers: the comparisons are exact, no tolerance.
"""

from __future__ import annotations

import pytest
import torch
from test_fidelity_options import logged_runs
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods import build_model, build_model_from_config
from finebench.models.batchnorm import initial_batchnorm_weights

WRN = {"depth": 10, "width": 1, "stem": "conv", "shortcut": "preactivated", "classifier_init": "default"}
"""The CIFAR baselines' log-time WRN (painless-attention 844c4f8) at its smallest depth."""
SEED = 3


def batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def uniform(*shape: int) -> torch.Tensor:
    """One layer's default draw (``kaiming_uniform_``, a Linear bias, 0.4's BatchNorm weight):
    ``uniform_`` consumes the generator alike whatever its bounds."""
    return torch.empty(shape).uniform_()


def replay_wrn_backbone(backbone: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """WideResNet.__init__'s draws: its layers in construction order (stem conv, [stem BN], per
    block bn0, conv0, bn1, conv1, [shortcut], final BN), each BatchNorm drawing as it is built,
    then the Kaiming-normal pass over every convolution."""
    uniform(*backbone.stem_conv.weight.shape)
    if backbone.stem_bn is not None:
        expected["backbone.stem_bn"] = uniform(backbone.stem_bn.num_features)
    for g, group in enumerate(backbone.groups):
        for b, block in enumerate(group):
            expected[f"backbone.groups.{g}.{b}.bn0"] = uniform(block.bn0.num_features)
            uniform(*block.conv0.weight.shape)
            expected[f"backbone.groups.{g}.{b}.bn1"] = uniform(block.bn1.num_features)
            uniform(*block.conv1.weight.shape)
            if block.shortcut is not None:
                uniform(*block.shortcut.weight.shape)
    expected["backbone.final_bn"] = uniform(backbone.final_bn.num_features)
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            torch.empty(module.weight.shape).normal_()


def replay_classifier(model: nn.Module) -> None:
    """ImageClassifier's new Linear (weight, then bias); ``classifier_init = "default"`` draws no more."""
    uniform(*model.classifier.weight.shape)
    uniform(*model.classifier.bias.shape)


def assert_replayed(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    found = batchnorms(model)
    assert sorted(found) == sorted(expected)
    for name, bn in found.items():
        assert torch.equal(bn.weight.detach(), expected[name]), name
        assert bool(((bn.weight >= 0) & (bn.weight < 1)).all()), name
        assert torch.equal(bn.bias.detach(), torch.zeros_like(bn.bias)), name  # 0.4 zeroed the bias too


def test_uniform_batchnorm_weights_of_the_cifar_baseline_replay_pytorch_04_order() -> None:
    torch.manual_seed(SEED)
    model = build_model("wrn", 10, "baseline", None, WRN, batchnorm_init="uniform")
    after_build = torch.rand(4)
    torch.manual_seed(SEED)
    expected: dict[str, torch.Tensor] = {}
    replay_wrn_backbone(model.backbone, expected)
    replay_classifier(model)
    assert_replayed(model, expected)
    assert torch.equal(torch.rand(4), after_build)  # the replay drew exactly what the build drew


def test_uniform_batchnorm_weights_of_the_cifar_attention_model_replay_pytorch_04_order() -> None:
    """The ea7d4af model: tap BatchNorms of its own and the global gate's BatchNorm1d draw too."""
    options = {"attention_depth": 3, "attention_width": 2, "tap_norm": "separate"}
    torch.manual_seed(SEED)
    model = build_model("wrn", 10, "attention", options, WRN, batchnorm_init="uniform")
    after_build = torch.rand(4)
    torch.manual_seed(SEED)
    expected: dict[str, torch.Tensor] = {}
    replay_wrn_backbone(model.backbone, expected)
    for tap in model.attention.taps:  # separate_tap_norms, in tap order (deepest first)
        if tap in model.backbone.tap_norms:
            expected[f"backbone.tap_norms.{tap}"] = uniform(model.backbone.tap_norms[tap].num_features)
    for module in model.attention.attention_modules:  # the fused conv's default draw, then each head's Kaiming
        uniform(*module.conv.weight.shape)
        channels, heads, classes = module.conv.in_channels, module.heads, module.num_classes
        for rows in (heads, heads * classes, heads):
            torch.empty(rows, channels, 3, 3).normal_()
    gate = model.attention.global_gate
    uniform(*gate.linear.weight.shape)  # Linear's default draw, then its Kaiming-normal
    torch.empty(gate.linear.weight.shape).normal_()
    expected["attention.global_gate.bn"] = uniform(gate.bn.num_features)
    replay_classifier(model)
    assert_replayed(model, expected)
    assert set(expected) >= {"backbone.tap_norms.group0", "backbone.tap_norms.group1", "attention.global_gate.bn"}
    assert torch.equal(torch.rand(4), after_build)


def test_default_batchnorm_weights_are_ones_and_draw_nothing() -> None:
    torch.manual_seed(SEED)
    model = build_model("wrn", 10, "attention", {"attention_width": 2, "tap_norm": "separate"}, WRN)
    after_build = torch.rand(4)
    for name, bn in batchnorms(model).items():
        assert torch.equal(bn.weight.detach(), torch.ones_like(bn.weight)), name
    torch.manual_seed(SEED)
    build_model("wrn", 10, "attention", {"attention_width": 2, "tap_norm": "separate"}, WRN, batchnorm_init="ones")
    assert torch.equal(torch.rand(4), after_build)
    assert torch.equal(nn.BatchNorm2d(3).weight.detach(), torch.ones(3))  # the patch ends with the build


def test_pretrained_batchnorms_keep_their_weights_and_the_gate_draws(tmp_path) -> None:
    """Fine-grained: the loaded network's BatchNorms end as loaded; what the method adds draws."""
    from finebench.models.registry import build_backbone

    source = build_backbone("resnet18")
    with torch.no_grad():
        for bn in batchnorms(source).values():
            bn.weight.normal_(2.0, 0.1)  # far from [0, 1) and from 1
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    model = build_model("resnet18", 5, "attention", {"attention_depth": 2, "attention_width": 2}, None,
                        pretrained=str(weights), batchnorm_init="uniform")
    loaded = batchnorms(source)
    for name, bn in batchnorms(model.backbone).items():
        assert torch.equal(bn.weight, loaded[name].weight), name
    gate = model.attention.global_gate.bn.weight.detach()
    assert bool(((gate >= 0) & (gate < 1)).all()) and not torch.equal(gate, torch.ones_like(gate))


def test_build_model_names_a_bad_batchnorm_init() -> None:
    with pytest.raises(FinebenchError, match=r"batchnorm_init='normal' is invalid: expected one of ones, uniform"):
        build_model("wrn", 10, "baseline", None, WRN, batchnorm_init="normal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batchnorm_init='normal'"), \
            initial_batchnorm_weights("normal"):  # type: ignore[arg-type]
        pass


def _runs(tmp_path, model_table: str, overrides: tuple[str, ...] = ()):
    """test_fidelity_options' tiny logged recipe, its attention table also setting ``model_table``."""
    return logged_runs(tmp_path, 'fidelity = "logged"', f"[logged.attention]\ntrain = {{ batchnorm_group = 4 }}\n{model_table}",
                       overrides)


def test_a_logged_table_sets_batchnorm_init_for_its_variant_and_its_run_id(tmp_path) -> None:
    logged = _runs(tmp_path, 'model = { batchnorm_init = "uniform" }')
    without = _runs(tmp_path, "")
    released = _runs(tmp_path, 'model = { batchnorm_init = "uniform" }', ("fidelity=released",))
    assert logged["attention"].config["model"]["batchnorm_init"] == "uniform"
    assert logged["attention"].config["logged"]["model"] == {"batchnorm_init": "uniform"}
    assert logged["baseline"].config["model"]["batchnorm_init"] == "ones"  # no table names it
    assert released["attention"].config["model"]["batchnorm_init"] == "ones"
    assert logged["attention"].run_id != without["attention"].run_id  # it computes something else
    assert logged["baseline"].run_id == without["baseline"].run_id == released["baseline"].run_id
    assert released["attention"].run_id != without["attention"].run_id  # (without still has batchnorm_group)
    for runs, uniform_kinds in ((logged, {"attention"}), (released, set())):
        for kind, run in runs.items():
            torch.manual_seed(0)
            model = build_model_from_config(run.config, 10)
            weights = torch.cat([bn.weight.detach() for bn in batchnorms(model).values()])
            if kind in uniform_kinds:
                assert bool(((weights >= 0) & (weights < 1)).all())
            else:
                assert torch.equal(weights, torch.ones_like(weights))


def test_a_run_config_written_before_batchnorm_init_builds_ones() -> None:
    config = {"model": {"backbone": "wrn", "options": {"depth": 10, "width": 1}, "pretrained": None},
              "variant": {"kind": "baseline", "name": "baseline", "options": {}}}
    model = build_model_from_config(config, 10)
    assert all(torch.equal(bn.weight.detach(), torch.ones_like(bn.weight)) for bn in batchnorms(model).values())


@pytest.mark.parametrize(("table", "message"), [
    ('model = { batchnorm_init = "normal" }',
     r"batchnorm_init: Input should be 'ones' or 'uniform' \(got 'normal'\)"),
    ('model = { backbone = "resnet18" }', r"\['backbone'\] cannot differ per variant; expected keys among batchnorm_init"),
])
def test_bad_logged_model_tables_are_named(tmp_path, table: str, message: str) -> None:
    with pytest.raises(FinebenchError, match=message):
        _runs(tmp_path, table)


def test_report_groups_runs_written_before_batchnorm_init_with_runs_at_ones() -> None:
    from finebench.report.records import RunSummary, fingerprint, run_settings

    summary = RunSummary.model_validate({"run_id": "x", "recipe": "r", "status": "finished", "dataset": "cifar10",
                                         "backbone": "wrn", "backbone_label": "WRN-10-1", "variant": "baseline",
                                         "variant_name": "baseline", "seed": 0})
    old = {"model": {"backbone": "wrn", "options": {}}, "train": {"lr": 0.1}}
    new = {"model": {"backbone": "wrn", "options": {}, "batchnorm_init": "ones"}, "train": {"lr": 0.1}}
    logged = {"model": {"backbone": "wrn", "options": {}, "batchnorm_init": "uniform"}, "train": {"lr": 0.1}}
    prints = [fingerprint(run_settings(summary, config)) for config in (old, new, logged)]
    assert prints[0] == prints[1] != prints[2]
