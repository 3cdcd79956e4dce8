"""A method's own training step (``Method.train_step``) inside the engine's machinery.

``TwoPass`` is a test method in the shape WS-DAN, CAL and PMG take: two forward passes feed one
loss (the image and its mirror image), then one optimiser step. Its gradient is known in closed
form (the mean of the two passes' cross-entropy gradients), so the engine's gradient accumulation
and a 2-process Gloo DDP run must land on the same weights as one plain step on the whole batch.
The model has no BatchNorm, so micro-batches and shards change nothing but the summation order.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from gloo import on_two_workers
from torch import nn

from finebench.methods import (
    METHODS,
    Method,
    MethodOptions,
    StepContext,
    StepResult,
    register,
)
from finebench.methods.registry import get_method
from finebench.models.output import ModelOutput
from finebench.train_settings import TrainSection
from finebench.train.fit import fit
from finebench.train.step import TrainStep

CLASSES, BATCH, STEPS = 3, 16, 3


class TwoPassOptions(MethodOptions):
    kind: Literal["two_pass_test"]


class TwoPass(Method):
    """Cross-entropy averaged over the image and its horizontal mirror, one optimiser step."""

    kind = "two_pass_test"
    description = "test method: two forward passes, one loss"
    Options = TwoPassOptions
    train_passes_per_image = 2

    def __init__(self) -> None:
        self.forwards = 0

    def train_step(self, ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        ctx.zero_grad()
        total = torch.zeros((), device=labels.device)
        correct = torch.zeros((), device=labels.device, dtype=torch.long)
        for part in ctx.micro_batches(images, labels):
            plain = ctx.forward(part.images)  # another pass of this loss follows
            mirrored = ctx.forward(part.images.flip(3))
            self.forwards += 2
            loss = 0.5 * (F.cross_entropy(plain.logits.float(), part.labels)
                          + F.cross_entropy(mirrored.logits.float(), part.labels))
            ctx.backward(loss, part)
            total += loss.detach() * part.weight
            correct += (plain.logits.argmax(1) == part.labels).sum()
        ctx.optimizer_step()
        return StepResult(total, correct)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        logits = self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))
        return ModelOutput(F.log_softmax(logits, 1), logits)


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, 6, 6, generator=generator), torch.randint(0, CLASSES, (BATCH,), generator=generator))
            for _ in range(STEPS)]


def train(accumulation_steps: int = 1) -> TrainSection:
    return TrainSection(epochs=1, batch_size=BATCH, lr=0.1, schedule="constant", precision="fp32",
                        accumulation_steps=accumulation_steps)


def manual_reference(seed: int = 0) -> dict[str, torch.Tensor]:
    """Plain SGD-Nesterov steps on the whole batch's two-pass loss, written out by hand."""
    torch.manual_seed(seed)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for images, labels in batches():
        optimizer.zero_grad()
        loss = 0.5 * (F.cross_entropy(model(images).logits, labels) + F.cross_entropy(model(images.flip(3)).logits, labels))
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def engine_steps(accumulation_steps: int, model: nn.Module | None = None, shard: tuple[int, int] = (0, 1),
                 seed: int = 0) -> tuple[dict[str, torch.Tensor], TwoPass]:
    torch.manual_seed(seed)
    bare = Tiny()
    trained = bare if model is None else model(bare)
    optimizer = torch.optim.SGD(bare.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    method = TwoPass()
    step = TrainStep(trained, optimizer, None, torch.device("cpu"), accumulation_steps=accumulation_steps,
                     method=method)
    rank, world = shard
    for images, labels in batches():
        share = BATCH // world
        step(images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share])
    return {k: v.detach().clone() for k, v in bare.state_dict().items()}, method


def assert_same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_method_owning_its_step_is_called_instead_of_the_engines_step() -> None:
    weights, method = engine_steps(accumulation_steps=1)
    assert method.owns_train_step and not get_method("baseline").owns_train_step
    assert method.forwards == 2 * STEPS
    assert_same(weights, manual_reference())


def test_two_passes_under_gradient_accumulation_take_the_whole_batch_step() -> None:
    weights, method = engine_steps(accumulation_steps=2)
    assert method.forwards == 2 * 2 * STEPS  # two passes on each of two micro-batches
    assert_same(weights, manual_reference())


def _worker(rank: int) -> dict[str, torch.Tensor]:
    weights, _ = engine_steps(2, model=nn.parallel.DistributedDataParallel, shard=(rank, 2))
    return weights


def test_two_passes_with_accumulation_on_two_gloo_workers_match_one_process() -> None:
    results = on_two_workers(_worker)
    expected = manual_reference()
    for rank in (0, 1):
        assert_same(results[rank], expected)


def test_the_engines_fit_runs_a_method_step_and_records_its_epochs() -> None:
    torch.manual_seed(0)
    data = [(images, labels) for images, labels in batches()]
    method = TwoPass()
    result = fit(Tiny(), data, data[:1], train(accumulation_steps=2), method=method)
    assert result.status == "finished" and method.forwards == 2 * 2 * STEPS
    assert result.rows[0]["train_loss"] > 0 and result.rows[0]["test_top1"] is not None


def test_register_checks_the_kind_and_refuses_a_second_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("finebench.methods.registry.METHODS", dict(METHODS))
    method = register(TwoPass())
    assert get_method("two_pass_test") is method
    with pytest.raises(ValueError, match="registered twice"):
        register(TwoPass())


class OneClassFirst(torch.utils.data.Sampler[int]):
    """A method's batch order for the test: every image of class 0 first, then the rest, in order."""

    def __init__(self, labels, global_batch: int) -> None:
        order = sorted(range(len(labels)), key=lambda index: (int(labels[index]) != 0, index))
        self.order, self.local_batch = order, global_batch
        self.steps = -(-len(order) // global_batch)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.order)

    def indices(self) -> torch.Tensor:
        return torch.tensor(self.order)

    def __iter__(self):
        return iter(self.order)


class OwnSampler(TwoPass):
    def batch_sampler(self, options, labels, batch_size, *, seed, rank, world_size):  # noqa: ANN001, ANN201
        return OneClassFirst(labels, batch_size)


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_methods_batch_sampler_orders_the_training_batches_on_every_loader_path(tmp_path, in_memory: bool) -> None:
    from functools import partial

    from tiny_data import DATASET, prepare_tiny_bars

    from finebench.data.loader import build_loaders

    root = prepare_tiny_bars(tmp_path, 40, 8)
    method = OwnSampler()
    loaders = build_loaders(DATASET, root, batch_size=4, input_size=16, augmentation="none", in_memory=in_memory,
                            sampler_factory=partial(method.batch_sampler, TwoPassOptions(kind="two_pass_test")))
    assert loaders.path == ("in_memory" if in_memory else "workers")
    labels = torch.cat([batch_labels for _, batch_labels in loaders.train])
    zeros = int((labels == 0).sum())
    assert zeros >= 4 and (labels[:zeros] == 0).all()  # the method's order, not a shuffle
