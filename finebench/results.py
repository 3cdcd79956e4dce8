"""Run records on disk: ``results/<recipe>/<run-id>/`` with config, metrics, summary and checkpoint.

Every file is replaced atomically (temporary file in the same folder, fsync, rename), so a run
killed at any instant leaves either the old or the new version of each file, never half of one.
A per-run ``flock`` keeps two ``finebench run`` processes from training the same run at once;
the kernel drops it when a process dies, so a killed run can be resumed at once.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import io
import json
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import finebench

SCHEMA_VERSION = 1
BEST_NOTE = "best-epoch test accuracy (optimistic: selected on the test set)"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()
"""What ``open()`` would have given; ``mkstemp`` alone makes files private (0600)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
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


class RunLocked(Exception):
    """Another process holds this run's lock."""


class RunDir:
    """One run's folder and the only code that writes into it."""

    def __init__(self, results_dir: Path, recipe_name: str, run_id: str) -> None:
        self.path = Path(results_dir) / recipe_name / run_id

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    checkpoint_path = property(lambda self: self.path / "last.pt")
    confusion_path = property(lambda self: self.path / "confusion.json")

    def summary(self) -> dict[str, Any] | None:
        return read_json(self.summary_path) if self.summary_path.is_file() else None

    def status(self) -> str | None:
        summary = self.summary()
        return summary.get("status") if summary else None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``.lock`` for the duration; raise ``RunLocked`` at once if another process has it."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / ".lock", "a+")
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLocked(str(self.path)) from None
            yield
        finally:
            handle.close()

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.config_path, dict(config))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.summary_path, dict(summary))

    def write_confusion(self, matrix: list[list[int]], classes: list[str] | None = None) -> None:
        """The final evaluation's confusion matrix (rows: true class, columns: prediction)."""
        atomic_write_json(self.confusion_path, {"rows": "true class", "columns": "predicted class",
                                                "classes": classes, "matrix": matrix})

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def write_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Rewrite the whole file: a few hundred short lines, and atomic unlike an append."""
        text = "".join(json.dumps(dict(row), sort_keys=False) + "\n" for row in rows)
        atomic_write_bytes(self.metrics_path, text.encode())

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        atomic_write_bytes(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)


def best_entry(rows: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The epoch with the highest test top-1, labelled as the optimistic number it is."""
    if not rows:
        return None
    best = max(rows, key=lambda row: (row["test_top1"], -row["epoch"]))
    return {"epoch": best["epoch"], "test_top1": best["test_top1"], "note": BEST_NOTE}


def final_entry(rows: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not rows:
        return None
    last = rows[-1]
    keys = ("epoch", "test_top1", "test_top5", "test_loss", "train_loss", "network_top1", "module_top1")
    return {key: last.get(key) for key in keys}


def iter_summaries(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every readable ``summary.json`` below ``root`` (what ``finebench report`` aggregates)."""
    for path in sorted(Path(root).rglob("summary.json")):
        try:
            yield path.parent, read_json(path)
        except (OSError, json.JSONDecodeError):
            continue
