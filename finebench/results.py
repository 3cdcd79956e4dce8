"""Run records on disk: ``results/<recipe>/<run-id>/`` with config, metrics, summary and checkpoint.

Every file is replaced atomically (temporary file in the same folder, fsync, rename), so a run
killed at any instant leaves either the old or the new version of each file, never half of one.
A per-run ``flock`` keeps two ``finebench run`` processes from training the same run at once;
the kernel drops it when a process dies, so a killed run can be resumed at once. Reading a run's
state (``RunDir.state``) holds no lock and writes nothing, so finished runs can be listed and
skipped in a read-only results folder; it only tests whether a live process holds the lock, which
is what tells a run in progress (``running``) from one that was stopped (``resumable``).
What summary.json holds (its schema, the entries made from the epochs' rows) is ``finebench.summary``'s.
"""

from __future__ import annotations

import copy
import datetime as _dt
import fcntl
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finebench.atomic import atomic_write_bytes, atomic_write_json  # noqa: F401  (run records' writers)
from finebench.errors import FinebenchError


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def utc_now(timestamp: float | None = None) -> str:
    """Now (or a POSIX ``timestamp``) as the records write times: ``2026-12-03T06:15:00Z``."""
    moment = _dt.datetime.now(_dt.timezone.utc) if timestamp is None else _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_summary(path: Path) -> dict[str, Any]:
    """summary.json as a dict; anything else is a ``FinebenchError`` naming the file."""
    try:
        summary = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FinebenchError(f"{path}: not a readable run summary ({error}): {RESTART_HINT}") from None
    if not isinstance(summary, dict):
        raise FinebenchError(f"{path}: expected a JSON object, found {type(summary).__name__}: {RESTART_HINT}")
    return summary


def parse_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """metrics.jsonl's epoch rows, and one line per line that is not one (the one rule for both the
    strict reader, which a resume uses, and the lenient one, which the report uses)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        return [], [f"{path}: not UTF-8 text ({error.reason})"]
    rows, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{path} line {number}: not valid JSON ({error})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            problems.append(f"{path} line {number}: expected an object with an integer 'epoch'")
            continue
        rows.append(row)
    return rows, problems


class RunLocked(Exception):
    """Another process holds this run's lock."""


RESTART_HINT = "rerun with --restart to discard this run's records and train it from epoch 1"


@dataclass(frozen=True)
class RunState:
    """What a rerun does with a run folder, read from its records and whether its lock is held (no writes)."""

    kind: str
    """running (a live process holds the run's lock) | new | resumable | finished | failed | damaged
    (records that cannot be read)"""
    problem: str | None = None
    """For ``damaged``: one line naming the file and how to go on."""
    failure_reason: str | None = None
    """For ``failed``: why training stopped."""
    rebuild_summary: bool = False
    """For ``resumable``: summary.json is unreadable but ``last.pt`` and metrics.jsonl are intact, so
    the resume rebuilds it (a finished run trains nothing: its model is never thrown away)."""


