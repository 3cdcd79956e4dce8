"""Per-epoch curves as TensorBoard event files, from the same row ``metrics.jsonl`` gets.

TensorBoard is an optional extra (``pip install finebench[tensorboard]``): without it this logs
nothing, and the JSONL stays the record the report reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

EVENTS_DIR = "tensorboard"


class TensorBoardLog:
    """One scalar per numeric field of an epoch's row (``module_top1`` per tap), stepped by epoch."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed
            self.writer = None
            return
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / EVENTS_DIR))

    def log(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch":
                continue
            if isinstance(value, Mapping):
                for name, inner in value.items():
                    if isinstance(inner, (int, float)) and not isinstance(inner, bool):
                        self.writer.add_scalar(f"{key}/{name}", inner, epoch)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
