"""The ``train`` settings type and the metrics fields the engine reports about the machine.

Both are facts the recipe (``finebench.recipe``), the method plug-ins (``finebench.methods``), the
engine (``finebench.train``) and the run records (``finebench.results``) share; they sit here, below
all of them, so each imports the real type rather than a stand-in.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """A strict settings table: unknown keys, coercion and non-finite floats are errors."""

    # inf and nan are valid TOML floats (and ``--set train.lr=1e999`` parses as inf): never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps")
"""The values of ``train.device``."""

MACHINE_FIELDS = ("epoch_time_s", "images_per_s", "threads", "load_1min")
"""metrics.jsonl fields that say how the machine ran an epoch, not what the run computed (the fit
loop writes them last in each row; comparisons of runs leave them out)."""


class TrainSection(Section):
    """A run's ``train`` settings: how the engine trains (``finebench.train``) and what a method's
    ``train_settings`` may change. It lives below the recipe, methods and engine so all three use the
    one type; the recipe holds it as its ``train`` section."""

    epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    eval_batch_size: Annotated[int, Field(ge=1)] | None = None
    optimizer: Literal["sgd", "nesterov", "adamw"] = "nesterov"
    lr: Annotated[float, Field(gt=0)] = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4
    backbone_lr_mult: Annotated[float, Field(ge=0)] = 1.0
    """Learning-rate factor of the pretrained backbone (0.1 in the paper's fine-grained runs)."""
    head_only_epochs: Annotated[int, Field(ge=0)] = 0
    """The first this many epochs train only the new layers (classifier and the method's heads): the
    backbone's gradients are dropped before each optimiser step, so it takes no update, weight decay
    or momentum, while its BatchNorm statistics still move. B-CNN's two-stage protocol (classifier
    first, then everything) is this plus a multistep lr drop at the same epoch; equal to ``epochs``
    it is a linear probe."""
    schedule: Literal["constant", "step", "multistep", "cosine", "exponential"] = "multistep"
    """``exponential``: lr x ``gamma`` ** (epochs / ``step_size``), epochs counted in fractions
    (CAL's official 0.9 ** ((epoch + i / N) / 2)); ``step``: the same in whole steps of ``step_size``."""
    milestones: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    """Epochs after which the lr is multiplied by ``gamma`` (multistep)."""
    step_size: Annotated[int, Field(ge=1)] = 30
    """Epochs between lr decays (step), or per factor of ``gamma`` (exponential)."""
    lr_updates: Literal["batch", "epoch"] = "batch"
    """When the decay moves: at every batch, or once at each epoch start (PMG's official cosine).
    Only the cosine and exponential decays change within an epoch; warm-up is per batch either way."""
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    """Clip the global gradient norm to this value; unset means no clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto"] | bool = "auto"
    """NHWC activations; "auto" picks per device and case what was measured faster
    (``finebench.train.runtime.resolve_channels_last``); the choice is recorded in summary.json."""
    compile: Literal["auto"] | bool = "auto"
    """``torch.compile`` the model; "auto": on CUDA for plain backbones, otherwise eager (``resolve_compile``)."""
    workers: Annotated[int, Field(ge=0)] = 0
    sync_batchnorm: bool = False
    """Distributed runs: batch statistics over all workers (``SyncBatchNorm``)."""
    batchnorm_group: Annotated[int, Field(ge=0)] = 0
    """Ghost BatchNorm: training statistics over consecutive groups of this many images of each
    device's batch (``finebench.models.batchnorm``), so one device reproduces the statistics of
    the authors' multi-GPU ``DataParallel`` runs (64 = their 2-GPU CIFAR runs at batch 128).
    0: the whole per-device batch."""
    threads: Annotated[int, Field(ge=1)] | Literal["auto", "auto-once"] = "auto"
    """CPU intra-op threads (``torch.set_num_threads``): ``"auto"`` uses the cores idle at each epoch
    start; ``"auto-once"`` those idle at the run's first start, kept by its resumes (bit-identical
    kill-and-resume on the CPU); a number pins it (finebench.train.threads). Recorded per epoch in
    metrics.jsonl with the load average."""
    accumulation_steps: Annotated[int, Field(ge=1)] = 1
    """Micro-batches per optimiser step: each batch is split this many ways, each part's gradient
    added up, one step taken. The gradient is the whole batch's; BatchNorm sees micro-batches, as
    in the authors' ImageNet run (128 images x ``iter_size`` 2)."""
    eval_every: Annotated[int, Field(ge=1)] = 1
    select: Literal["last", "best_validation"] = "last"
    """Which epoch's weights the final test evaluation uses: the last, or the one with the highest
    validation top-1 (``best.pt``, kept beside ``last.pt``; the earliest on a tie), which needs
    ``dataset.validation``. The report shows both, and the best epoch on test, each labelled."""
    log_every: Annotated[int, Field(ge=1)] = 20
    """Steps between the checks that the training loss is finite (one host read of those steps' losses,
    summed over ranks; a NaN or inf fails the run naming its step). Nothing recorded depends on it;
    the progress display updates about once a second whatever it is."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."""

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        # Checked here, not when the device is opened, so that --dry-run rejects it too.
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return value

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainSection:
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs train.milestones, e.g. [60, 120, 160]")
        if self.milestones != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        if self.lr_updates == "epoch" and self.schedule not in ("cosine", "exponential"):
            raise ValueError(f"lr_updates 'epoch' changes nothing with schedule {self.schedule!r} (its lr already "
                             "moves at epoch boundaries): expected schedule 'cosine' or 'exponential', or lr_updates 'batch'")
        if self.head_only_epochs > self.epochs:
            raise ValueError(f"head_only_epochs ({self.head_only_epochs}) must be at most epochs ({self.epochs})")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        if self.batchnorm_group and self.sync_batchnorm:
            raise ValueError("batchnorm_group (statistics over groups of images) and sync_batchnorm "
                             "(statistics over all workers) exclude each other; set one")
        if self.batch_size % self.accumulation_steps:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into accumulation_steps = {self.accumulation_steps} "
                "equal micro-batches"
            )
        return self
