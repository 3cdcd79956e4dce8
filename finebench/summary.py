"""What a run's ``summary.json`` holds: its schema, the entries made from the epochs' rows, and the
machine and source it was made with.

``finebench.results`` reads and writes the run's files; the runner builds each summary from these
parts, and the report reads it back through ``RunSummary``.
"""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

import finebench
from finebench.train_settings import MACHINE_FIELDS

SCHEMA_VERSION = 1
BEST_NOTE = "best-epoch test accuracy (optimistic: selected on the test set)"
SELECTED_NOTE = "test accuracy of the epoch with the best validation top-1 (train.select = best_validation)"


@functools.cache
def git_commit() -> str | None:
    """The commit of the finebench source tree, when it is a git checkout."""
    source = Path(finebench.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.cache
def git_dirty() -> bool | None:
    """Whether the finebench source tree had uncommitted changes to tracked files (None: not a git checkout).

    A run made from a dirty tree is not reproducible from its ``git_commit`` alone.
    """
    source = Path(finebench.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    import torchvision

    # Asking cuDNN its version loads the library (hundreds of MB of address space), so a CPU run,
    # which never uses it, does not ask: under a memory limit that load alone aborts the process.
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() and torch.backends.cudnn.is_available() else None
    return {
        "torch_version": torch.__version__.split("+")[0],
        "torchvision_version": torchvision.__version__.split("+")[0],
        "python_version": platform.python_version(),
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn,
        "finebench_version": finebench.__version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "hostname": socket.gethostname(),
    }


# The runner builds each summary (``runner._summary``); these are the fields readers rely on, each
# checked when the report reads a record. New fields get defaults, so old records stay readable.


class FinalMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    epoch: int | None = None
    test_top1: float
    test_top5: float | None = None
    test_loss: float | None = None
    train_loss: float | None = None
    network_top1: float | None = None
    module_top1: dict[str, float] = Field(default_factory=dict)
    mean_class_top1: float | None = None


class BestMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    epoch: int | None = None
    test_top1: float | None = None


class SelectedMetrics(BaseModel):
    """``summary.json``'s ``selected``: the validation-selected epoch and its weights' test evaluation."""

    model_config = ConfigDict(extra="allow")
    rule: str = "best_validation"
    epoch: int | None = None
    val_top1: float | None = None
    test_top1: float | None = None


class RunSummary(BaseModel):
    """The fields of ``summary.json`` the report relies on; anything else is kept but unchecked."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    schema_version: int = Field(1, alias="schema")
    run_id: str
    recipe: str
    status: Literal["finished", "failed", "running"]
    failure_reason: str | None = None
    dataset: str
    num_classes: int | None = None
    backbone: str
    backbone_label: str
    variant: str
    variant_name: str
    variant_options: dict[str, Any] = Field(default_factory=dict)
    seed: int
    epochs: int | None = None
    epochs_completed: int | None = None
    final: FinalMetrics | None = None
    best: BestMetrics | None = None
    selected: SelectedMetrics | None = None
    params: float | None = None
    flops: float | None = None
    params_baseline: float | None = None
    flops_baseline: float | None = None
    module_flops: dict[str, float] = Field(default_factory=dict)
    size_warnings: list[str] = Field(default_factory=list)
    """Where the method's mechanism cannot act at the input size (``Method.size_warnings``)."""
    input_size: int | None = None
    train_time_s: float | None = None
    images_per_s: float | None = None
    device: str | None = None
    precision: str | None = None


PROGRESS_FIELDS = ("train_top1", "lr", *MACHINE_FIELDS)
"""metrics.jsonl fields of the epoch's training, left out of the summary's ``final`` entry."""


def best_entry(rows: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The epoch with the highest test top-1, labelled as the optimistic number it is."""
    if not rows:
        return None
    best = max(rows, key=lambda row: (row["test_top1"], -row["epoch"]))
    return {"epoch": best["epoch"], "test_top1": best["test_top1"], "note": BEST_NOTE}


def method_training_entry(rows: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """What the method recorded of its last epoch's training (``Method.train_metrics``, named
    ``train_*``: API-Net's pair statistics), or None when it records nothing."""
    if not rows:
        return None
    found = {key: value for key, value in rows[-1].items()
             if key.startswith("train_") and key not in ("train_loss", "train_top1")}
    return found or None


def final_entry(rows: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not rows:
        return None
    last = rows[-1]
    keys = ("epoch", "test_top1", "test_top5", "test_loss", "train_loss", "network_top1", "module_top1")
    # and whatever else the method evaluates (``Method.eval_metrics``: PMG's heads, WS-DAN's crops);
    # what it records of its training is named ``train_*`` (``Method.train_metrics``) and stays out
    extra = {key: value for key, value in last.items()
             if key not in keys and key not in PROGRESS_FIELDS and not key.startswith("train_")}
    return {**{key: last.get(key) for key in keys}, **extra}
