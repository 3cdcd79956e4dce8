"""Training engine: one readable ``fit`` plus the small helpers it calls.

Speed rules (the engine is benchmarked against a plain PyTorch loop): no host sync inside a step
(loss and accuracy accumulate on the device; the losses are checked for NaN once per ``log_every``
steps and the progress display reads the running loss about once a second, ``DISPLAY_EVERY_S``),
non-blocking copies, ``zero_grad(set_to_none=True)``. Resume rule: a checkpoint at the end of
every epoch holds the model, optimiser, scheduler, grad scaler, every RNG state (python, numpy,
torch, CUDA, the loader's shuffling generator) and the epoch, so a resumed run repeats the
uninterrupted one exactly on CPU in fp32. Distributed seam: ``fit`` takes a ``DistContext``;
only rank 0 writes, and ``reduce_sum`` is where counts are summed across ranks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finebench.console import make_console
from finebench.errors import FinebenchError
from finebench.methods.base import Method, MicroBatch
from finebench.models.batchnorm import convert_ghost_batchnorm
from finebench.models.network import drop_gradients, parameter_groups
from finebench.models.output import ModelOutput, mixture_loss
from finebench.predictions import SHOWN_PREDICTION, TOP_K, PerImagePredictions
from finebench.recipe import TrainSection
from finebench.results import MACHINE_FIELDS
from finebench.train.optim import build_optimizer, build_scheduler
from finebench.train.threads import (
    ThreadChoice,
    choose_threads,
    decided_each_epoch,
    load_average,
)

# ---- device, precision, seeds -----------------------------------------------------------------


@dataclass
class DistContext:
    """Where this process stands in a (possibly) distributed run; one process by default.

    ``finebench.train.distributed`` provides a subclass whose ``wrap`` applies DDP and whose
    ``reduce_sum``/``broadcast``/``gather``/``barrier`` are collectives; here they are no-ops.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s decision on every rank (the runner's skip/resume/lock choice)."""
        return value

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` in rank order (each rank's RNG state for the checkpoint)."""
        return [value]

    def barrier(self) -> None:
        pass


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinebenchError(f"train.device = {spec!r}: CUDA is not available on this machine")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware runs it natively, else fp32 (fp16 only when asked)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


def resolve_compile(setting: bool | str, device: torch.device, *, attention: bool = False) -> bool:
    """``auto``: compile plain backbones on CUDA; Attend and Rectify and every CPU run stay eager.

    Why, in short: on CUDA compiling a plain backbone pays within the first epoch, while with
    today's A&R module the compiled step was not faster than eager; on CPU the step is bound by
    oneDNN's convolutions, which Inductor calls as they are, so compiling pays back only after more
    steps than the CPU runs this tool is used for. Triton is what Inductor generates CUDA kernels
    with; without it "auto" stays eager too. The figures: benchmarks/README.md, "Decisions".
    """
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and not attention and importlib.util.find_spec("triton") is not None


def resolve_channels_last(setting: bool | str, device: torch.device, *, compiled: bool, attention: bool) -> bool:
    """``auto``: the memory format measured faster in the same case (benchmarks/README.md, "Decisions").
    ``compiled`` and ``attention`` name the case: today every measured case on CUDA and CPU agrees
    on channels_last (on CPU only tiny models at tiny batches went the other way, within noise).
    """
    if setting != "auto":
        return bool(setting)
    return device.type in ("cuda", "cpu")


@dataclass(frozen=True)
class Runtime:
    """Where and how a run's steps execute, resolved once from its ``train`` settings (``resolve_runtime``)
    and passed on, so the runner, ``fit`` and the benchmarks' step agree and the run records what ran."""

    device: torch.device
    precision: str
    """fp32, bf16 or fp16: ``train.precision`` with "auto" decided for this device."""
    compiled: bool
    channels_last: bool
    threads: ThreadChoice | None = None
    """The intra-op thread count and why; None leaves torch's count as it is (``train.threads = "auto"``
    is chosen by the runner, which knows whether the run resumes)."""
    threads_each_epoch: bool = False
    """Decide the count again at every epoch after the first (``train.threads = "auto"``)."""
    workers_here: int = 1
    """Processes of the run on this machine, which share its idle cores."""


def resolve_runtime(train: TrainSection, *, attention: bool, threads: ThreadChoice | None = None,
                    workers_here: int = 1) -> Runtime:
    """``train``'s "auto" settings decided for this machine; ``attention`` names the case (Attend and Rectify)."""
    device = resolve_device(train.device)
    precision = resolve_precision(train.precision, device)
    compiled = resolve_compile(train.compile, device, attention=attention)
    channels_last = resolve_channels_last(train.channels_last, device, compiled=compiled, attention=attention)
    if threads is None and isinstance(train.threads, int):
        threads = ThreadChoice(train.threads, "train.threads")
    return Runtime(device, precision, compiled, channels_last, threads,
                   threads_each_epoch=threads is not None and decided_each_epoch(train.threads),
                   workers_here=workers_here)


def configure_backends(device: torch.device) -> None:
    """What every training step on ``device`` runs with; ``fit`` and ``finebench bench`` share it."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(loader: Any = None) -> dict[str, Any]:
    """Every RNG a training epoch draws from, as plain tensors/containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    generator = getattr(loader, "generator", None)
    if generator is not None:
        state["loader"] = generator.get_state()
    # Augmentation generators living on the dataset (in-process when workers=0); JSON because
    # PCG64 states are 128-bit integers.
    state["dataset"] = {name: json.dumps(g.bit_generator.state) for name, g in _dataset_generators(loader).items()}
    return state


def _dataset_generators(loader: Any) -> dict[str, np.random.Generator]:
    """numpy generators held by the loader or the datasets it wraps (``Subset`` chains included)."""
    holder, found, depth = loader, {}, 0
    while holder is not None and depth < 8:
        for name, value in getattr(holder, "__dict__", {}).items():
            if isinstance(value, np.random.Generator):
                found[f"{depth}.{name}"] = value
        holder, depth = getattr(holder, "dataset", None), depth + 1
    return found


def restore_rng_state(state: Mapping[str, Any], loader: Any = None) -> None:
    version, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate(_as_tuples(state["python"]))
    np.random.set_state((version, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(loader, "generator", None)
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])
    for name, rng in _dataset_generators(loader).items():
        if name in state.get("dataset", {}):
            rng.bit_generator.state = json.loads(state["dataset"][name])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---- loss and one training step ---------------------------------------------------------------


def training_loss(output: ModelOutput, labels: torch.Tensor, *, mixture: bool, label_smoothing: float = 0.0) -> torch.Tensor:
    """NLL on the mixed log-probabilities plus the regulariser (Attend and Rectify), else cross-entropy."""
    if not mixture:
        return F.cross_entropy(output.logits.float(), labels, label_smoothing=label_smoothing)
    return mixture_loss(output, labels, label_smoothing=label_smoothing)


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


@dataclass
class TrainStep:
    """One optimiser step on one batch; returns device tensors (loss, correct count), no host sync.

    Usable alone on in-memory batches (benchmarks): build it, then call it in a loop.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    device: torch.device
    precision: str = "fp32"
    mixture: bool = False
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    channels_last: bool = False
    compiled: bool = False
    """``model`` is ``torch.compile``d: the first step of each batch shape compiles (``compiling``)."""
    accumulation_steps: int = 1
    """Micro-batches per optimiser step (``train.accumulation_steps``)."""
    method: Method | None = None
    """The run's method (``finebench.methods``): its loss and scores; and, when it owns its training
    step (``Method.owns_train_step``), the whole step, run through ``EngineStepContext``."""
    epoch: int = 1
    """The epoch being trained (``fit`` sets it; a method's own step may read it)."""
    head_only_epochs: int = 0
    """Epochs (from the first) whose optimiser steps leave the backbone alone (``train.head_only_epochs``)."""
    scaler: torch.amp.GradScaler = field(init=False)
    method_counts: torch.Tensor | None = field(init=False, default=None)
    """The method's ``StepResult.counts`` summed since ``take_method_counts`` last read them."""
    loss_term_sums: dict[str, torch.Tensor] = field(init=False, default_factory=dict)
    """The method's ``loss_terms`` summed over images since ``take_loss_terms`` last read them."""
    compiled_shapes: set[tuple[int, ...]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def compiling(self, images: torch.Tensor) -> bool:
        """Whether a step on ``images`` will compile a graph first (a shape this process has not run)."""
        return self.compiled and tuple(images.shape) not in self.compiled_shapes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method is not None and self.method.owns_train_step:
            step = self._method_step
        else:
            step = self._accumulated_step if self.accumulation_steps > 1 else self._whole_batch_step
        loss, correct = step(images, labels)
        if self.compiled:  # either path: this shape's graphs exist now (``compiling`` reads it)
            self.compiled_shapes.add(tuple(images.shape))
        return loss, correct

    def _whole_batch_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = _to_device(images, labels, self.device, self.channels_last)
        with autocast(self.device, self.precision):
            output = self.model(images)
            loss = self.loss(output, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._optimizer_step()
        correct = (self.scores(output).argmax(dim=1) == labels).sum()
        if self.method is not None:
            self.add_loss_terms(self.method.loss_terms(output, labels), len(labels))
        return loss.detach(), correct

    def loss(self, output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
        if self.method is not None:
            return self.method.loss(output, labels, label_smoothing=self.label_smoothing)
        return training_loss(output, labels, mixture=self.mixture, label_smoothing=self.label_smoothing)

    def scores(self, output: ModelOutput) -> torch.Tensor:
        if self.method is not None:
            return self.method.scores(output)
        return output.log_probs if self.mixture else output.logits

    def _optimizer_step(self) -> None:
        """Apply the gradients ``backward`` left: clip (unscaled) if asked, step, update the scaler, schedule."""
        self.apply_gradients()
        if self.scheduler is not None:
            self.scheduler.step()

    def apply_gradients(self) -> None:
        """Clip (unscaled) if asked, step the optimiser, update the grad scaler (no schedule step).
        Every step goes through here (the engine's and a method's own), so head-only epochs hold for
        every method; the backbone's gradients are computed and dropped rather than never made, which
        keeps DDP's gradient hooks and a compiled graph the same in both stages."""
        if self.epoch <= self.head_only_epochs:
            drop_gradients(parameter_groups(self.model)["backbone"])
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _method_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The method's own step on the device batch; then the lr schedule steps once for the batch."""
        assert self.method is not None
        images, labels = _to_device(images, labels, self.device, self.channels_last)
        result = self.method.train_step(EngineStepContext(self), images, labels)
        if self.scheduler is not None:
            self.scheduler.step()
        if result.counts:
            counts = torch.stack([count.detach().double() for count in result.counts])
            self.method_counts = counts if self.method_counts is None else self.method_counts + counts
        self.add_loss_terms(result.terms, len(labels))
        return result.loss.detach(), result.correct

    def add_loss_terms(self, terms: Mapping[str, torch.Tensor], images: int) -> None:
        """Add a pass's ``Method.loss_terms`` (means over ``images`` images) to the epoch's sums."""
        for name, value in terms.items():
            value = value.detach().double() * images
            self.loss_term_sums[name] = self.loss_term_sums[name] + value if name in self.loss_term_sums else value

    def take_loss_terms(self) -> dict[str, torch.Tensor]:
        """The loss terms summed over images since the last call, reset."""
        sums, self.loss_term_sums = self.loss_term_sums, {}
        return sums

    def take_method_counts(self) -> torch.Tensor | None:
        """The method's step counts summed since the last call (None if it records none), reset."""
        counts, self.method_counts = self.method_counts, None
        return counts

    def _accumulated_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step over ``accumulation_steps`` micro-batches of this batch.

        Each part's loss is weighted by its share of the batch, so the summed gradient is the
        whole batch's mean-loss gradient (only BatchNorm, seeing the parts, differs). Under DDP
        the gradient all-reduce runs once, on the last part (``no_sync`` before it).
        """
        images, labels = _to_device(images, labels, self.device, self.channels_last)
        parts = [(x, y) for x, y in zip(images.tensor_split(self.accumulation_steps),
                                        labels.tensor_split(self.accumulation_steps), strict=True) if len(y)]
        no_sync = getattr(self.model, "no_sync", None)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=labels.device)
        correct = torch.zeros((), device=labels.device, dtype=torch.long)
        for index, (part_images, part_labels) in enumerate(parts):
            last = index == len(parts) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with autocast(self.device, self.precision):
                    output = self.model(part_images)
                    loss = self.loss(output, part_labels) * (len(part_labels) / len(labels))
                self.scaler.scale(loss).backward()
            total_loss += loss.detach().float()
            correct += (self.scores(output).argmax(dim=1) == part_labels).sum()
            if self.method is not None:
                self.add_loss_terms(self.method.loss_terms(output, part_labels), len(part_labels))
        self._optimizer_step()
        return total_loss, correct


class EngineStepContext:
    """The engine's side of ``finebench.methods.StepContext``: a method's own step runs on the
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


# ---- evaluation --------------------------------------------------------------------------------


def tap_names(model: nn.Module, count: int) -> list[str]:
    taps = list(getattr(model, "attention_taps", []) or [])
    return taps if len(taps) == count else [f"module{i}" for i in range(count)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    precision: str = "fp32",
    mixture: bool = False,
    channels_last: bool = False,
    ctx: DistContext | None = None,
    confusion: bool = False,
    method: Method | None = None,
    per_image: bool = False,
) -> dict[str, Any]:
    """Loss, top-1, top-5 and, for attention models, the network's and each module's own top-1.

    ``confusion``: also the N×N confusion matrix (rows: true class, columns: top-1 prediction),
    summed over ranks like the other counts, so per-class figures are exact under DDP too.
    ``per_image``: also ``per_image``, each image's top classes for every prediction the model makes
    (``PerImagePredictions``), read off the outputs this evaluation computes anyway.
    """
    ctx = ctx or DistContext()
    model.eval()
    totals: torch.Tensor | None = None
    matrix: torch.Tensor | None = None
    module_count = 0
    collected: list[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with autocast(device, precision):
            output = method.predict(model, images) if method is not None else model(images)
        if method is not None:
            scores = method.scores(output).float()
            loss = method.loss(output._replace(reg_loss=None), labels) * labels.numel()
        else:
            scores = (output.log_probs if mixture else output.logits).float()
            loss = training_loss(output._replace(reg_loss=None), labels, mixture=mixture) * labels.numel()
        top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
        row = [
            labels.new_tensor(labels.numel(), dtype=torch.float64),
            loss.double(),
            (top5[:, 0] == labels).sum().double(),
            (top5 == labels[:, None]).any(dim=1).sum().double(),
        ]
        if mixture:
            module_count = len(output.module_logits)
            row.append((output.logits.argmax(dim=1) == labels).sum().double())
            row.extend((m.argmax(dim=1) == labels).sum().double() for m in output.module_logits)
        if method is not None:
            row.extend(count.double() for count in method.eval_counts(output, labels))
        batch = torch.stack(row)
        totals = batch if totals is None else totals + batch
        if confusion:
            classes = scores.shape[1]
            counts = torch.bincount(labels * classes + top5[:, 0], minlength=classes * classes)
            matrix = counts if matrix is None else matrix + counts
        if per_image:
            unwrapped = getattr(model, "module", model)
            modules = tap_names(getattr(unwrapped, "_orig_mod", unwrapped), module_count) if mixture else []
            collected.append((labels, _top_classes(scores, top5, output, method, modules)))
    if totals is None:
        raise FinebenchError("the test split is empty: nothing to evaluate")
    values = ctx.reduce_sum(totals).tolist()
    count = values[0]
    result: dict[str, Any] = {
        "test_loss": values[1] / count,
        "test_top1": 100.0 * values[2] / count,
        "test_top5": 100.0 * values[3] / count,
        "network_top1": None,
        "module_top1": {},
    }
    if mixture:
        unwrapped = getattr(model, "module", model)
        result["network_top1"] = 100.0 * values[4] / count
        names = tap_names(getattr(unwrapped, "_orig_mod", unwrapped), module_count)
        result["module_top1"] = {name: 100.0 * v / count for name, v in zip(names, values[5:5 + module_count])}
    if method is not None:
        result.update(method.eval_metrics(values[4 + (1 + module_count if mixture else 0):], count, model))
    if matrix is not None:
        classes = math.isqrt(matrix.numel())
        result["confusion"] = ctx.reduce_sum(matrix.double()).view(classes, classes).long().tolist()
    if per_image:
        result["per_image"] = _gather_per_image(collected, ctx)
    return result


def _top_classes(scores: torch.Tensor, top5: torch.Tensor, output: ModelOutput, method: Method | None,
                 module_names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One batch's top classes and their softmax probabilities per prediction, left on the device
    (no host sync per batch). The shown prediction keeps the evaluator's own ``top5``, so its first
    class is the top-1 the metrics counted; the others (A&R's network and modules, named as
    summary.json's ``network_top1`` and ``module_top1`` entries, and the method's ``prediction_logits``)
    take their own top-k."""
    def top(values: torch.Tensor, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        values = values.float()
        if indices is None:
            indices = values.topk(min(TOP_K, values.shape[1]), dim=1).indices
        return indices, torch.softmax(values, dim=1).gather(1, indices)

    found = {SHOWN_PREDICTION: top(scores, top5)}
    if module_names:
        found["network_top1"] = top(output.logits)
        found.update((f"module_top1.{name}", top(logits))
                     for name, logits in zip(module_names, output.module_logits, strict=True))
    if method is not None:
        found.update((name, top(logits)) for name, logits in method.prediction_logits(output).items())
    return found


def _gather_per_image(collected: list[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]],
                      ctx: DistContext) -> PerImagePredictions:
    """Every rank's batches as one ``PerImagePredictions`` in id order. The test loaders shard as
    ``range(rank, N, world_size)`` in store order (``finebench.data.loader``), which is what gives
    each image its id here."""
    names = list(collected[0][1])
    labels = torch.cat([batch_labels for batch_labels, _ in collected]).cpu().numpy()
    classes = [torch.cat([found[name][0] for _, found in collected]).cpu().numpy() for name in names]
    probs = [torch.cat([found[name][1] for _, found in collected]).cpu().numpy() for name in names]
    parts = ctx.gather((labels, classes, probs)) if ctx.world_size > 1 else [(labels, classes, probs)]
    ids = np.concatenate([rank + ctx.world_size * np.arange(len(part[0])) for rank, part in enumerate(parts)])
    order = np.argsort(ids, kind="stable")

    def joined(field: int, index: int) -> np.ndarray:
        return np.concatenate([part[field][index] for part in parts])[order]

    return PerImagePredictions(
        ids[order].astype(np.int64), np.concatenate([part[0] for part in parts])[order].astype(np.int64),
        {name: joined(1, i).astype(np.int64) for i, name in enumerate(names)},
        {name: joined(2, i).astype(np.float32) for i, name in enumerate(names)},
    )


# ---- progress -----------------------------------------------------------------------------------

DISPLAY_EVERY_S = 1.0
"""Seconds between progress updates (steps done, img/s, loss): by time, not steps, so a method with
long steps (PMG's four passes per batch) moves its bar after its first step, and fast steps do not
read the device more than once a second."""


class Progress(Protocol):
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def update(self, steps_done: int, *, images_per_s: float, loss: float, lr: float) -> None: ...
    def end_epoch(self, row: Mapping[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class SilentProgress:
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def update(self, steps_done: int, *, images_per_s: float, loss: float, lr: float) -> None:
        pass

    def end_epoch(self, row: Mapping[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def epoch_line(label: str, row: Mapping[str, Any]) -> str:
    """The line printed when an epoch ends (its metrics row), here and in the ``--jobs`` view."""
    line = f"{label} epoch {row['epoch']}: train loss {row['train_loss']:.4f}"
    if row.get("test_top1") is not None:
        line += f"  test loss {row['test_loss']:.4f}  top-1 {row['test_top1']:.2f}  top-5 {row['test_top5']:.2f}"
    if row.get("network_top1") is not None:
        line += f"  network {row['network_top1']:.2f}"
    line += f"  {row['images_per_s']:,.0f} img/s  {row['epoch_time_s']:.1f}s"
    return line


class RichProgress:
    """A transient bar per epoch (images/s, loss, lr, ETA) and one printed line per finished epoch."""

    def __init__(self, label: str, console: Any = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.label = label
        self.console = console or make_console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._task: Any = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self._task is None:
            self._progress.start()
        else:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(f"{self.label} epoch {epoch}/{epochs}", total=steps, stats="")

    def update(self, steps_done: int, *, images_per_s: float, loss: float, lr: float) -> None:
        stats = f"{images_per_s:,.0f} img/s  loss {loss:.4f}  lr {lr:.3g}"
        self._progress.update(self._task, completed=steps_done, stats=stats)

    def end_epoch(self, row: Mapping[str, Any]) -> None:
        self._progress.console.print(epoch_line(self.label, row), highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self._progress.console.print(text, highlight=False)

    def close(self) -> None:
        self._progress.stop()


# ---- fit ------------------------------------------------------------------------------------------


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the run cannot continue."""


@dataclass
class FitResult:
    status: str
    """``finished`` or ``failed``."""
    failure_reason: str | None
    rows: list[dict[str, Any]]
    epochs_completed: int
    train_time_s: float
    images_per_s: float
    """Training images per second, steps that compiled a graph left out (``compile_time_s``)."""
    precision: str
    device: torch.device
    confusion: list[list[int]] | None = None
    """Confusion matrix of the final evaluation (rows: true class); None when it did not run."""
    compiled: bool = False
    channels_last: bool = False
    compile_time_s: float = 0.0
    """Wall time of the training steps that compiled (the first of each batch shape per process)."""
    selected: dict[str, Any] | None = None
    """``train.select = "best_validation"``: the selected epoch, its validation top-1 and the test
    evaluation of its weights (``best.pt``); None for ``"last"``."""
    selected_confusion: list[list[int]] | None = None
    """The confusion matrix of that evaluation (``confusion`` stays the last epoch's)."""
    predictions: PerImagePredictions | None = None
    """Per-image predictions of the final evaluation (collected on every rank); None when it did not run."""


class RunStore(Protocol):
    """What ``fit`` needs from a run folder (``finebench.results.RunDir`` provides it)."""

    def read_metrics(self) -> list[dict[str, Any]]: ...
    def write_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None: ...
    def save_checkpoint(self, state: Mapping[str, Any]) -> None: ...
    def load_checkpoint(self) -> dict[str, Any] | None: ...
    # ``train.select = "best_validation"`` only:
    def save_best(self, state: Mapping[str, Any]) -> None: ...
    def load_best(self) -> dict[str, Any] | None: ...


def _check_finite(losses: list[torch.Tensor], epoch: int, first_step: int, ctx: DistContext) -> None:
    """One host read for a whole log interval; names the first bad step when there is one.

    The count of bad losses is summed over ranks so that every rank stops at the same step.
    """
    if not losses:
        return
    stacked = torch.stack(losses)
    finite = torch.isfinite(stacked)
    if ctx.reduce_sum((~finite).sum().double()).item() == 0:
        return
    if bool(finite.all()):
        raise NonFiniteLoss(f"loss became non-finite on another rank at epoch {epoch} near step {first_step}")
    index = int((~finite).nonzero()[0, 0])
    value = stacked[index].item()
    raise NonFiniteLoss(f"loss became {value} at epoch {epoch} step {first_step + index}")


def _train_epoch(
    step: TrainStep, loader: Iterable, epoch: int, epochs: int, log_every: int, progress: Progress, ctx: DistContext
):
    steps = len(loader)  # type: ignore[arg-type]
    progress.start_epoch(epoch, epochs, steps)
    loss_sum = torch.zeros((), device=step.device, dtype=torch.float64)
    correct_sum = torch.zeros((), device=step.device, dtype=torch.float64)
    seen = 0
    pending: list[torch.Tensor] = []
    compile_s, compile_images = 0.0, 0
    start = time.perf_counter()
    shown = start
    for index, (images, labels) in enumerate(loader):
        if step.compiling(images):  # timed apart: compile time is not training throughput
            synchronize_device(step.device)
            compile_start = time.perf_counter()
            loss, correct = step(images, labels)
            synchronize_device(step.device)
            compile_s += time.perf_counter() - compile_start
            compile_images += labels.shape[0]
        else:
            loss, correct = step(images, labels)
        batch = labels.shape[0]
        loss_sum += loss.double() * batch
        correct_sum += correct
        seen += batch
        pending.append(loss)
        last = index + 1 == steps
        if len(pending) == log_every or last:
            _check_finite(pending, epoch, index + 1 - len(pending), ctx)
            pending = []
        if last or time.perf_counter() - shown >= DISPLAY_EVERY_S:
            loss_mean = loss_sum.item() / seen  # waits for the queued steps, so the rate below counts them
            shown = time.perf_counter()
            progress.update(
                index + 1,
                images_per_s=(seen - compile_images) / max(shown - start - compile_s, 1e-9),
                loss=loss_mean,
                lr=step.optimizer.param_groups[-1]["lr"],
            )
    synchronize_device(step.device)
    elapsed = time.perf_counter() - start - compile_s
    return loss_sum, correct_sum, seen, elapsed, compile_s, compile_images


def synchronize_device(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_same_checkpoint(checkpoint: Mapping[str, Any] | None, ctx: DistContext) -> None:
    """Every rank must resume from rank 0's epoch, else they would train different step counts and hang."""
    epoch = None if checkpoint is None else int(checkpoint["epoch"])
    main_epoch = ctx.broadcast(epoch)
    if epoch != main_epoch:
        found = "no checkpoint" if epoch is None else f"a checkpoint of epoch {epoch}"
        main = "starts afresh" if main_epoch is None else f"resumes from epoch {main_epoch}"
        raise FinebenchError(
            f"rank {ctx.rank} finds {found} but rank 0 {main}: keep the results folder "
            "on a filesystem that every machine shares"
        )


def fit(
    model: nn.Module,
    train_loader: Any,
    test_loader: Iterable,
    train: TrainSection,
    *,
    mixture: bool,
    store: RunStore | None = None,
    ctx: DistContext | None = None,
    progress: Progress | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
    on_epoch: Callable[[Mapping[str, Any], list[dict[str, Any]]], None] | None = None,
    method: Method | None = None,
    runtime: Runtime | None = None,
    validation_loader: Iterable | None = None,
) -> FitResult:
    """Train for ``train.epochs``, resuming from the store's checkpoint when it has one.

    ``validation_loader`` (the run's ``dataset.validation``) is evaluated with the test split at each
    evaluation epoch (``val_loss``, ``val_top1`` in its row). ``train.select = "best_validation"``
    keeps the weights of the epoch with the highest validation top-1 (the earliest on a tie) in the
    store's ``best.pt``, written before ``last.pt``, whose ``selection`` entry is what a resume goes on
    from (a ``best.pt`` ahead of it is rewritten by the replayed epoch); after the last epoch those
    weights are evaluated on the test split (``FitResult.selected`` and ``selected_confusion``).

    The caller seeds the RNGs and builds the model and loaders; ``fit`` owns everything from the
    optimiser on. A NaN/inf loss ends the run with status ``failed`` instead of raising.
    ``on_epoch(row, rows)`` runs on rank 0 after each epoch's records are written (the runner's
    live summary and TensorBoard events). ``runtime``: the settings the caller resolved (and records);
    without it they are resolved here from ``train``.
    """
    ctx = ctx or DistContext()
    progress = progress or SilentProgress()
    runtime = runtime or resolve_runtime(train, attention=mixture)
    device, precision = runtime.device, runtime.precision
    compiled, channels_last = runtime.compiled, runtime.channels_last
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads.threads)
    place_model(model, train, runtime)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, len(train_loader))
    wrapped = ctx.wrap(model)
    trained_model = compile_model(wrapped) if compiled else wrapped
    # Under DDP evaluate the bare model: test shards may differ in size by one batch, and DDP's
    # forward would wait for a buffer broadcast from ranks that have already finished.
    eval_model = trained_model if wrapped is model else (compile_model(model) if compiled else model)
    step = TrainStep(
        trained_model, optimizer, scheduler, device, precision, mixture,
        train.label_smoothing, train.grad_clip, channels_last, compiled,
        accumulation_steps=train.accumulation_steps, method=method, head_only_epochs=train.head_only_epochs,
    )

    rows: list[dict[str, Any]] = []
    start_epoch, train_time, train_images, compile_time = 1, 0.0, 0, 0.0
    checkpoint = store.load_checkpoint() if store is not None else None
    _check_same_checkpoint(checkpoint, ctx)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        step.scaler.load_state_dict(checkpoint["scaler"])
        # Each rank resumes its own random streams when the worker count is unchanged.
        per_rank = checkpoint.get("rng_ranks") or []
        restore_rng_state(per_rank[ctx.rank] if len(per_rank) == ctx.world_size else checkpoint["rng"], train_loader)
        start_epoch = int(checkpoint["epoch"]) + 1
        train_time, train_images = float(checkpoint["train_time_s"]), int(checkpoint["train_images"])
        compile_time = float(checkpoint.get("compile_time_s", 0.0))
        rows = [row for row in store.read_metrics() if row["epoch"] < start_epoch]
        progress.message(f"resuming from epoch {start_epoch - 1}")

    final_confusion: list[list[int]] | None = None
    selecting = train.select == "best_validation"
    if selecting and validation_loader is None:
        raise FinebenchError('train.select = "best_validation" needs a validation split (dataset.validation)')
    selection: dict[str, Any] | None = checkpoint.get("selection") if checkpoint is not None else None
    best_in_memory: dict[str, Any] | None = None  # without a store, the selected weights stay here
    selected: dict[str, Any] | None = None
    selected_confusion: list[list[int]] | None = None
    final_predictions: PerImagePredictions | None = None

    def result(status: str, reason: str | None, epochs_done: int) -> FitResult:
        throughput = train_images / train_time if train_time else 0.0
        return FitResult(
            status, reason, rows, epochs_done, train_time, throughput, precision, device,
            confusion=final_confusion, compiled=compiled, channels_last=channels_last, compile_time_s=compile_time,
            selected=selected, selected_confusion=selected_confusion, predictions=final_predictions,
        )

    def evaluate_split(loader: Iterable, *, confusion: bool, per_image: bool = False) -> dict[str, Any]:
        return evaluate(eval_model, loader, device=device, precision=precision, mixture=mixture,
                        channels_last=channels_last, ctx=ctx, confusion=confusion, method=method, per_image=per_image)

    for epoch in range(start_epoch, train.epochs + 1):
        if runtime.threads_each_epoch and epoch > start_epoch:  # the caller chose for the first one
            torch.set_num_threads(choose_threads(train.threads, workers_here=runtime.workers_here).threads)
        epoch_threads = torch.get_num_threads()
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        trained_model.train()
        step.epoch = epoch
        try:
            loss_sum, correct_sum, seen, elapsed, epoch_compile_s, compile_images = _train_epoch(
                step, train_loader, epoch, train.epochs, train.log_every, progress, ctx
            )
        except NonFiniteLoss as error:
            return result("failed", str(error), epoch - 1)
        method_counts = step.take_method_counts()
        loss_terms = step.take_loss_terms()
        counts = ctx.reduce_sum(
            torch.stack([loss_sum, correct_sum, loss_sum.new_tensor(seen), loss_sum.new_tensor(compile_images)])
        ).tolist()
        timed_images = counts[2] - counts[3]
        train_time += elapsed
        train_images += int(timed_images)
        compile_time += epoch_compile_s
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": counts[0] / counts[2],
            "train_top1": 100.0 * counts[1] / counts[2],
            **({} if method is None or method_counts is None
               else method.train_metrics(ctx.reduce_sum(method_counts).tolist(), counts[2])),
            **({} if not loss_terms else  # the method's logged loss terms: means over the epoch's images
               dict(zip(loss_terms, (total / counts[2] for total in
                                     ctx.reduce_sum(torch.stack(list(loss_terms.values()))).tolist()), strict=True))),
            "lr": optimizer.param_groups[-1]["lr"],
            "epoch_time_s": elapsed,
            "images_per_s": timed_images / elapsed if elapsed else 0.0,
            "threads": epoch_threads,
            "load_1min": load_average(),
        }
        if epoch % train.eval_every == 0 or epoch == train.epochs:
            metrics = evaluate_split(test_loader, confusion=epoch == train.epochs, per_image=epoch == train.epochs)
            final_confusion = metrics.pop("confusion", None)
            final_predictions = metrics.pop("per_image", None)
            if validation_loader is not None:
                held_out = evaluate_split(validation_loader, confusion=False)
                metrics.update(val_loss=held_out["test_loss"], val_top1=held_out["test_top1"])
            trained = {k: v for k, v in row.items() if k not in ("lr", *MACHINE_FIELDS)}
            row = {**trained, **metrics, **{k: row[k] for k in ("lr", *MACHINE_FIELDS)}}
            if not math.isfinite(row["test_loss"]):
                rows.append(row)
                if store is not None and ctx.is_main:
                    store.write_metrics(rows)
                return result("failed", f"test loss became {row['test_loss']} at epoch {epoch}", epoch)
            rows.append(row)
            if selecting and (selection is None or row["val_top1"] > selection["val_top1"]):
                selection = {"epoch": epoch, "val_top1": row["val_top1"]}
                best = {**selection, "model": model.state_dict()}
                if store is None:
                    best_in_memory = {**selection, "model": {k: v.detach().clone() for k, v in best["model"].items()}}
                elif ctx.is_main:
                    store.save_best(best)  # before last.pt: a kill between the two replays this epoch
        progress.end_epoch(row)
        rng = capture_rng_state(train_loader) if store is not None else {}
        rng_ranks = ctx.gather(rng) if store is not None and ctx.world_size > 1 else []
        if store is not None and ctx.is_main:
            store.write_metrics(rows)
            store.save_checkpoint(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": step.scaler.state_dict(),
                    "rng": rng,
                    "rng_ranks": rng_ranks,
                    "train_time_s": train_time,
                    "train_images": train_images,
                    "compile_time_s": compile_time,
                    **({"selection": selection} if selecting else {}),
                    **dict(checkpoint_extra or {}),
                }
            )
        if on_epoch is not None and ctx.is_main:
            on_epoch(row, rows)
    if selecting:
        selected, selected_confusion = _evaluate_selected(model, store, best_in_memory, selection, ctx,
                                                       lambda: evaluate_split(test_loader, confusion=True))
    return result("finished", None, train.epochs)


def _evaluate_selected(
    model: nn.Module, store: RunStore | None, in_memory: Mapping[str, Any] | None, selection: Mapping[str, Any] | None,
    ctx: DistContext, evaluate_test: Callable[[], dict[str, Any]],
) -> tuple[dict[str, Any] | None, list[list[int]] | None]:
    """The selected epoch's weights into ``model`` and their test evaluation: the run's final one."""
    ctx.barrier()  # rank 0's best.pt is complete before any rank reads it
    best = in_memory if store is None else store.load_best()
    if best is None or selection is None:
        return None, None
    if int(best["epoch"]) != int(selection["epoch"]):
        raise FinebenchError(f"best.pt holds epoch {best['epoch']} but the last checkpoint selected epoch "
                             f"{selection['epoch']}: the run's records disagree; rerun with --restart")
    model.load_state_dict(best["model"])
    metrics = evaluate_test()
    confusion = metrics.pop("confusion", None)
    return {"rule": "best_validation", "epoch": int(selection["epoch"]), "val_top1": selection["val_top1"],
            **metrics}, confusion


def place_model(model: nn.Module, train: TrainSection, runtime: Runtime) -> None:
    """The one way ``fit`` and ``build_train_step`` ready a model: on the run's device, in its memory
    format, with ghost BatchNorm where the recipe asks, and the device's backend settings."""
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    if train.batchnorm_group:
        convert_ghost_batchnorm(model, train.batchnorm_group)
    configure_backends(runtime.device)


def build_train_step(
    model: nn.Module, train: TrainSection, *, mixture: bool, steps_per_epoch: int, method: Method | None = None
) -> TrainStep:
    """A ready ``TrainStep`` (device, precision, optimiser, schedule) for benchmarks on in-memory batches."""
    runtime = resolve_runtime(train, attention=mixture)
    device, precision = runtime.device, runtime.precision
    compiled, channels_last = runtime.compiled, runtime.channels_last
    model.train()
    place_model(model, train, runtime)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, steps_per_epoch)
    return TrainStep(
        compile_model(model) if compiled else model, optimizer, scheduler, device, precision, mixture,
        train.label_smoothing, train.grad_clip, channels_last, compiled,
        accumulation_steps=train.accumulation_steps, method=method, head_only_epochs=train.head_only_epochs,
    )


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` with static shapes: a run sees at most four (training and evaluation
    batches, each full and the last partial one), each compiled once in the first epoch and
    reused after, where automatic dynamic shapes would compile a second, slower generic graph."""
    return torch.compile(model, dynamic=False)  # type: ignore[return-value]
