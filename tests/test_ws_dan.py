"""WS-DAN (``finebench.methods.ws_dan``): two training steps and the test prediction against the
official GuYuc/WS-DAN.PyTorch code's golden tensors (tools/golden/ws_dan.py), the crop and drop
rules, every backbone family, the engine's step and the one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from float_tolerance import assert_agrees
from in_process import finebench_in_process
from safetensors import safe_open
from wsdan_golden import (
    FAMILIES,
    IMAGE_SUM_TERMS,
    IMAGE_TERMS,
    PRECISIONS,
    TINY,
    TRAIN_FORWARD_TERMS,
    SmallTrunk,
    assert_weights_agree,
    golden_start,
    official_name,
    step_tensors,
)

from finebench.errors import FinebenchError
from finebench.methods import build_model, get_method, parse_options
from finebench.methods.ws_dan import (
    Draws,
    WSDANClassifier,
    crop,
    crop_boxes,
    drop,
    map_weights,
    step_losses,
)
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step

GOLDEN = Path(__file__).parent / "data" / "golden" / "ws_dan" / "golden.safetensors"
def test_the_golden_tensors_name_the_official_commit() -> None:
    with safe_open(GOLDEN, "pt") as file:
        assert file.metadata() == {"repository": "GuYuc/WS-DAN.PyTorch",
                                   "commit": "87779124f619ceeb445ddfb0246c8a22ff324db4"}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_two_steps_and_the_test_prediction_equal_the_official_wsdan(precision: str) -> None:
    golden, model, images, labels, optimizer = golden_start(GOLDEN, precision, WSDANClassifier, "ws_dan")
    for step in range(2):
        g = step_tensors(golden, step)
        draws = Draws(g["maps"], g["crop_theta"], g["drop_theta"])
        optimizer.zero_grad()
        losses = step_losses(model, model, images, labels, draws)
        losses.total.backward()
        optimizer.step()
        pooled, maps = losses.raw.aux
        assert_agrees(losses.raw.logits.detach(), g["raw"], TRAIN_FORWARD_TERMS)
        assert_agrees(pooled.detach(), g["features"], TRAIN_FORWARD_TERMS)
        chosen = maps.detach()[torch.arange(3)[:, None], g["maps"]]
        assert_agrees(chosen, g["attention"], TRAIN_FORWARD_TERMS)
        assert_agrees(losses.crop_images.sum(dim=(1, 2, 3)), g["crop_images.sum"], IMAGE_SUM_TERMS)
        assert_agrees(losses.crop_images[:, :, 112], g["crop_images.row"], IMAGE_TERMS)
        assert_agrees(losses.drop_images.sum(dim=(1, 2, 3)), g["drop_images.sum"], IMAGE_SUM_TERMS)
        assert_agrees(losses.drop_images[:, :, 112], g["drop_images.row"], IMAGE_TERMS)
        assert_agrees(losses.crop_logits.detach(), g["crop"], TRAIN_FORWARD_TERMS)
        assert_agrees(losses.drop_logits.detach(), g["drop"], TRAIN_FORWARD_TERMS)
        terms = torch.stack([*(t.detach() for t in losses.cross_entropy), losses.centre.detach()])
        assert_agrees(terms, g["terms"], TRAIN_FORWARD_TERMS)
        assert_agrees(losses.total.detach(), g["loss"], TRAIN_FORWARD_TERMS)
        # labels 1, 3, 1: the indexed update keeps one of class 1's two updates, as the official
        assert_agrees(model.centres, g["centres"], TRAIN_FORWARD_TERMS)
    for name, value in model.state_dict().items():
        if name != "centres":
            assert_weights_agree(value, golden[f"init.{official_name(name)}"], golden[f"after.{official_name(name)}"], name)
    model.eval()
    with torch.no_grad():
        output = get_method("ws_dan").predict(model, images)
    assert_agrees(output.module_logits[0], golden["eval.raw"], TRAIN_FORWARD_TERMS)
    assert_agrees(output.module_logits[1], golden["eval.crop"], TRAIN_FORWARD_TERMS)
    assert_agrees(output.logits, golden["eval.prediction"], TRAIN_FORWARD_TERMS)


def test_the_mean_centre_update_is_an_option_that_moves_by_the_average() -> None:
    options = parse_options("ws_dan", {"attentions": 2, "centre_update": "mean", "centre_beta": 0.5})
    model = WSDANClassifier(SmallTrunk(), 3, options)
    pooled = torch.tensor([[1.0, 0, 0, 0] + [0.0] * 60, [0, 1.0, 0, 0] + [0.0] * 60])
    model.update_centres(pooled, torch.tensor([2, 2]))
    assert model.centres[2, :2].tolist() == [0.25, 0.25] and model.centres[:2].abs().sum() == 0
    official = WSDANClassifier(SmallTrunk(), 3, parse_options("ws_dan", {"attentions": 2, "centre_beta": 0.5}))
    official.update_centres(pooled, torch.tensor([2, 2]))
    assert official.centres[2, :2].tolist() == [0.0, 0.5]  # the last image's update survives (CPU)


def test_the_crop_box_is_the_padded_truncated_bounding_box_and_the_drop_erases_the_part() -> None:
    maps = torch.zeros(1, 1, 5, 5)
    maps[0, 0, 2, 3] = 1.0  # upsampled to 9x9 (corners aligned): rows/cols 3..5 and 5..7 are > 0
    boxes = crop_boxes(maps, (9, 9), torch.tensor([0.01]), padding=0.1)
    # rows 3..5 → int(3 - 0.9) = 2, int(5 + 0.9) = 5; cols 5..7 → 4, 7
    assert boxes == [(2, 5, 4, 7)]
    images = torch.arange(81.0).view(1, 1, 9, 9)
    assert torch.equal(crop(images[:, :, :], [(0, 9, 0, 9)]), images)
    dropped = drop(images, maps, 0.01)
    assert dropped[0, 0, 4, 6] == 0 and dropped[0, 0, 0, 0] == 0 and dropped[0, 0, 8, 8] == 80


def test_map_weights_are_the_normalised_square_roots_of_each_maps_mass() -> None:
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0] = 1.0  # mass 4
    maps[0, 1, 0, 0] = 1.0  # mass 1
    torch.testing.assert_close(map_weights(maps), torch.tensor([[2 / 3, 1 / 3]]))


def test_options_and_table_names() -> None:
    method = get_method("ws_dan")
    assert (method.test_forward_passes, method.train_passes_per_image) == (2, 3)
    assert method.table_name(parse_options("ws_dan", {})) == "ws_dan"
    assert method.table_name(parse_options("ws_dan", {"attentions": 8, "centre_update": "mean"})) == "ws_dan-m8-mean"
    with pytest.raises(Exception, match="crop_theta_min=0.7 is above crop_theta_max=0.6"):
        parse_options("ws_dan", {"crop_theta_min": 0.7})


@pytest.mark.parametrize(("backbone", "options"), FAMILIES)
def test_ws_dan_attaches_on_every_family_and_predicts_with_two_passes(backbone: str, options: dict | None) -> None:
    model = build_model(backbone, 5, "ws_dan", {"attentions": 3}, options).train()
    output = model(torch.randn(2, 3, 64, 64))
    pooled, maps = output.aux
    assert output.logits.shape == (2, 5) and maps.shape[:2] == (2, 3)
    assert model.tap == model.backbone.tap_points[-1].name
    assert pooled.shape == (2, 3 * model.backbone.tap_points[-1].channels)
    with torch.no_grad():
        predicted = get_method("ws_dan").predict(model.eval(), torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(predicted.logits, sum(predicted.module_logits) / 2)


@pytest.mark.parametrize("parts", [1, 2])
def test_the_engine_step_trains_with_three_passes_and_moves_the_centres(parts: int) -> None:
    torch.manual_seed(0)
    model = build_model("wrn", 4, "ws_dan", {"attentions": 2}, TINY)
    train = TrainSection(epochs=1, batch_size=4, schedule="constant", precision="fp32", lr=0.1,
                         accumulation_steps=parts)
    step = build_train_step(model, train, steps_per_epoch=1, method=get_method("ws_dan"))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    before = model.fc.weight.detach().clone()
    loss, correct = step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss) and 0 <= int(correct) <= 4 and len(calls) == 3 * parts
    assert not torch.equal(model.fc.weight, before) and model.centres.abs().sum() > 0


def test_evaluation_records_the_raw_and_the_crop_accuracy() -> None:
    method = get_method("ws_dan")
    model = build_model("wrn", 3, "ws_dan", {"attentions": 2}, TINY).eval()
    with torch.no_grad():
        output = method.predict(model, torch.randn(4, 3, 32, 32))
    labels = output.module_logits[0].argmax(1)
    counts = [float(c) for c in method.eval_counts(output, labels)]
    metrics = method.eval_metrics(counts, 4, model)
    assert metrics["top1_raw"] == 100.0
    assert metrics["top1_crop"] == 100.0 * float((output.module_logits[1].argmax(1) == labels).sum()) / 4


def test_an_input_too_small_for_two_by_two_maps_is_one_line_at_the_dry_run() -> None:
    model = build_model("timm:resnet10t", 3, "ws_dan", {"attentions": 2}).eval()
    with pytest.raises(FinebenchError, match=r"^variant 'ws_dan': input_size 32x32 gives 1x1 attention maps on "
                                             r"'.*'; expected at least 2x2 \(input_size 64 or more\)$"):
        model(torch.zeros(1, 3, 32, 32))
    from finebench.profile import profile_variants

    with pytest.raises(FinebenchError, match="input_size 32x32 gives 1x1"):
        profile_variants("timm:resnet10t", 3, 32, [("ws_dan", "ws_dan", {"attentions": 2})])


def test_the_maps_can_read_a_chosen_tap_and_an_unknown_one_is_one_line() -> None:
    model = build_model("timm:resnet10t", 3, "ws_dan", {"attentions": 2, "tap": "layer3"}).eval()
    assert model.tap == "layer3" and model.attentions[0].in_channels == model.backbone.tap_point("layer3").channels
    assert get_method("ws_dan").table_name(parse_options("ws_dan", {"tap": "layer3"})) == "ws_dan-layer3"
    with pytest.raises(FinebenchError, match=r"^variant 'cal' on .*: tap 'Mixed_6e' is not one of its tap points; "
                                             r"expected one of act1, layer1, .*, layer4 \(or no tap: the deepest\)$"):
        build_model("timm:resnet10t", 3, "cal", {"tap": "Mixed_6e"})


def test_a_backbone_without_taps_is_one_line() -> None:
    backbone = SmallTrunk()
    backbone.tap_points = ()
    with pytest.raises(FinebenchError, match="variant 'ws_dan' on SmallTrunk: expected a backbone that declares"):
        get_method("ws_dan").attach(backbone, 2, parse_options("ws_dan", {}))


def test_attend_draws_the_mean_map_with_its_crop_box_and_the_heaviest_maps(tmp_path: Path) -> None:
    """``finebench attend`` on a tiny WS-DAN run: the method's ``maps_to_draw`` (mean map, test crop
    box, maps by weight, predictions) drawn into one PNG per image."""
    import json

    import numpy as np
    from PIL import Image

    from finebench.attend import attend

    torch.manual_seed(0)
    options = {"attentions": 3}
    model = build_model("wrn", 3, "ws_dan", options, TINY).eval()
    drawn = get_method("ws_dan").maps_to_draw(model, torch.randn(2, 3, 32, 32))
    assert drawn.maps.shape == (2, 4, 8, 8) and len(drawn.captions[0]) == 4 and drawn.captions[0][0] == "mean map (crop)"
    assert set(drawn.log_probs) == {"prediction", "raw", "crop"} and len(drawn.boxes) == 2
    run_dir = tmp_path / "tiny" / "abc123def456"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({
        "recipe": "tiny", "dataset": {"name": "toy", "root": str(tmp_path), "input_size": 32, "augmentation": "none",
                                      "train_split": "train", "test_split": "test"},
        "model": {"backbone": "wrn", "options": TINY, "pretrained": None},
        "variant": {"kind": "ws_dan", "name": "ws_dan-m3", "options": options}, "seed": 0}))
    (run_dir / "summary.json").write_text(json.dumps({
        "schema": 1, "run_id": "abc123def456", "recipe": "tiny", "status": "finished", "dataset": "toy",
        "num_classes": 3, "backbone": "wrn", "backbone_label": "WRN-10-1", "variant": "ws_dan",
        "variant_name": "ws_dan-m3", "variant_options": options, "seed": 0}))
    torch.save({"epoch": 1, "model": model.state_dict()}, run_dir / "last.pt")
    picture = tmp_path / "bird.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(picture)
    written = attend(run_dir, [picture], out_dir=tmp_path / "maps", device="cpu")
    assert [path.name for path in written] == ["bird.png"] and Image.open(written[0]).size[0] > 100


def _ddp_worker(rank: int, port: int, queue: Any) -> None:
    import os

    import torch.distributed as dist

    from finebench.train.step import TrainStep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model("wrn", 4, "ws_dan", {"attentions": 2}, TINY)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = TrainStep(torch.nn.parallel.DistributedDataParallel(model), optimizer, None, torch.device("cpu"),
                         accumulation_steps=2, method=get_method("ws_dan"))
        generator = torch.Generator().manual_seed(rank + 1)  # each rank its own half batch
        step(torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3]) if rank else torch.zeros(4).long())
        # as NumPy arrays: torch would share the tensors by file descriptors that die with this process
        queue.put((rank, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_the_parameters_stay_in_step_and_each_rank_keeps_its_own_centres() -> None:
    """Three passes into one backward all-reduce once per step (the ranks' parameters agree); the
    centres are left out of DDP's buffer broadcast, so each rank keeps the centres of its own images."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    processes = mp.start_processes(_ddp_worker, args=(port, queue), nprocs=2, join=False, start_method="spawn")
    states = {rank: {k: torch.from_numpy(v) for k, v in state.items()}
              for rank, state in (queue.get(timeout=120) for _ in range(2))}
    processes.join(timeout=120)
    for name, value in states[0].items():
        if name == "centres" or "running_" in name or "num_batches" in name:
            continue
        torch.testing.assert_close(states[1][name], value, msg=name)
    assert states[0]["centres"][1:].abs().sum() == 0 and states[1]["centres"][1:].abs().sum() > 0


def _resnet10t_recipe(tmp_path: Path, kind: str, input_size: int) -> Path:
    """A tiny recipe of one ``kind`` variant (2 maps) on ``timm:resnet10t`` at ``input_size``."""
    from tiny_data import tiny_recipe

    text = tiny_recipe(variants=(kind,), input_size=input_size, batch_size=8, extra_train="threads = 1")
    text = text.replace('backbone = "wrn"\noptions = { depth = 10, width = 1 }',
                        'backbone = "timm:resnet10t"\npretrained = "none"')
    recipe = tmp_path / f"{kind}_{input_size}.toml"
    recipe.write_text(text.replace(f'kind = "{kind}"', f'kind = "{kind}"\nattentions = 2'))
    return recipe


def _finebench(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return finebench_in_process(monkeypatch, capsys, *args, columns=400)


def test_a_crop_that_cannot_act_on_two_by_two_maps_warns_at_the_dry_run_and_not_at_a_size_where_it_acts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # resnet10t's layer4 has stride 32: 2x2 maps at 64 px, 4x4 at 128 px
    args = ("--dry-run", "--results-dir", str(tmp_path / "results"), "--data-root", str(tmp_path / "data"))
    code, _, err = _finebench(monkeypatch, capsys, "run", str(_resnet10t_recipe(tmp_path, "ws_dan", 64)), *args)
    assert code == 0, err
    warning = " ".join(err.split())
    assert ("warning: variant 'ws_dan-m2' on timm:resnet10t: input_size 64 gives 2x2 attention maps on 'layer4'"
            in warning), err
    assert "the crop cannot act" in warning
    assert "input_size 128 or more (4x4 maps) or tap = 'layer3' (4x4 maps) lets it act" in warning
    code, _, err = _finebench(monkeypatch, capsys, "run", str(_resnet10t_recipe(tmp_path, "ws_dan", 128)), *args)
    assert code == 0 and "cannot act" not in err and "warning" not in err, err


def test_the_size_rule_follows_the_crop_boxes() -> None:
    from finebench.methods.ws_dan import crop_can_act

    # a 2x2 map: the box of its one lit cell reaches out (1 - θ) of the 63 px spacing, plus 5% padding
    assert crop_boxes(torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]]), (64, 64), 0.1, 0.05) == [(3, 64, 3, 64)]
    assert not crop_can_act((2, 2), 64, 0.1, 0.05)  # leaves out 3 px, less than a cell's 32
    assert not crop_can_act((3, 3), 96, 0.1, 0.05)
    assert crop_can_act((4, 4), 128, 0.1, 0.05) and crop_can_act((7, 7), 224, 0.4, 0.1)
    method = get_method("ws_dan")
    sizes = {"layer3": (4, 4), "layer4": (2, 2)}
    assert method.size_warnings(method.Options(kind="ws_dan"), sizes, 64)
    assert not method.size_warnings(method.Options(kind="ws_dan", tap="layer3"), sizes, 64)
    assert not method.size_warnings(method.Options(kind="ws_dan"), {"layer4": (4, 4)}, 128)
    assert get_method("baseline").size_warnings(get_method("baseline").Options(kind="baseline"), sizes, 64) == []


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_run_whose_crop_cannot_act_records_the_warning_and_the_report_footnotes_its_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from tiny_data import prepare_tiny_bars

    data_root = prepare_tiny_bars(tmp_path / "data", 16, 10)
    results = tmp_path / "results"
    code, out, err = _finebench(monkeypatch, capsys, "run", str(_resnet10t_recipe(tmp_path, "ws_dan", 64)),
                                "--results-dir", str(results), "--data-root", str(data_root))
    assert code == 0, err
    assert "input_size 64 gives 2x2 attention maps" in " ".join(err.split())  # at the start of the run too
    (summary,) = results.rglob("summary.json")
    recorded = json.loads(summary.read_text())["size_warnings"]
    assert len(recorded) == 1 and recorded[0].startswith("variant 'ws_dan-m2' on timm:resnet10t: input_size 64")
    for layout, marked in (((), r"\d+\.\d\d \(n=1\)‡"), (("--long",), r"\| +\d+\.\d\d‡ +\|")):
        code, out, err = _finebench(monkeypatch, capsys, "report", str(results), *layout)
        assert code == 0, err
        assert re.search(marked, out), out  # the row's score carries the mark
        text = " ".join(out.split())
        assert "‡: a method's mechanism cannot act at the configured size; its runs warned: " + recorded[0] in text
