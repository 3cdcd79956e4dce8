"""CAL (``finebench.methods.cal``): two training steps and the 8-view test prediction against the
official raoyongming/CAL code's golden tensors (tools/golden/cal.py), every backbone family, the
engine's step and the recorded test predictions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from float_tolerance import assert_agrees
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
from finebench.methods.cal import CALClassifier, step_losses
from finebench.methods.ws_dan import Draws
from finebench.models.output import ModelOutput
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step

GOLDEN = Path(__file__).parent / "data" / "golden" / "cal" / "golden.safetensors"


def test_the_golden_tensors_name_the_official_commit() -> None:
    with safe_open(GOLDEN, "pt") as file:
        assert file.metadata() == {"repository": "raoyongming/CAL", "commit": "0ba9d5084f2532eeb21c9ef051c23f8b339595ff"}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_two_steps_and_the_test_predictions_equal_the_official_cal(precision: str) -> None:
    golden, model, images, labels, optimizer = golden_start(GOLDEN, precision, CALClassifier, "cal")
    for step in range(2):
        g = step_tensors(golden, step)
        fakes = iter((g["fake_raw"], g["fake_aug"]))

        def forward(x: torch.Tensor, fakes=fakes) -> ModelOutput:
            return model(x, counterfactual=next(fakes))

        optimizer.zero_grad()
        losses = step_losses(model, forward, images, labels, Draws(g["maps"], g["crop_theta"], g["drop_theta"]))
        losses.total.backward()
        optimizer.step()
        pooled, maps, effect = losses.raw.aux
        assert_agrees(losses.raw.logits.detach(), g["raw"], TRAIN_FORWARD_TERMS)
        assert_agrees(pooled.detach(), g["features"], TRAIN_FORWARD_TERMS)
        assert_agrees(maps.detach()[torch.arange(3)[:, None], g["maps"]], g["attention"], TRAIN_FORWARD_TERMS)
        assert_agrees(losses.augmented_images.sum(dim=(1, 2, 3)), g["aug_images.sum"], IMAGE_SUM_TERMS)
        assert_agrees(losses.augmented_images[:, :, 112], g["aug_images.row"], IMAGE_TERMS)
        assert_agrees(losses.augmented.logits.detach(), g["aug"], TRAIN_FORWARD_TERMS)
        assert_agrees(torch.cat([effect, losses.augmented.aux[2]]).detach(), g["effect"], TRAIN_FORWARD_TERMS)
        assert_agrees(torch.stack([t.detach() for t in losses.terms]), g["terms"], TRAIN_FORWARD_TERMS)
        assert_agrees(losses.total.detach(), g["loss"], TRAIN_FORWARD_TERMS)
        assert_agrees(model.centres, g["centres"], TRAIN_FORWARD_TERMS)
    for name, value in model.state_dict().items():
        if name != "centres":
            assert_weights_agree(value, golden[f"init.{official_name(name)}"], golden[f"after.{official_name(name)}"], name)
    model.eval()
    with torch.no_grad():
        output = get_method("cal").predict(model, images)
    raw, _, two_view, effect_two_view, effect = output.module_logits
    assert_agrees(output.logits, golden["eval.prediction"], TRAIN_FORWARD_TERMS)
    assert_agrees(raw, golden["eval.raw"], TRAIN_FORWARD_TERMS)
    assert_agrees(two_view, golden["eval.two_view"], TRAIN_FORWARD_TERMS)
    assert_agrees(effect_two_view, golden["eval.effect_two_view"], TRAIN_FORWARD_TERMS)
    assert_agrees(effect, golden["eval.effect"], TRAIN_FORWARD_TERMS)


def test_a_seeded_counterfactual_is_the_official_uniform_draw_and_ones_at_test_time() -> None:
    model = CALClassifier(SmallTrunk(), 3, parse_options("cal", {"attentions": 2})).train()
    images = torch.randn(2, 3, 64, 64)
    torch.manual_seed(5)
    drawn = model(images)
    _, maps = model.attend(images)
    torch.manual_seed(5)
    given = model(images, counterfactual=torch.zeros_like(maps).uniform_(0, 2))
    torch.testing.assert_close(drawn.aux[2], given.aux[2])
    model.eval()
    with torch.no_grad():
        tested = model(images)
        ones = model(images, counterfactual=torch.ones_like(tested.aux[1]))
    torch.testing.assert_close(tested.aux[2], ones.aux[2])


def test_options_and_table_names() -> None:
    method = get_method("cal")
    assert (method.test_forward_passes, method.train_passes_per_image) == (8, 3)
    assert method.table_name(parse_options("cal", {})) == "cal"
    assert method.table_name(parse_options("cal", {"attentions": 8, "centre_update": "mean"})) == "cal-m8-mean"


@pytest.mark.parametrize(("backbone", "options"), FAMILIES)
def test_cal_attaches_on_every_family_with_the_effect_branch(backbone: str, options: dict | None) -> None:
    model = build_model(backbone, 5, "cal", {"attentions": 3}, options).train()
    output = model(torch.randn(2, 3, 64, 64))
    assert output.logits.shape == (2, 5) and output.aux[2].shape == (2, 5)
    with torch.no_grad():
        predicted = get_method("cal").predict(model.eval(), torch.randn(2, 3, 64, 64))
    assert predicted.logits.shape == (2, 5) and len(predicted.module_logits) == 5


def test_the_engine_step_takes_two_forwards_and_records_four_test_accuracies() -> None:
    torch.manual_seed(0)
    method = get_method("cal")
    model = build_model("wrn", 4, "cal", {"attentions": 2}, TINY)
    train = TrainSection(epochs=1, batch_size=4, schedule="constant", precision="fp32", lr=0.1)
    step = build_train_step(model, train, steps_per_epoch=1, method=method)
    batches = []
    model.register_forward_hook(lambda _m, inputs, _o: batches.append(inputs[0].shape[0]))
    loss, _ = step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss) and batches == [4, 8]
    model.eval()
    with torch.no_grad():
        output = method.predict(model, torch.randn(4, 3, 32, 32))
    labels = output.logits.argmax(1)
    metrics = method.eval_metrics([float(c) for c in method.eval_counts(output, labels)], 4, model)
    assert set(metrics) == {"top1_raw", "top1_crop", "top1_two_view", "top1_effect_two_view", "top1_effect"}
    assert metrics["top1_raw"] == 100.0 * float((output.module_logits[0].argmax(1) == labels).sum()) / 4


def test_an_input_too_small_is_one_line_naming_cal() -> None:
    model = build_model("timm:resnet10t", 3, "cal", {"attentions": 2}).eval()
    with pytest.raises(FinebenchError, match=r"^variant 'cal': input_size 32x32 gives 1x1 attention maps"):
        model(torch.zeros(1, 3, 32, 32))


def test_a_crop_that_cannot_act_is_named_with_every_test_crop_and_what_works() -> None:
    from finebench.models.registry import build_backbone

    method = get_method("cal")
    points = build_backbone("timm:resnet10t", None).tap_points  # strides 2 ... 32

    def sizes_at(pixels: int) -> dict[str, tuple[int, int]]:
        return {point.name: (-(-pixels // point.stride),) * 2 for point in points}

    (line,) = method.size_warnings(method.Options(kind="cal"), sizes_at(64), 64)
    assert line.startswith("input_size 64 gives 2x2 attention maps on 'layer4'")
    assert ("(training crop, test crop θ 0.3 pad 0.1, test crop θ 0.2 pad 0.1, test crop θ 0.1 pad 0.05), "
            "so the crop cannot act") in line
    assert line.endswith("input_size 128 or more (4x4 maps) or tap = 'layer3' (4x4 maps) lets it act")
    assert method.size_warnings(method.Options(kind="cal"), sizes_at(128), 128) == []
