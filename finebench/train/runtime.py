"""Where and how a run's steps execute: device, precision, compile, memory format and threads,
each resolved once from the ``train`` settings ("auto" decided for this machine), plus the seam of
a distributed run (``DistContext``) and the helpers that place a model and a batch accordingly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finebench.errors import FinebenchError
from finebench.models.batchnorm import convert_ghost_batchnorm
from finebench.train.threads import ThreadChoice, decided_each_epoch
from finebench.train_settings import TrainSection


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
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
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


def place_model(model: nn.Module, train: TrainSection, runtime: Runtime) -> None:
    """The one way ``fit`` and ``build_train_step`` ready a model: on the run's device, in its memory
    format, with ghost BatchNorm where the recipe asks, and the device's backend settings."""
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    if train.batchnorm_group:
        convert_ghost_batchnorm(model, train.batchnorm_group)
    configure_backends(runtime.device)


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` with static shapes: a run sees at most four (training and evaluation
    batches, each full and the last partial one), each compiled once in the first epoch and
    reused after, where automatic dynamic shapes would compile a second, slower generic graph."""
    return torch.compile(model, dynamic=False)  # type: ignore[return-value]


def synchronize_device(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    """Move a batch to ``device`` without a host sync (and into channels_last where the run uses it)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)
