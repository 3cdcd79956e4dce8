"""The prepared store: one Hugging Face ``datasets`` Arrow folder per split plus ``meta.json``.

Layout: ``<data_root>/<name>/<split>/`` (``Dataset.save_to_disk``) with columns
``image`` (``datasets.Image``, encoded bytes) and ``label`` (``ClassLabel`` in the dataset's
official id order), plus ``group`` (``ClassLabel``, e.g. iNat's supercategory) for datasets whose
builder gives one, and ``<data_root>/<name>/meta.json``.

A store is complete exactly when ``meta.json`` exists: it is built in
``<name>.partial-<pid>-<random>``, ``meta.json`` is written last, and the folder gets its real
name by one rename. An interrupted prepare therefore never leaves something that looks done,
and ``--force`` swaps the old store out only once the new one is complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import finebench
from finebench.atomic import atomic_write_json
from finebench.data.builders.base import Example, ImageSource, ParsedDataset
from finebench.errors import FinebenchError

META_FILE = "meta.json"
GROUP_COLUMN = "group"
"""The optional per-image group column (iNat's supercategory); meta.json ``groups`` names its values."""
STORE_FORMAT = 1
"""Version of this layout and meta.json schema (meta ``version``); bump on incompatible change."""


def store_dir(data_root: Path, name: str) -> Path:
    return Path(data_root) / name


def is_prepared(data_root: Path, name: str) -> bool:
    return (store_dir(data_root, name) / META_FILE).is_file()


def prepare_command(name: str, data_root: Path, *, force: bool = False) -> str:
    """The command that (re)builds a store, with the data root it lives in: a hint that left out
    ``--data-root`` would rebuild the default root's store, not the broken one."""
    return f"finebench prepare {name} --data-root {Path(data_root)}" + (" --force" if force else "")


def read_meta(data_root: Path, name: str) -> dict[str, Any]:
    path = store_dir(data_root, name) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FinebenchError(
            f"dataset {name!r} is not prepared in {Path(data_root)}: run `{prepare_command(name, data_root)}`, "
            "or point --data-root or FINEBENCH_DATA at the folder where you prepared it"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FinebenchError(f"{path} is not valid JSON ({error}): rerun `{prepare_command(name, data_root, force=True)}`") from error


def check_store_info(meta: dict[str, Any], name: str, data_root: Path) -> None:
    """Refuse a store whose ``info`` lacks what its dataset now promises (``DatasetSpec.store_info``)."""
    from finebench.data.registry import get_spec

    try:
        promised = get_spec(name).store_info
    except FinebenchError:  # a store of no registered dataset (the tests' own): nothing promised
        return
    info = meta.get("info") or {}
    for key, expected in promised.items():
        if info.get(key) != expected:
            found = "missing" if key not in info else repr(info[key])
            raise FinebenchError(
                f"{store_dir(data_root, name) / META_FILE}: info {key!r} is {found}, expected {expected!r} "
                f"(prepared by another finebench version): rebuild it with `{prepare_command(name, data_root, force=True)}`"
            )


def meta_digest(data_root: Path, name: str) -> str | None:
    """``sha256:<hex>`` of the store's meta.json, which names one prepared build (its sources'
    checksums, split sizes, creation time): what a run records to say which data it trained on."""
    import hashlib

    path = store_dir(data_root, name) / META_FILE
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_json(path, payload)


# ---- images ---------------------------------------------------------------------------------


def _encode_array(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _resize_if_needed(data: bytes, max_side: int | None, short_side: int | None = None) -> tuple[bytes, tuple[int, int]]:
    """Shrink so the longest side is at most ``max_side`` and the shortest at most ``short_side``
    (never enlarge); JPEGs stay JPEG (q95), anything else becomes PNG."""
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        scale = min(max_side / max(size) if max_side else 1.0, short_side / min(size) if short_side else 1.0)
        if scale >= 1:
            return data, size
        new_size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        is_jpeg = image.format == "JPEG"
        resized = image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).resize(
            new_size, Image.BICUBIC, reducing_gap=3.0
        )
    buffer = io.BytesIO()
    if is_jpeg:
        resized.save(buffer, format="JPEG", quality=95)
    else:
        resized.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), new_size


def encode_image(
    image: ImageSource, max_side: int | None = None, short_side: int | None = None
) -> tuple[bytes, tuple[int, int]]:
    """Encoded bytes and (width, height). File and byte inputs are kept as they are unless resized.

    ``short_side`` stores images at training scale (256 for the 224 recipes, which resize the
    shorter side to 256 anyway): every later decode is then cheaper, on the CPU and on the GPU."""
    if isinstance(image, Path):
        data = image.read_bytes()
    elif isinstance(image, bytes):
        data = image
    elif isinstance(image, np.ndarray):
        data = _encode_array(image)
    elif isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
    else:
        raise TypeError(f"unsupported image source {type(image).__name__}")
    if max_side is not None or short_side is not None:
        return _resize_if_needed(data, max_side, short_side)
    if isinstance(image, np.ndarray):
        return data, (image.shape[1], image.shape[0])
    with Image.open(io.BytesIO(data)) as opened:  # header only: cheap
        return data, opened.size


# ---- writing --------------------------------------------------------------------------------


class _SplitStats:
    def __init__(self) -> None:
        self.count = 0
        self.min_side = None
        self.max_side = 0
        self.sizes: set[tuple[int, int]] = set()

    def add(self, size: tuple[int, int]) -> None:
        self.count += 1
        self.max_side = max(self.max_side, *size)
        self.min_side = min(size) if self.min_side is None else min(self.min_side, *size)
        if len(self.sizes) < 2:
            self.sizes.add(size)


def _write_split(
    examples: Iterable[Example],
    split_path: Path,
    features,
    num_classes: int,
    max_side: int | None,
    cache_dir: Path,
    on_example,
    short_side: int | None = None,
    num_groups: int | None = None,
) -> _SplitStats:
    import datasets

    stats = _SplitStats()

    def generate() -> Iterator[dict[str, Any]]:
        for example in examples:
            if not 0 <= int(example.label) < num_classes:
                raise FinebenchError(f"label {example.label} outside 0..{num_classes - 1} while writing {split_path.name}")
            if num_groups is not None and (example.group is None or not 0 <= int(example.group) < num_groups):
                raise FinebenchError(
                    f"group {example.group} outside 0..{num_groups - 1} while writing {split_path.name} (example {stats.count})"
                )
            try:
                data, size = encode_image(example.image, max_side, short_side)
            except OSError as error:  # missing file, unreadable or not an image (PIL's error is an OSError)
                where = example.image if isinstance(example.image, Path) else f"example {stats.count}"
                raise FinebenchError(f"cannot read image {where} of split {split_path.name!r}: {error}") from error
            stats.add(size)
            on_example()
            name = example.image.name if isinstance(example.image, Path) else None
            row = {"image": {"bytes": data, "path": name}, "label": int(example.label)}
            if num_groups is not None:
                row[GROUP_COLUMN] = int(example.group)
            yield row

    # An explicit fingerprint stops datasets from hashing the generator (and every example it closes over).
    try:
        dataset = datasets.Dataset.from_generator(
            generate, features=features, cache_dir=str(cache_dir), fingerprint=uuid.uuid4().hex
        )
    except datasets.exceptions.DatasetGenerationError as error:
        # datasets wraps whatever the builder raised; users should see the builder's own message.
        cause = error.__cause__ or error.__context__
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    dataset.save_to_disk(str(split_path))
    del dataset
    shutil.rmtree(cache_dir, ignore_errors=True)  # save_to_disk copied it; keep peak disk near 1x
    return stats


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
    data_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(data_root, name)
    build = data_root / f"{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build.mkdir()
    return build


def write_store(
    parsed: ParsedDataset,
    build: Path,
    meta: dict[str, Any],
    *,
    max_side: int | None = None,
    quiet: bool = False,
    short_side: int | None = None,
) -> dict[str, Any]:
    """Write every split of ``parsed`` into ``build`` and then its meta.json (last, on purpose).

    ``meta`` carries what the caller knows (name, protocol, sources seen, ...); this adds the
    classes, split sizes, image size statistics, resize and creation facts. Returns the meta.
    """
    import datasets

    if len(set(parsed.classes)) != len(parsed.classes):
        raise FinebenchError(f"dataset {meta.get('name')!r} has duplicate class names; class names must be unique")
    columns = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(parsed.classes))}
    grouping = parsed.grouping
    if grouping is not None:
        columns[GROUP_COLUMN] = datasets.ClassLabel(names=list(grouping.names))
    features = datasets.Features(columns)
    split_sizes: dict[str, int] = {}
    image_stats: dict[str, Any] = {}
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=quiet
        ) as progress:
            for split, examples in parsed.splits.items():
                total = len(examples) if hasattr(examples, "__len__") else None
                task = progress.add_task(f"writing {split}", total=total)
                stats = _write_split(
                    examples,
                    build / split,
                    features,
                    len(parsed.classes),
                    max_side,
                    build / f".cache-{split}",
                    lambda: progress.advance(task),
                    short_side,
                    len(grouping.names) if grouping is not None else None,
                )
                split_sizes[split] = stats.count
                image_stats[split] = {
                    "min_side": stats.min_side,
                    "max_side": stats.max_side,
                    "uniform_size": list(next(iter(stats.sizes))) if len(stats.sizes) == 1 else None,
                }
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    sides = [s["max_side"] for s in image_stats.values() if s["max_side"]]
    uniform = {tuple(s["uniform_size"]) for s in image_stats.values() if s["uniform_size"]}
    full_meta = {
        **meta,
        "version": STORE_FORMAT,
        "classes": list(parsed.classes),
        "num_classes": len(parsed.classes),
        "splits": split_sizes,
        "image_max_side": max(sides) if sides else None,
        "image_size": list(uniform.pop()) if len(uniform) == 1 and all(s["uniform_size"] for s in image_stats.values()) else None,
        "image_stats": image_stats,
        "resize": {k: v for k, v in (("max_side", max_side), ("short_side", short_side)) if v} or None,
        "info": parsed.info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "finebench_version": finebench.__version__,
    }
    if grouping is not None:
        full_meta["groups"] = {
            "column": GROUP_COLUMN, "kind": grouping.kind, "names": list(grouping.names), "of_class": grouping.of_class,
        }
    write_json_atomic(build / META_FILE, full_meta)
    return full_meta


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
