"""The build folder a store is written in, and what makes a killed prepare resumable.

A store is complete exactly when ``meta.json`` exists: it is built in ``<name>.partial``, ``meta.json`` is
written last, and the folder gets its real name by one rename (``commit_build``). An interrupted prepare
therefore never leaves something that looks done, and ``--force`` swaps the old store out only once the new
one is complete. ``build.json`` says what a build's shards were made from; a build of other files or
options is started over, never continued.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import finebench
from finebench.data import shards
from finebench.data.store import META_FILE, STORE_FORMAT

BUILD_KEY_FILE = "build.json"
"""In a build folder: what its shards were made from (files, options), so only the same build resumes."""


def _remove_stale_partials(data_root: Path, name: str) -> None:
    """Delete build folders left by prepares whose process is gone (never a live one's)."""
    for leftover in data_root.glob(f"{name}.partial-*"):
        pid_text = leftover.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        try:
            os.kill(int(pid_text), 0)
            alive = True
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(leftover, ignore_errors=True)


def new_build_dir(data_root: Path, name: str) -> Path:
    """A fresh build folder of this process (tests and one-off builds; ``prepare`` uses the resumable one)."""
    data_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(data_root, name)
    build = data_root / f"{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build.mkdir()
    return build


def resumable_build_dir(data_root: Path, name: str) -> Path:
    """``<name>.partial``: one fixed build folder per dataset, so a rerun finds what a killed prepare wrote.
    Only the holder of the dataset's prepare lock may use it."""
    data_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(data_root, name)
    build = data_root / f"{name}.partial"
    build.mkdir(exist_ok=True)
    return build


def claim_build(build: Path, key: dict[str, Any]) -> str:
    """Keep what ``build`` holds if it was made from ``key``, else empty it (but ``raw``); the build's fingerprint."""
    key = {**key, "store_format": STORE_FORMAT, "shard_images": shards.SHARD_IMAGES,
           "finebench_version": finebench.__version__}
    text = json.dumps(key, sort_keys=True, default=str)
    path = build / BUILD_KEY_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        for entry in build.iterdir():
            if entry.name != "raw":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        path.with_suffix(".tmp").write_text(text, encoding="utf-8")
        os.replace(path.with_suffix(".tmp"), path)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def commit_build(build: Path, final: Path) -> None:
    """Put a complete build in place; an existing store is moved aside first and removed after."""
    if not (build / META_FILE).is_file():
        raise RuntimeError(f"refusing to commit {build}: it has no {META_FILE}")
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(build, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