class RunDir:
    """One run's folder and the only code that writes into it."""

    CONFIG_FILE = "config.json"
    METRICS_FILE = "metrics.jsonl"
    SUMMARY_FILE = "summary.json"
    CHECKPOINT_FILE = "last.pt"
    CONFUSION_FILE = "confusion.json"
    BEST_FILE = "best.pt"
    """``train.select = "best_validation"``: the weights of the epoch with the best validation top-1."""
    VALIDATION_FILE = "validation.json"
    """``dataset.validation``: which images were held out of training (``finebench.data.validation``)."""
    PREDICTIONS_FILE = "predictions.parquet"
    """Per-image predictions of the final evaluation (``finebench.predictions``); ``finebench eval``
    writes ``predictions-<split>.parquet`` beside it (``predictions_path``)."""

    LOCK_FILE = ".lock"
    LOCK_TRIES = 10
    """Tries of a taken lock before ``RunLocked``, ``LOCK_RETRY_S`` apart: ``state`` tests the lock by
    taking it shared for an instant, so a reader (``report``, a dry run, the ``--jobs`` view) must not
    make a process that starts the run think another one trains it."""
    LOCK_RETRY_S = 0.02

    def __init__(self, results_dir: Path, recipe_name: str, run_id: str) -> None:
        self.path = Path(results_dir) / recipe_name / run_id
        self._cache: dict[str, tuple[tuple[int, int, int], Any]] = {}
        self._holding = False

    @classmethod
    def at(cls, folder: Path) -> RunDir:
        """The run folder at ``folder`` (``results/<recipe>/<run id>``), for readers given a path."""
        folder = Path(folder)
        return cls(folder.parent.parent, folder.parent.name, folder.name)

    config_path = property(lambda self: self.path / self.CONFIG_FILE)
    metrics_path = property(lambda self: self.path / self.METRICS_FILE)
    summary_path = property(lambda self: self.path / self.SUMMARY_FILE)
    checkpoint_path = property(lambda self: self.path / self.CHECKPOINT_FILE)
    confusion_path = property(lambda self: self.path / self.CONFUSION_FILE)
    best_path = property(lambda self: self.path / self.BEST_FILE)
    validation_path = property(lambda self: self.path / self.VALIDATION_FILE)

    def predictions_path(self, split: str | None = None) -> Path:
        """The final evaluation's per-image file, or (``split``) the one ``finebench eval`` writes for
        that split: its own file, so a second evaluation never replaces what the run recorded."""
        if split is None:
            return self.path / self.PREDICTIONS_FILE
        stem, suffix = self.PREDICTIONS_FILE.rsplit(".", 1)
        return self.path / f"{stem}-{split}.{suffix}"

    def _parsed(self, path: Path, parse: Callable[[Path], Any]) -> Any:
        """``parse(path)``, or None when the file is missing. A record is parsed once while it is
        unchanged (same inode, size and mtime: every write here replaces the file by a rename), so the
        plan, the lock's second look and the resume read a run's records once between them."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._cache.get(path.name)
        if cached is None or cached[0] != key:
            cached = (key, parse(path))  # a FinebenchError is not cached: the next read tries again
            self._cache[path.name] = cached
        return copy.deepcopy(cached[1])

    def summary(self) -> dict[str, Any] | None:
        """``summary.json``, or None before the first write; unreadable is a ``FinebenchError`` naming it."""
        return self._parsed(self.summary_path, parse_summary)

    def status(self) -> str | None:
        summary = self.summary()
        return summary.get("status") if summary else None

    def held_by_another(self) -> bool:
        """Whether a live process other than this one (through this object) holds the run's lock.

        The kernel drops a ``flock`` when its process dies, however it dies (Ctrl-C, a full disk,
        ``kill -9``), so a held lock is a run in progress and a free one a run that stopped, whatever
        its summary still says. Read only: ``.lock`` is opened for reading and never created. A lock
        that cannot be tested (no ``.lock``, a filesystem without flock) counts as free."""
        if self._holding:
            return False
        try:
            with open(self.path / self.LOCK_FILE, "rb") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)  # closing the file drops it at once
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def state(self) -> RunState:
        """One word for where the run stands, the one ``run --dry-run`` and ``report`` both show.

        ``running`` when a live process holds the lock (``held_by_another``); else finished and
        failed come from the summary, and the rest resumes when ``last.pt`` exists. The summary is
        the one record made only from the others: unreadable, with ``last.pt`` and the metrics
        intact, the run resumes and the resume rebuilds it (training nothing when every epoch is done)."""
        if self.held_by_another():
            return RunState("running")
        try:
            summary, summary_problem = self.summary() or {}, None
        except FinebenchError as error:
            summary, summary_problem = {}, str(error)
        status = summary.get("status")
        if status == "finished":
            return RunState("finished")
        if status == "failed":
            return RunState("failed", failure_reason=summary.get("failure_reason"))
        if not self.checkpoint_path.is_file():
            return RunState("damaged", problem=summary_problem) if summary_problem else RunState("new")
        try:
            self.read_metrics()  # a resume replays them: a bad line would stop it only after the model is built
        except FinebenchError as error:
            return RunState("damaged", problem=str(error))
        if summary_problem:
            return RunState("resumable", problem=f"{self.summary_path}: unreadable; rebuilt from {self.CONFIG_FILE}, "
                            f"{self.METRICS_FILE} and {self.CHECKPOINT_FILE} when the run is resumed",
                            rebuild_summary=True)
        return RunState("resumable")

    def summary_if_readable(self) -> dict[str, Any]:
        """``summary.json``, or ``{}`` when it is missing or damaged (a resume rebuilds a damaged one)."""
        try:
            return self.summary() or {}
        except FinebenchError:
            return {}

    def epochs_saved(self) -> int:
        """The epoch of the model in ``last.pt`` (0 when there is none or it is unreadable).

        ``--restart`` reads it to refuse throwing away a trained model by accident; the metrics
        alone do not count, since without a readable checkpoint there is no model to keep."""
        try:
            checkpoint = self.load_checkpoint()
        except (FinebenchError, OSError):
            return 0
        return int(checkpoint["epoch"]) if checkpoint else 0

    def discard(self) -> None:
        """Delete the run's checkpoint and records (``--restart``); the lock file stays, it may be held."""
        evaluated = self.predictions_path("*").name  # what `finebench eval` wrote of the discarded model
        for path in (self.checkpoint_path, self.metrics_path, self.summary_path, self.config_path,
                     self.confusion_path, self.best_path, self.validation_path, self.predictions_path(),
                     *self.path.glob(evaluated)):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.path / "tensorboard", ignore_errors=True)  # the discarded run's curves

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``.lock`` for the duration; raise ``RunLocked`` if another process keeps it
        (``LOCK_TRIES`` tries: a reader's test of it lasts an instant, a training run's for hours)."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / self.LOCK_FILE, "a+")
        try:
            try:
                for attempt in range(self.LOCK_TRIES):
                    try:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if attempt == self.LOCK_TRIES - 1:
                            raise RunLocked(str(self.path)) from None
                        time.sleep(self.LOCK_RETRY_S)
            except OSError as error:  # ENOLCK, EOPNOTSUPP: e.g. Lustre mounted without its flock option
                raise FinebenchError(
                    f"{self.path / '.lock'}: the run's lock cannot be taken on this filesystem ({error.strerror}); "
                    "keep the results folder on a filesystem with working flock (Lustre: mount with -o flock)",
                    exit_code=1,
                ) from None
            try:  # who holds it, for ``lock_holder``; the lock works without it
                handle.truncate(0)
                handle.write(f"{os.getpid()}\n")
                handle.flush()
            except OSError:
                pass
            self._holding = True
            yield
        finally:
            self._holding = False
            handle.close()

    def lock_holder(self) -> int | None:
        """The process id of the last process that took the run's lock (it may have ended since), or None.

        ``--jobs`` reads it to tell which run a job that stopped or died was training."""
        try:
            return int((self.path / ".lock").read_text(encoding="ascii").strip())
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.config_path, dict(config))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.summary_path, dict(summary))

    def write_confusion(self, matrix: list[list[int]], classes: list[str] | None = None) -> None:
        """The final evaluation's confusion matrix (rows: true class, columns: prediction)."""
        atomic_write_json(self.confusion_path, {"rows": "true class", "columns": "predicted class",
                                                "classes": classes, "matrix": matrix})

    def read_confusion(self) -> list[list[int]] | None:
        """The matrix of ``confusion.json`` (rows: true class), or None before the final evaluation;
        unreadable is a ``FinebenchError`` naming the file."""
        if not self.confusion_path.is_file():
            return None
        try:
            record = read_json(self.confusion_path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FinebenchError(f"{self.confusion_path}: not a readable confusion matrix ({error})") from None
        matrix = record.get("matrix") if isinstance(record, dict) else None
        if not isinstance(matrix, list):
            raise FinebenchError(f"{self.confusion_path}: no 'matrix' list")
        return matrix

    def read_metrics(self) -> list[dict[str, Any]]:
        """One row per logged epoch; a line that is not an epoch's record is a ``FinebenchError`` naming it
        (a resume replays the rows, so it must not go on from a guess)."""
        rows, problems = self._parsed(self.metrics_path, parse_metrics) or ([], [])
        if problems:
            raise FinebenchError(f"{problems[0]}: {RESTART_HINT}")
        return rows

    def read_metrics_lenient(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The rows that parse, and one line per line that does not (the report and plots go on without it)."""
        return self._parsed(self.metrics_path, parse_metrics) or ([], [])

    def write_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Rewrite the whole file: a few hundred short lines, and atomic unlike an append."""
        text = "".join(json.dumps(dict(row), sort_keys=False) + "\n" for row in rows)
        atomic_write_bytes(self.metrics_path, text.encode())

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        atomic_write_bytes(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        """``last.pt``, or None before the first epoch ends; unreadable is a ``FinebenchError`` naming it."""
        return _load_state(self.checkpoint_path)

    def save_best(self, state: Mapping[str, Any]) -> None:
        """``best.pt`` (epoch, val_top1, model), replaced atomically like ``last.pt``."""
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        atomic_write_bytes(self.best_path, buffer.getvalue())

    def load_best(self) -> dict[str, Any] | None:
        """``best.pt``, or None before a validation epoch selected one; unreadable is a ``FinebenchError``."""
        return _load_state(self.best_path)

    def write_validation(self, record: Mapping[str, Any]) -> None:
        atomic_write_json(self.validation_path, dict(record))

    def read_validation(self) -> dict[str, Any] | None:
        """``validation.json``, or None when the run has none yet; unreadable is a ``FinebenchError``."""
        if not self.validation_path.is_file():
            return None
        try:
            record = read_json(self.validation_path)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FinebenchError(f"{self.validation_path}: not a readable validation record ({error}): "
                                 f"{RESTART_HINT}") from None
        if not isinstance(record, dict):
            raise FinebenchError(f"{self.validation_path}: expected a JSON object: {RESTART_HINT}")
        return record


def _load_state(path: Path) -> dict[str, Any] | None:
    """A checkpoint file (``last.pt``, ``best.pt``), or None when missing; damage is a ``FinebenchError`` naming it."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        # torch's zip reader says EINVAL for a file cut short near its end: only a file that
        # reads back whole is the disk's innocence, and then the damage is the file's
        if not _reads_whole(path):
            raise  # the disk, not the file: the CLI names it, and the run stays resumable
        raise FinebenchError(f"{path}: unreadable checkpoint, cut short or corrupt: {RESTART_HINT}") from None
    except Exception as error:  # torch reports damage as RuntimeError, UnpicklingError, EOFError, ...
        # the first sentence: torch goes on with advice for its own users
        reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise FinebenchError(f"{path}: unreadable checkpoint, cut short or corrupt ({reason}): "
                             f"{RESTART_HINT}") from None
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise FinebenchError(f"{path}: not a finebench checkpoint (no epoch): {RESTART_HINT}")
    return state


def _reads_whole(path: Path, chunk: int = 1 << 24) -> bool:
    """Whether every byte of ``path`` can be read (read and dropped a chunk at a time, not held)."""
    try:
        with open(path, "rb") as handle:
            while handle.read(chunk):
                pass
    except OSError:
        return False
    return True
