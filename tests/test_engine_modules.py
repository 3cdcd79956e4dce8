"""The engine's shape (issue 30): small modules under finebench/train/ that take plain settings, not
the recipe, the run records or the console; one step path, whose default is the baseline method's
``train_step``; and one train settings type that the recipe, the methods and the engine share."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import finebench.methods.base as method_base
import finebench.train
from finebench.methods import Method, get_method
from finebench.models.output import ModelOutput
from finebench.recipe import Recipe
from finebench.train.step import TrainStep
from finebench.train_settings import TrainSection

TRAIN = Path(finebench.train.__file__).parent
ENGINE_MODULES = sorted(path.stem for path in TRAIN.glob("*.py"))
"""Every module of the engine: runtime, rng, step, evaluate, progress, fit, optim, threads, distributed, events."""
ABOVE_THE_ENGINE = ("finebench.recipe", "finebench.results", "finebench.console", "finebench.terminal")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("name", ENGINE_MODULES)
def test_engine_modules_take_plain_settings_not_the_recipe_records_or_console(name: str) -> None:
    path = TRAIN / f"{name}.py"
    assert not imported_modules(path) & set(ABOVE_THE_ENGINE), path
    assert len(path.read_text(encoding="utf-8").splitlines()) < 500, path


def test_the_methods_recipe_and_engine_share_the_one_train_settings_type() -> None:
    assert method_base.TrainSection is TrainSection  # no longer a stand-in (Any)
    assert Recipe.model_fields["train"].annotation is TrainSection
    with pytest.raises(ValueError, match="milestones"):  # the validators moved with it
        TrainSection(epochs=2, batch_size=4, schedule="multistep")


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        logits = self.fc(images)
        return ModelOutput(logits.log_softmax(1), logits)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(3)]


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_the_default_step_is_the_baseline_methods_train_step_and_a_plain_loop_bit_for_bit(accumulation_steps: int) -> None:
    """A float64 model: the engine's step (the baseline's ``train_step`` through the step context)
    and a hand-written PyTorch loop take the same steps exactly (for two micro-batches the loop
    weights each half's mean loss by its share, which is the same sum in the same order)."""
    torch.manual_seed(0)
    engine_model, loop_model = Linear().double(), Linear().double()
    loop_model.load_state_dict(engine_model.state_dict())
    method = get_method("baseline")
    assert not method.owns_train_step and type(method).train_step is Method.train_step
    step = TrainStep(engine_model, torch.optim.SGD(engine_model.parameters(), lr=0.1, momentum=0.9), None,
                     torch.device("cpu"), method, accumulation_steps=accumulation_steps)
    optimizer = torch.optim.SGD(loop_model.parameters(), lr=0.1, momentum=0.9)
    for images, labels in batches():
        loss, correct = step(images, labels)
        optimizer.zero_grad()
        expected_loss = torch.zeros(())  # float32, as the step sums its parts (Method.loss is float32)
        expected_correct = 0
        for part_images, part_labels in zip(images.tensor_split(accumulation_steps),
                                            labels.tensor_split(accumulation_steps), strict=True):
            logits = loop_model(part_images).logits
            part_loss = F.cross_entropy(logits.float(), part_labels)
            weighted = part_loss * (len(part_labels) / len(labels)) if accumulation_steps > 1 else part_loss
            weighted.backward()
            expected_loss += weighted.detach()
            expected_correct += int((logits.argmax(1) == part_labels).sum())
        optimizer.step()
        assert float(loss) == float(expected_loss) and int(correct) == expected_correct
    for (name, found), expected in zip(engine_model.state_dict().items(), loop_model.state_dict().values(), strict=True):
        assert torch.equal(found, expected), name


def test_a_methods_loss_hook_decides_the_default_step_without_a_mixture_flag() -> None:
    """The caller passes the method alone: its ``loss`` is what the default step trains on."""

    class Halved(Method):
        kind = "halved_test_only"

        def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
            return 0.5 * super().loss(output, labels, label_smoothing=label_smoothing)

    images, labels = batches()[0]
    losses = []
    for method in (get_method("baseline"), Halved()):
        torch.manual_seed(0)
        model = Linear().double()
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), None, torch.device("cpu"), method)
        losses.append(float(step(images, labels)[0]))
    assert losses[1] == 0.5 * losses[0]  # float64 halving is exact


def test_the_default_step_returns_a_whole_batchs_loss_in_the_dtype_the_method_made_it() -> None:
    """IELT's loss is float64 (its complement weight is); the logged ``train_loss`` of a whole-batch
    step keeps it unrounded, as the engine did before the step became the method's."""

    class InDouble(Method):
        kind = "in_double_test_only"

        def loss(self, output: ModelOutput, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
            return F.cross_entropy(output.logits, labels)  # float64 logits: a float64 loss

    images, labels = batches()[0]
    torch.manual_seed(0)
    model = Linear().double()
    expected = F.cross_entropy(model(images).logits, labels).detach()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), None, torch.device("cpu"), InDouble())
    loss, _ = step(images, labels)
    assert loss.dtype == torch.float64 and torch.equal(loss, expected)
