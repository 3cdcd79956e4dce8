"""Peers' training steps repeat bit for bit on several CPU threads (same seed, same thread count).

Two torch kernels did not: an indexing assignment with repeated rows (WS-DAN's official
``centres[labels] += step``, where which image of a repeated class lands was up to the kernel) and
the backward of advanced indexing (API-Net's ``pooled[anchors]``, whose repeated rows were summed in
a varying order). Both varied from run to run on two threads, so a seeded run did not repeat."""

from __future__ import annotations

import pytest
import torch

from finebench.methods import build_model, get_method
from finebench.train_settings import TrainSection
from finebench.train.step import build_train_step


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_official_centre_update_keeps_the_last_image_of_each_repeated_class(two_threads) -> None:
    model = build_model("wrn", 10, "ws_dan", {"attentions": 4}, {"depth": 10, "width": 1})
    width = model.centres.shape[1]
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (64,), generator=generator)
    pooled = torch.randn(64, width, generator=generator)
    start = torch.randn(10, width, generator=generator)
    expected = start.clone()
    beta = model.options.centre_beta
    targets = torch.nn.functional.normalize(start[labels], dim=-1)
    for index, label in enumerate(labels.tolist()):  # a serial loop: each later image overwrites
        expected[label] = start[label] + beta * (pooled[index] - targets[index])
    for _ in range(3):
        model.centres.copy_(start)
        model.update_centres(pooled, labels)
        assert torch.equal(model.centres, expected)


def _steps(kind: str, options: dict, labels_of: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model("timm:resnet10t", 10, kind, options)
    train = TrainSection(epochs=1, batch_size=32, lr=0.01, schedule="constant", precision="fp32", device="cpu",
                         optimizer="sgd")
    step = build_train_step(model, train, steps_per_epoch=10, method=get_method(kind))
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        images = torch.randn(32, 3, 64, 64, generator=generator)
        labels = (torch.arange(32) // 4) % 10 if labels_of == "classes of 4" else torch.randint(
            0, 10, (32,), generator=generator)
        step(images, labels)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(("kind", "options", "labels_of"), [
    ("ws_dan", {"attentions": 8}, "random"),
    ("cal", {"attentions": 8}, "random"),
    ("api_net", {"freeze_backbone_epochs": 0}, "classes of 4"),
    ("pim", {"selections": [64, 16, 8, 2], "fpn_size": 16, "image_size": 64}, "random"),
])
def test_four_training_steps_repeat_bit_for_bit_on_two_threads(two_threads, kind: str, options: dict,
                                                              labels_of: str) -> None:
    assert torch.equal(_steps(kind, options, labels_of), _steps(kind, options, labels_of))
