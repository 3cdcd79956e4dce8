"""PMG (``finebench.methods.pmg``): the jigsaw against the official code's golden arrangements,
the heads on every backbone family, the four-step training step and the per-granularity records."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finebench.errors import FinebenchError
from finebench.methods import build_model, get_method, parse_options
from finebench.methods.pmg import jigsaw
from finebench.recipe import TrainSection
from finebench.train.engine import build_train_step

GOLDEN = Path(__file__).parent / "data" / "golden" / "pmg" / "golden.safetensors"
TINY = {"depth": 10, "width": 1}
FAMILIES = [("wrn", TINY), ("resnext_cifar", {"depth": 11, "cardinality": 2, "base_width": 4}),
            ("timm:resnet10t", None), ("torchvision:resnet18", None)]


def test_the_golden_tensors_name_the_official_commit() -> None:
    with safe_open(GOLDEN, "pt") as file:
        assert file.metadata() == {"repository": "PRIS-CV/PMG-Progressive-Multi-Granularity-Training",
                                   "commit": "db7a7d7ab5fd91c2e322e1fcf200cbfbe192b51a"}


def test_a_seeded_jigsaw_cuts_the_official_arrangements_in_the_steps_order() -> None:
    golden = load_file(GOLDEN)
    random.seed(0)
    for n in (8, 4, 2):
        cell = 448 // n
        index = torch.arange(n * n, dtype=torch.float64).view(1, 1, n, n)
        image = index.repeat_interleave(cell, 2).repeat_interleave(cell, 3).expand(2, 3, 448, 448)
        cut = jigsaw(image, n)
        assert torch.equal(cut[1, 2, ::cell, ::cell].flatten().long(), golden[f"cells_{n}"])
        assert torch.equal(cut[0], cut[1])  # one arrangement for the whole batch


def test_a_given_order_replaces_the_draw_and_the_swaps_are_not_a_plain_placement() -> None:
    image = torch.arange(4.0).view(1, 1, 2, 2)
    # swaps of cell (0,0) with (0,1), (1,1), (0,0), (1,0): [1,0,2,3] -> [3,0,2,1] -> same -> [2,0,3,1];
    # placing cell order[i] at position i would give [1,3,0,2]
    assert jigsaw(image, 2, order=[(0, 1), (1, 1), (0, 0), (1, 0)]).flatten().tolist() == [2.0, 0.0, 3.0, 1.0]


def test_an_input_the_jigsaw_cannot_cut_is_one_line() -> None:
    with pytest.raises(FinebenchError, match="input 30x30 does not split into a 8x8 jigsaw; expected an input_size divisible by 8"):
        jigsaw(torch.zeros(1, 3, 30, 30), 8)


def test_options_and_table_names() -> None:
    method = get_method("pmg")
    assert method.train_passes_per_image == 4 and method.test_forward_passes == 1
    assert method.table_name(parse_options("pmg", {})) == "pmg"
    assert method.table_name(parse_options("pmg", {"feature_size": 64, "zero_grad": "none"})) == "pmg-f64-none"
    with pytest.raises(Exception, match="zero_grad"):
        parse_options("pmg", {"zero_grad": "sometimes"})


@pytest.mark.parametrize(("backbone", "options"), FAMILIES)
def test_pmg_attaches_on_every_family_with_a_head_per_stage(backbone: str, options: dict | None) -> None:
    model = build_model(backbone, 5, "pmg", {"feature_size": 8}, options).train()
    output = model(torch.randn(2, 3, 32, 32))
    assert output.logits.shape == (2, 5) and len(output.module_logits) == 3
    assert model.taps == [tap.name for tap in model.backbone.tap_points[-3:]]


def test_a_backbone_with_fewer_than_three_stages_is_one_line() -> None:
    from finebench.methods.pmg import PMG

    backbone = build_model("wrn", 2, "baseline", None, TINY).backbone
    backbone.tap_points = backbone.tap_points[:2]
    with pytest.raises(FinebenchError, match="variant 'pmg' on .*: expected a backbone with three stages to tap, it has 2"):
        PMG().attach(backbone, 2, parse_options("pmg", {}))


def _steps(zero_grad: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("wrn", 4, "pmg", {"feature_size": 8, "zero_grad": zero_grad}, TINY)
    train = TrainSection(epochs=1, batch_size=4, schedule="constant", precision="fp32", lr=0.1,
                         weight_decay=5e-4, momentum=0.9)
    step = build_train_step(model, train, mixture=False, steps_per_epoch=1, method=get_method("pmg"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    random.seed(1)
    loss, correct = step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss) and 0 <= int(correct) <= 4
    return model, before, loss


def test_the_step_trains_every_head_and_in_place_zeroing_keeps_moving_earlier_heads() -> None:
    """Every head and the backbone move in one batch. With in-place zeroing (official) a head
    trained by step 1 keeps taking weight decay and momentum in steps 2-4; set to None it is
    skipped there, so the two settings differ."""
    zeroed, before, _ = _steps("zero")
    skipped, _, _ = _steps("none")
    for name in ("concat.1.weight", "heads.0.1.weight", "blocks.2.0.0.weight"):
        assert not torch.equal(dict(zeroed.named_parameters())[name], before[name])
    assert not torch.equal(dict(zeroed.named_parameters())["heads.0.1.weight"],
                           dict(skipped.named_parameters())["heads.0.1.weight"])


def test_evaluation_records_each_granularity_and_the_combined_prediction() -> None:
    method = get_method("pmg")
    model = build_model("wrn", 3, "pmg", {"feature_size": 8}, TINY).eval()
    with torch.no_grad():
        output = model(torch.randn(5, 3, 32, 32))
    labels = output.module_logits[0].argmax(1)
    counts = [float(c) for c in method.eval_counts(output, labels)]
    assert counts[0] == 5
    metrics = method.eval_metrics(counts, 5, model)
    assert metrics["top1_granularity"]["8"] == 100.0 and set(metrics["top1_granularity"]) == {"8", "4", "2"}
    combined = (output.logits + sum(output.module_logits)).argmax(1)
    assert metrics["top1_combined"] == 100.0 * float((combined == labels).sum()) / 5
