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
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step

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
    step = build_train_step(model, train, steps_per_epoch=1, method=get_method("pmg"))
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


HEADS_GOLDEN = Path(__file__).parent / "data" / "golden" / "pmg_heads" / "golden.safetensors"
WIDTHS = ((512, 56), (1024, 28), (2048, 14))


class FixedMaps(torch.nn.Module):
    """A trunk returning fixed ResNet-50-wide maps at 448 px (the golden script's ``Fixed``)."""

    def __init__(self) -> None:
        super().__init__()
        from finebench.models.base import Backbone, TapPoint

        self.maps = [torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(20 + i)).clamp_min(0)
                     for i, (c, s) in enumerate(WIDTHS)]

        class Trunk(Backbone):
            tap_points = tuple(TapPoint(f"layer{i + 2}", c, 448 // s, "fixed") for i, (c, s) in enumerate(WIDTHS))
            out_channels = 2048
            attention_candidates = ()

            def forward(trunk, x, taps=(), stop_after_taps=False):  # noqa: ANN001, ANN202, N805
                return None, {tap: self.maps[int(tap[-1]) - 2] for tap in taps}

        self.trunk = Trunk()


def _official_order(names: list[str]) -> list[str]:
    """finebench's state-dict names in the official state dict's order (concat head first, then
    conv_block1, classifier1, conv_block2, ...), so the seeded fill gives both the same weights."""
    groups = ["concat."] + [prefix for i in range(3) for prefix in (f"blocks.{i}.", f"heads.{i}.")]
    return [name for prefix in groups for name in names if name.startswith(prefix)]


def _official_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "concat":
        return "classifier_concat." + ".".join(parts[1:])
    if parts[0] == "heads":
        return f"classifier{int(parts[1]) + 1}." + ".".join(parts[2:])
    layer = "conv" if parts[3] == "0" else "bn"
    return f"conv_block{int(parts[1]) + 1}.{parts[2]}.{layer}." + ".".join(parts[4:])


@pytest.mark.slow
def test_the_heads_and_one_four_step_batch_equal_the_official_pmg() -> None:
    from finebench.methods.pmg import PMGClassifier

    golden = load_file(HEADS_GOLDEN)
    model = PMGClassifier(FixedMaps().trunk, 200, parse_options("pmg", {}))
    state = model.state_dict()
    with torch.no_grad():  # tools/golden/pmg_heads.py's fill rule, in the official order
        for index, name in enumerate(_official_order(list(state))):
            tensor = state[name]
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(100 + index))
            if name.endswith("running_var"):
                values = torch.ones_like(values)
            elif tensor.dim() > 1:
                values = values / tensor[0].numel() ** 0.5
            elif name.endswith("weight"):
                values = 1 + 0.1 * values
            else:
                values = 0.1 * values
            tensor.copy_(values)
    images, labels = torch.zeros(2, 3, 448, 448), golden["labels"]
    close = {"rtol": 1e-4, "atol": 1e-5}
    first = model.train()(images)
    for index, logits in enumerate((*first.module_logits, first.logits)):
        torch.testing.assert_close(logits.detach(), golden[f"train_{index}"], **close)
    train = TrainSection(epochs=1, batch_size=2, schedule="constant", precision="fp32", optimizer="sgd", lr=0.002,
                         momentum=0.9, weight_decay=5e-4, channels_last=False)
    step = build_train_step(model, train, steps_per_epoch=1, method=get_method("pmg"))
    loss, _ = step(images, labels)
    torch.testing.assert_close(loss, golden["losses"].sum(), **close)
    state = model.state_dict()
    for key in (k for k in golden if k.startswith("after.")):
        name = next(n for n in state if _official_name(n) == key.removeprefix("after."))
        torch.testing.assert_close(state[name].flatten()[:4096], golden[key], **close, msg=name)
    model.eval()
    with torch.no_grad():
        tested = model(images)
    for index, logits in enumerate((*tested.module_logits, tested.logits)):
        torch.testing.assert_close(logits, golden[f"eval_{index}"], **close)


def test_the_dry_run_names_an_input_size_the_jigsaw_cannot_cut(tmp_path: Path) -> None:
    """The dry run's cost estimate is a forward at the recipe's input size: PMG's forward checks it."""
    model = build_model("wrn", 3, "pmg", {"feature_size": 8}, TINY).eval()
    with pytest.raises(FinebenchError, match=r"^variant 'pmg': input_size 36x36 does not split into its 8x8 jigsaw; "
                                             r"expected a multiple of 8 \(e.g. 40, or 448 as the paper\)$"):
        model(torch.zeros(1, 3, 36, 36))
    from finebench.profile import profile_variants

    with pytest.raises(FinebenchError, match="input_size 36x36"):
        profile_variants("wrn", 3, 36, [("pmg", "pmg", {"feature_size": 8})], TINY)
