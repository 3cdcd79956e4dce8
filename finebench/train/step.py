"""One training step on one batch, the same path for every method: the method's ``train_step``
(``finebench.methods.Method``; a method without a step of its own gets the base class's one-forward
step) run through ``EngineStepContext``, the engine's compile / precision / grad-scaler / clipping /
accumulation / DDP machinery; then the lr schedule steps once for the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finebench.methods.base import Method, MicroBatch
from finebench.models.network import drop_gradients, parameter_groups
from finebench.models.output import ModelOutput
from finebench.train.optim import build_optimizer, build_scheduler
from finebench.train.runtime import (
    autocast,
    compile_model,
    place_model,
    resolve_runtime,
    to_device,
)
from finebench.train_settings import TrainSection


@dataclass
class TrainStep:
    """One optimiser step on one batch; returns device tensors (loss, correct count), no host sync.

    Usable alone on in-memory batches (benchmarks): build it (``build_train_step``), then call it in a loop.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    device: torch.device
    method: Method
    """The run's method (``finebench.methods``): its ``train_step`` is the step, its loss and scores
    what the default step trains and counts."""
    precision: str = "fp32"
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    channels_last: bool = False
    compiled: bool = False
    """``model`` is ``torch.compile``d: the first step of each batch shape compiles (``compiling``)."""
    accumulation_steps: int = 1
    """Micro-batches per optimiser step (``train.accumulation_steps``)."""
    epoch: int = 1
    """The epoch being trained (``fit`` sets it; a method's own step may read it)."""
    head_only_epochs: int = 0
    """Epochs (from the first) whose optimiser steps leave the backbone alone (``train.head_only_epochs``)."""
    scaler: torch.amp.GradScaler = field(init=False)
    method_counts: torch.Tensor | None = field(init=False, default=None)
    """The method's ``StepResult.counts`` summed since ``take_method_counts`` last read them."""
    loss_term_sums: dict[str, torch.Tensor] = field(init=False, default_factory=dict)
    """The method's ``StepResult.terms`` summed over images since ``take_loss_terms`` last read them."""
    compiled_shapes: set[tuple[int, ...]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def compiling(self, images: torch.Tensor) -> bool:
        """Whether a step on ``images`` will compile a graph first (a shape this process has not run)."""
        return self.compiled and tuple(images.shape) not in self.compiled_shapes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The method's step on the device batch; then the lr schedule steps once for the batch."""
        shape = tuple(images.shape)
        images, labels = to_device(images, labels, self.device, self.channels_last)
        result = self.method.train_step(EngineStepContext(self), images, labels)
        if self.scheduler is not None:
            self.scheduler.step()
        if result.counts:
            counts = torch.stack([count.detach().double() for count in result.counts])
            self.method_counts = counts if self.method_counts is None else self.method_counts + counts
        for name, value in result.terms.items():  # means over the batch: summed over images
            value = value.detach().double() * len(labels)
            self.loss_term_sums[name] = self.loss_term_sums[name] + value if name in self.loss_term_sums else value
        if self.compiled:  # this shape's graphs exist now (``compiling`` reads it)
            self.compiled_shapes.add(shape)
        return result.loss.detach(), result.correct

    def apply_gradients(self) -> None:
        """Clip (unscaled) if asked, step the optimiser, update the grad scaler (no schedule step).
        Every method's step goes through here, so head-only epochs hold for every method; the
        backbone's gradients are computed and dropped rather than never made, which keeps DDP's
        gradient hooks and a compiled graph the same in both stages."""
        if self.epoch <= self.head_only_epochs:
            drop_gradients(parameter_groups(self.model)["backbone"])
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def take_method_counts(self) -> torch.Tensor | None:
        """The method's step counts summed since the last call (None if it records none), reset."""
        counts, self.method_counts = self.method_counts, None
        return counts

    def take_loss_terms(self) -> dict[str, torch.Tensor]:
        """The method's loss terms summed over images since the last call, reset."""
        sums, self.loss_term_sums = self.loss_term_sums, {}
        return sums


class EngineStepContext:
    """The engine's side of ``finebench.methods.StepContext``: a method's step runs on the
    engine's model (compiled, DDP-wrapped), precision, grad scaler, clipping and accumulation."""

    def __init__(self, step: TrainStep) -> None:
        self._step = step
        self.model = step.model
        self.optimizer = step.optimizer
        self.device = step.device
        self.precision = step.precision
        self.accumulation_steps = step.accumulation_steps
        self.epoch = step.epoch
        self.label_smoothing = step.label_smoothing
        self._no_sync = getattr(step.model, "no_sync", None)  # DDP only
        self._parts = 1

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def micro_batches(self, images: torch.Tensor, labels: torch.Tensor) -> Iterator[MicroBatch]:
        parts = [(x, y) for x, y in zip(images.tensor_split(self.accumulation_steps),
                                        labels.tensor_split(self.accumulation_steps), strict=True) if len(y)]
        self._parts = len(parts)
        for index, (part_images, part_labels) in enumerate(parts):
            last = index == len(parts) - 1
            part = MicroBatch(part_images, part_labels, len(part_labels) / len(labels), last)
            # the gradient all-reduce runs once, in the last part's backward
            with contextlib.nullcontext() if last or self._no_sync is None else self._no_sync():
                yield part

    def forward(self, images: torch.Tensor, **inputs: Any) -> ModelOutput:
        with self.autocast():
            return self.model(images, **inputs)

    def backward(self, loss: torch.Tensor, part: MicroBatch | None = None) -> None:
        if part is not None and self._parts > 1:
            loss = loss * part.weight
        self._step.scaler.scale(loss).backward()

    def zero_grad(self, *, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def optimizer_step(self) -> None:
        self._step.apply_gradients()


def build_train_step(model: nn.Module, train: TrainSection, *, method: Method, steps_per_epoch: int) -> TrainStep:
    """A ready ``TrainStep`` (device, precision, optimiser, schedule) for benchmarks on in-memory batches."""
    runtime = resolve_runtime(train, attention=method.mixture)
    model.train()
    place_model(model, train, runtime)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, steps_per_epoch)
    return make_train_step(compile_model(model) if runtime.compiled else model, optimizer, scheduler, train,
                           runtime.device, runtime.precision, method=method, compiled=runtime.compiled,
                           channels_last=runtime.channels_last)


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, train: TrainSection,
                    device: torch.device, precision: str, *, method: Method, compiled: bool,
                    channels_last: bool) -> TrainStep:
    """The one place a ``TrainStep`` takes its settings from ``train`` (``fit`` and ``build_train_step``)."""
    return TrainStep(
        model, optimizer, scheduler, device, method, precision, train.label_smoothing, train.grad_clip,
        channels_last, compiled, accumulation_steps=train.accumulation_steps, head_only_epochs=train.head_only_epochs,
    )
