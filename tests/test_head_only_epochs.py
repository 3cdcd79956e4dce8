"""``train.head_only_epochs``: the first epochs train only the new layers (B-CNN's classifier stage).

The backbone must not move at all in those epochs, under weight decay and momentum too (a zeroed
gradient would still decay it), on the engine's own step and on a method's own step, and it must
train as usual after them."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from finebench.methods import build_model, get_method
from finebench.models.network import parameter_groups
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step

WRN = {"depth": 10, "width": 1}


def snapshot(parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in parameters]


def moved(before: list[torch.Tensor], parameters: list[torch.nn.Parameter]) -> list[bool]:
    return [not torch.equal(old, new.detach()) for old, new in zip(before, parameters, strict=True)]


def steps_per_epoch(variant: str, options: dict, head_only_epochs: int, epochs: list[int]) -> list[tuple[list[bool], list[bool]]]:
    """For each epoch in ``epochs``, one optimiser step: which backbone and head tensors it moved."""
    torch.manual_seed(0)
    model = build_model("wrn", 4, variant, options, WRN)
    train = TrainSection(epochs=max(epochs), batch_size=8, lr=0.1, schedule="constant", precision="fp32",
                         weight_decay=5e-2, device="cpu", threads=1, head_only_epochs=head_only_epochs)
    step = build_train_step(model, train, steps_per_epoch=1, method=get_method(variant))
    groups = parameter_groups(model)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    seen = []
    for epoch in epochs:
        backbone, head = snapshot(groups["backbone"]), snapshot(groups["head"])
        step.epoch = epoch
        step(images, labels)
        seen.append((moved(backbone, groups["backbone"]), moved(head, groups["head"])))
    return seen


@pytest.mark.parametrize(("variant", "options"), [("bcnn", {"reduce": 8}), ("ws_dan", {"attentions": 4})])
def test_the_backbone_stays_put_in_head_only_epochs_and_trains_after(variant: str, options: dict) -> None:
    """bcnn runs the engine's step, ws_dan its own (three passes): both leave the backbone bit for
    bit where it was in epochs 1-2, under weight decay and momentum, and move it from epoch 3."""
    seen = steps_per_epoch(variant, options, head_only_epochs=2, epochs=[1, 2, 3])
    for epoch, (backbone, head) in zip([1, 2], seen[:2], strict=True):
        assert not any(backbone), f"{variant}: the backbone moved in head-only epoch {epoch}"
        assert all(head), f"{variant}: a head tensor did not train in epoch {epoch}"
    backbone, head = seen[2]
    assert all(backbone) and all(head), f"{variant}: epoch 3 should train everything"


def test_without_head_only_epochs_the_backbone_trains_from_the_first_step() -> None:
    (backbone, head), = steps_per_epoch("bcnn", {"reduce": 8}, head_only_epochs=0, epochs=[1])
    assert all(backbone) and all(head)


def test_more_head_only_epochs_than_epochs_is_refused_naming_both() -> None:
    with pytest.raises(ValidationError, match=r"head_only_epochs \(5\) must be at most epochs \(4\)"):
        TrainSection(epochs=4, batch_size=8, schedule="constant", head_only_epochs=5)
    assert TrainSection(epochs=4, batch_size=8, schedule="constant", head_only_epochs=4).head_only_epochs == 4  # a linear probe
