"""``model.options = {last_stride = 1}``: the stride-1 last stage of CAL's official ResNet-101
(raoyongming/CAL 0ba9d50, fgvc/models/resnet.py) on the registered torchvision ResNets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from finebench.errors import FinebenchError
from finebench.methods import build_model
from finebench.models.registry import build_backbone
from finebench.recipe import expand_runs, load_recipe

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
"""Small enough to be quick, large enough for 2x2 maps at stride 32 (CAL needs 2x2)."""


def stride_one_pair(name: str) -> tuple[nn.Module, nn.Module]:
    """The default backbone and its stride-1 twin, with the same random weights."""
    torch.manual_seed(0)
    default = build_backbone(name).eval()
    stride_one = build_backbone(name, {"last_stride": 1}).eval()
    stride_one.load_state_dict(default.state_dict(), strict=True)
    return default, stride_one


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])  # BasicBlock and Bottleneck
def test_the_last_map_doubles_per_side_and_every_weight_keeps_its_shape(name: str) -> None:
    default, stride_one = stride_one_pair(name)
    assert {k: v.shape for k, v in default.state_dict().items()} == {
        k: v.shape for k, v in stride_one.state_dict().items()
    }
    default.load_state_dict(stride_one.state_dict(), strict=True)  # and back: the weights fit both ways
    images = torch.randn(1, 3, SIZE, SIZE)
    names = [tap.name for tap in default.tap_points]
    with torch.no_grad():
        _, small = default(images, names)
        _, large = stride_one(images, names)
    for tap in names[:-1]:  # the first three stages compute the same maps
        torch.testing.assert_close(small[tap], large[tap])
    assert small["layer4"].shape[-2:] == (SIZE // 32, SIZE // 32)
    assert large["layer4"].shape[-2:] == (SIZE // 16, SIZE // 16)
    # the declared taps (profile, WS-DAN/CAL's maps, attention) follow the maps
    assert [tap.stride for tap in stride_one.tap_points] == [4, 8, 16, 16]
    for tap in stride_one.tap_points:
        assert large[tap.name].shape == (1, tap.channels, SIZE // tap.stride, SIZE // tap.stride)


def test_layer4s_first_block_runs_at_stride_one_without_dilation() -> None:
    _, net = stride_one_pair("resnet101")
    block = net.layer4[0]
    for conv in (block.conv2, block.downsample[0]):  # the convolutions CAL's official code leaves unstrided
        assert conv.stride == (1, 1) and conv.dilation == (1, 1)
    seen: dict[str, tuple[int, ...]] = {}
    handle = block.register_forward_hook(
        lambda _m, args, out: seen.update(input=tuple(args[0].shape[-2:]), output=tuple(out.shape[-2:]))
    )
    with torch.no_grad():
        net(torch.randn(1, 3, SIZE, SIZE))
    handle.remove()
    assert seen["input"] == seen["output"] == (SIZE // 16, SIZE // 16)


def test_cal_builds_and_runs_on_the_stride_one_backbone() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 5, "cal", {"attentions": 4}, {"last_stride": 1}).train()
    output = model(torch.randn(2, 3, SIZE, SIZE))
    assert output.logits.shape == (2, 5)
    _, maps, _ = output.aux
    assert maps.shape == (2, 4, SIZE // 16, SIZE // 16)


@pytest.mark.parametrize(
    ("backbone", "options", "message"),
    [
        ("resnet50", {"last_stride": 3}, "option last_stride=3 for backbone 'resnet50' is invalid: expected 2 .* or 1"),
        ("resnet50", {"last_stride": "1"}, "last_stride='1' for backbone 'resnet50' has the wrong type"),
        ("wrn", {"depth": 10, "width": 1, "last_stride": 1},
         "option last_stride for backbone 'wrn' is not supported: expected a registered torchvision .*resnet101"),
        ("timm:resnet18", {"last_stride": 1}, "last_stride for backbone 'timm:resnet18' is not supported"),
        ("torchvision:resnet18", {"last_stride": 1},
         "last_stride for backbone 'torchvision:resnet18' is not supported"),
    ],
)
def test_where_last_stride_cannot_apply_one_line_says_what_works(backbone: str, options: dict, message: str) -> None:
    with pytest.raises(FinebenchError, match=message) as caught:
        build_backbone(backbone, options)
    assert "\n" not in str(caught.value)


def test_the_dry_run_reports_a_backbone_without_a_last_stride(tmp_path: Path) -> None:
    from tiny_data import prepare_tiny_bars, tiny_recipe

    root = prepare_tiny_bars(tmp_path / "data", 16, 8)
    recipe = tmp_path / "stride.toml"
    text, wrn = tiny_recipe(), "options = { depth = 10, width = 1"
    assert f"{wrn} }}" in text
    recipe.write_text(text.replace(f"{wrn} }}", f"{wrn}, last_stride = 1 }}"))
    result = subprocess.run(
        [sys.executable, "-m", "finebench", "run", str(recipe), "--data-root", str(root), "--dry-run",
         "--results-dir", str(tmp_path / "results")], check=False, capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "option last_stride for backbone 'wrn' is not supported" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "results").exists()


def test_the_default_keeps_the_run_ids_and_stride_one_changes_them(tmp_path: Path) -> None:
    # cal_cub200 without its last_stride line is the recipe as it was before: its frozen ids then
    shipped = (ROOT / "recipes" / "cal_cub200.toml").read_text()
    assert "options = {last_stride = 1}\n" in shipped
    before = tmp_path / "cal_cub200.toml"
    before.write_text(shipped.replace("options = {last_stride = 1}\n", ""))
    ids = [run.run_id for run in expand_runs(load_recipe(before, check_dataset=False))]
    assert ids == ["489297bb3d4c", "de7bdabcfd12", "18995a06f83c", "0b04f348751d", "100215cf9245", "6dbfd907c543"]
    shipped_ids = [run.run_id for run in expand_runs(load_recipe(ROOT / "recipes" / "cal_cub200.toml",
                                                                 check_dataset=False))]
    assert not set(ids) & set(shipped_ids)
