"""Atomic file writes, the one implementation every layer uses (run records, dataset metadata, the
decoded-image cache): a reader sees the old file or the new one, never a torn one, even after a
crash or a full disk.

Why by hand: the standard library has the parts (``mkstemp``, ``fsync``, ``os.replace``) but no
function that joins them with the directory fsync and the permissions ``open()`` would have given.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()
"""What ``open()`` would have given; ``mkstemp`` alone makes files private (0600)."""


def make_folder(folder: Path, target: Path | None = None) -> None:
    """``folder`` and its parents, as ``mkdir(parents=True, exist_ok=True)``; where a file stands in
    the way, the error names it and ``target`` (what was to be written there; default ``folder``),
    since mkdir's own says only "File exists: 'a'" of an ``a/b/out.md``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((part for part in (folder, *folder.parents) if part.exists() and not part.is_dir()), None)
        if blocker is None:
            raise
        raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, expected a folder",
                                 str(target or folder)) from None


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(handle)`` into a temporary file beside ``path``, fsync it, then rename it over ``path``
    and fsync the folder. On any failure the temporary file is removed and ``path`` is unchanged;
    an ``OSError`` names ``path``, never the temporary file."""
    path = Path(path)
    make_folder(path.parent, path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _naming(error, path) from None
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _naming(error, path) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _naming(error: OSError, path: Path) -> OSError:
    """The error as the user's file would give it: the temporary file is ours, not a name they know
    (a failed write or fsync names no file; a failed mkstemp or rename names the temporary one)."""
    if error.filename == str(path) and error.filename2 is None:
        return error
    return type(error)(error.errno, error.strerror, str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())
