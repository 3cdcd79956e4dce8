"""What a training run shows while it runs: a ``Progress`` protocol the fit loop reports to (a
transient bar per epoch, one line per finished epoch) and its silent and rich implementations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

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

    def __init__(self, label: str, console: Any) -> None:
        """``console``: the rich ``Console`` to draw on (the caller's: ``finebench.console.make_console``)."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.label = label
        self.console = console
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
