"""Cost: parameters, fvcore FLOPs, early-prediction FLOPs, overheads, and the two CLI commands."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from finebench.methods import build_model
from finebench.profile import profile_model, profile_variants, tap_flops

torch.set_num_threads(1)

WRN_16_1 = {"depth": 16, "width": 1}


def test_flops_count_one_multiply_add_as_one_flop() -> None:
    class OneConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)

        def forward(self, x: torch.Tensor):  # noqa: ANN201
            logits = self.conv(x).mean((2, 3))
            return type("Out", (), {"log_probs": logits, "logits": logits, "module_logits": ()})()

    result = profile_model(OneConv(), 8)
    assert result.params == 3 * 4 * 9
    assert result.flops == 3 * 4 * 9 * 8 * 8  # MACs of the conv; the mean is not counted


def test_profile_puts_the_model_in_eval_mode_and_restores_training() -> None:
    model = build_model("wrn", 10, "attention", backbone_options=WRN_16_1).train()
    result = profile_model(model, 32)
    assert model.training
    assert result.params == sum(p.numel() for p in model.parameters())


def test_attention_overhead_is_its_parameters_and_at_least_its_convolutions() -> None:
    rows = profile_variants("wrn", 10, 32, [("att", "attention", {"attention_width": 4})], WRN_16_1)
    baseline, attention = rows
    assert baseline.label == "baseline" and baseline.params_overhead_pct == 0.0
    module_params = sum(9 * c * 4 * 12 for c in (64, 32, 16)) + 64 * 4 + 8
    assert attention.params - baseline.params == module_params
    assert attention.params_overhead_pct == pytest.approx(100 * module_params / baseline.params)
    conv_macs = sum(9 * c * 4 * 12 * side * side for c, side in ((64, 8), (32, 16), (16, 32)))
    assert attention.flops - baseline.flops >= conv_macs


def test_tap_flops_grow_with_depth_and_stay_below_the_full_model() -> None:
    model = build_model("wrn", 10, "attention", backbone_options=WRN_16_1)
    costs = tap_flops(model, 32)
    full = profile_model(model, 32).flops
    assert list(costs) == ["group2", "group1", "group0"]
    assert costs["group0"] < costs["group1"] < costs["group2"] < full


@pytest.mark.parametrize(("classes", "expected_pct"), [(10, 1.33), (100, 11.3)])
def test_wrn_28_10_attention_parameter_overhead_grows_with_classes(classes: int, expected_pct: float) -> None:
    with torch.device("meta"):
        baseline = build_model("wrn", classes)
        attention = build_model("wrn", classes, "attention", {"attention_depth": 3, "attention_width": 4})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 100 * (count(attention) - count(baseline)) / count(baseline) == pytest.approx(expected_pct, abs=0.05)


def invoke(*args: str) -> str:
    from typer.testing import CliRunner

    from finebench.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_cli_profile_json_reports_baseline_and_variants() -> None:
    report = json.loads(invoke("profile", "--backbone", "wrn", "--depth", "10", "--width", "1", "--num-classes",
                               "10", "--input-size", "32", "--variant", "attention", "--variant", "se", "--json"))
    assert [row["variant"] for row in report["rows"]] == ["baseline", "attention", "se"]
    assert report["flop_convention"].startswith("fvcore: one multiply-add = one flop")
    assert report["rows"][1]["params_overhead_pct"] > 0


def test_cli_profile_prints_a_table() -> None:
    table = invoke("profile", "--backbone", "wrn", "--depth", "10", "--width", "1", "--variant", "cbam")
    assert "cbam" in table and "FLOPs +%" in table and "one multiply-add = one flop" in table


def test_cli_profile_early_reports_each_modules_own_cost() -> None:
    report = json.loads(invoke("profile", "--backbone", "wrn", "--depth", "10", "--width", "1",
                               "--attention-depth", "2", "--early", "--json"))
    costs = report["early_prediction"]["attention-ad2-aw4"]
    assert list(costs) == ["group2", "group1"] and costs["group1"] < costs["group2"]
    table = invoke("profile", "--backbone", "wrn", "--depth", "10", "--width", "1", "--early")
    assert "early prediction" in table and "group0" in table


def test_cli_profile_user_error_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    from finebench.cli import main

    monkeypatch.setattr(sys, "argv", ["finebench", "profile", "--backbone", "vgg"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown backbone 'vgg'" in err


@pytest.mark.parametrize("argv", [["profile", "--no-such-option"], ["profile", "--num-classes", "many"]])
def test_cli_usage_error_is_a_usage_message_and_exit_2_not_a_traceback(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys  # noqa: ANN001
) -> None:
    from finebench.cli import main

    monkeypatch.setattr(sys, "argv", ["finebench", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Usage:" in err and "profile [OPTIONS]" in err and "Traceback" not in err


def test_cli_profile_refuses_set_without_a_recipe_instead_of_dropping_it(monkeypatch: pytest.MonkeyPatch,
                                                                          capsys) -> None:  # noqa: ANN001
    from finebench.cli import main

    monkeypatch.setattr(sys, "argv", ["finebench", "profile", "--backbone", "resnet18", "--set",
                                      "model.options.last_stride=1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--set model.options.last_stride=1: --set changes a recipe's settings; give the recipe" in err


@pytest.mark.parametrize("input_size", [0, -3])
def test_input_size_below_one_pixel_is_a_user_error(input_size: int) -> None:
    from finebench.errors import FinebenchError

    with pytest.raises(FinebenchError, match=f"input_size={input_size} is invalid"):
        profile_model(build_model("wrn", 10, backbone_options=WRN_16_1), input_size)


def test_cli_models_lists_backbones_with_taps() -> None:
    infos = {info["name"]: info for info in json.loads(invoke("models", "--json"))}
    assert infos["wide_resnet50_2"]["tap_points"][0] == {
        "name": "layer1", "channels": 256, "stride": 4, "description": "output of layer1"
    }
    table = invoke("models")
    assert "group0:160@1" in table and "36.48M" in table and "resnext101_32x8d" in table


def test_profile_recipe_uses_its_backbone_dataset_and_variants(tmp_path) -> None:  # noqa: ANN001
    from finebench.profile import profile_recipe

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        '[dataset]\nname = "cifar100"\ninput_size = 32\n'
        '[model]\nbackbone = "wrn"\noptions = { depth = 10, width = 1 }\n'
        '[[variants]]\nkind = "baseline"\n'
        '[[variants]]\nkind = "attention"\nattention_depth = 1\nattention_width = 2\n'
        '[[variants]]\nkind = "se"\n'
        '[train]\nepochs = 1\nbatch_size = 2\nschedule = "constant"\n'
    )
    report = profile_recipe(str(recipe), ["variants.2.reduction=4"])
    assert (report.backbone, report.num_classes, report.input_size) == ("wrn", 100, 32)
    assert [row.variant for row in report.rows] == ["baseline", "attention", "se"]
    assert report.rows[1].params - report.rows[0].params == 9 * 64 * 2 * 102 + 64 * 2 + 4


def test_cli_profile_shows_the_taps_a_variant_uses() -> None:
    args = ("profile", "--backbone", "resnet18", "--input-size", "64", "--attention-depth", "2", "--variant", "attention")
    assert "layer3:256@16 layer2:128@8" in invoke(*args)
    rows = json.loads(invoke(*args, "--json"))["rows"]
    assert rows[0]["taps"] == []
    assert rows[1]["taps"] == [
        {"module": "attention.attention_modules.0", "tap": "layer3", "channels": 256, "stride": 16},
        {"module": "attention.attention_modules.1", "tap": "layer2", "channels": 128, "stride": 8},
    ]


def test_a_dry_run_costs_each_distinct_network_once_without_the_cross_check_or_early_predictions(
    tmp_path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """Two attention variants differing only in their loss weight (and name) build one network; seeds
    share it too. The dry run prints params and FLOPs only: neither flop_counter's second forward
    (``profile`` keeps that check) nor each module's early prediction is counted."""
    import finebench.methods
    import finebench.profile
    from finebench.recipe import load_recipe
    from finebench.runner import run_recipe

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        'seeds = [0, 1]\n[dataset]\nname = "cifar100"\ninput_size = 32\n'
        '[model]\nbackbone = "wrn"\noptions = { depth = 10, width = 1 }\n'
        '[[variants]]\nkind = "baseline"\n'
        '[[variants]]\nkind = "attention"\nattention_depth = 2\n'
        '[[variants]]\nkind = "attention"\nname = "low-reg"\nattention_depth = 2\nreg_w = 1e-4\n'
        '[train]\nepochs = 1\nbatch_size = 2\nschedule = "constant"\n'
    )
    built = []
    build = finebench.methods.build_model_from_config
    monkeypatch.setattr(finebench.methods, "build_model_from_config",
                        lambda config, *args, **kwargs: built.append(config["variant"]["name"]) or build(config, *args,
                                                                                                          **kwargs))

    def not_in_a_dry_run(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a dry run counts this")

    monkeypatch.setattr(finebench.profile, "flop_counter_product_flops", not_in_a_dry_run)
    monkeypatch.setattr(finebench.profile, "early_prediction_flops", not_in_a_dry_run)
    outcomes = run_recipe(load_recipe(recipe), results_dir=tmp_path / "results", data_root=tmp_path / "data",
                          dry_run=True, quiet=True)
    assert built == ["baseline", "attention-ad2-aw4"]
    assert [o.run.variant_name for o in outcomes] == ["baseline"] * 2 + ["attention-ad2-aw4"] * 2 + ["low-reg"] * 2
    costs = [(o.summary["params"], o.summary["flops"]) for o in outcomes]
    assert costs[2:] == [costs[2]] * 4 and costs[2] > costs[0] == costs[1]
    # the same network profiled: its params and FLOPs, whichever counter checked them
    monkeypatch.undo()
    [_, attention] = profile_variants("wrn", 100, 32, [("att", "attention", {"attention_depth": 2})],
                                      {"depth": 10, "width": 1})
    assert costs[2] == (attention.params, attention.flops)
