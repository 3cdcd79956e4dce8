"""The prepared store: one Hugging Face ``datasets`` Arrow folder per split plus ``meta.json``.

Layout: ``<data_root>/<name>/<split>/`` (``Dataset.save_to_disk``) with columns
``image`` (``datasets.Image``, encoded bytes) and ``label`` (``ClassLabel`` in the dataset's
official id order), plus ``group`` (``ClassLabel``, e.g. iNat's supercategory) for datasets whose
builder gives one, and ``<data_root>/<name>/meta.json``.

A store is complete exactly when ``meta.json`` exists: it is built in ``<name>.partial``,
``meta.json`` is written last, and the folder gets its real name by one rename. An interrupted
prepare therefore never leaves something that looks done, and ``--force`` swaps the old store out
only once the new one is complete.

Each split is written in shards of ``SHARD_IMAGES`` rows (an Arrow file each, renamed into place when
complete), so memory stays flat whatever the split's size and a killed prepare, run again, keeps the
finished shards (``build.json`` says what they were made from; anything else starts over). Why not
``Dataset.from_generator`` + ``save_to_disk`` as before: it writes every image twice (a cache, then the
copy) and cannot resume; the shards are the files ``save_to_disk`` would write, in its layout, and
hold the same rows (``tests/test_prepare_stream.py`` checks the digests of stores written before).
Images streamed from archives (iNat) are first staged in archive order, then each split is written in
its annotation file's order, so a store is the same whether its images came from the archive or an
extracted folder.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

import finebench
from finebench.atomic import atomic_write_json
from finebench.data.builders.base import Example, ImageSource, ParsedDataset, StreamedSplit
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


def read_split(split_dir: Path):
    """A stored split as one memory-mapped ``pyarrow.Table`` (nothing copied, nothing decoded), read from
    the files its ``state.json`` lists, as ``datasets.load_from_disk`` reads them but without importing
    ``datasets`` (about a second of start-up for every run) or building a ``Dataset`` around it.
    Raises ``OSError``/``ValueError``/``KeyError``/``pyarrow.ArrowException`` on a damaged folder."""
    import pyarrow as pa

    state = json.loads((Path(split_dir) / "state.json").read_text(encoding="utf-8"))
    tables = [pa.ipc.open_stream(pa.memory_map(str(Path(split_dir) / entry["filename"]))).read_all()
              for entry in state["_data_files"]]
    return pa.concat_tables(tables) if len(tables) != 1 else tables[0]


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


# ---- writing ----------------------------------------------------------------------------------

SHARD_IMAGES = 1000
"""Images per shard: what an interrupted prepare redoes at most, and (with ``WRITER_BATCH``) what bounds its
memory. 1000 keeps the shard count of a 2.7-million-image split in the thousands, not the millions."""
WRITER_BATCH = 100
"""Rows buffered before the Arrow writer writes a record batch (``datasets`` writes image sets in 100s too)."""
POOL_MIN_IMAGES = 2 * SHARD_IMAGES
"""Splits smaller than this are encoded in-process: starting worker processes would cost more than they save."""
_TASK_IMAGES = 32
"""Images per task sent to a worker: fewer round trips, still fine-grained enough to keep every worker busy."""


def default_workers() -> int:
    """The cores this process may use (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _encode_many(images: list[ImageSource], max_side: int | None, short_side: int | None) -> list[tuple]:
    """Per-image work of one task, in a worker: ``("ok", bytes or None when unchanged input bytes, size)``
    or ``("error", message)`` so the caller can name the image. Unchanged bytes are not sent back."""
    done: list[tuple] = []
    for image in images:
        try:
            data, size = encode_image(image, max_side, short_side)
        except OSError as error:  # missing file, unreadable or not an image (PIL's error is an OSError)
            done.append(("error", str(error)))
            continue
        done.append(("ok", None if data is image else data, size))
    return done


class _Encoder:
    """``encode_image`` over a stream of images, in order, with at most a bounded number in flight.

    ``workers`` > 1 spreads the work over processes (``spawn``: forking a process that holds Arrow's
    and torch's threads can deadlock); the pool starts only once a split is large enough to pay for it,
    and only to re-encode (``max_side``/``short_side``): without that the per-image work is reading the
    header, which costs less than handing the bytes to another process and back (measured in
    benchmarks/prepare_speed.py: 0.65x the images/s of in-process with 2 workers).
    """

    def __init__(self, workers: int, max_side: int | None, short_side: int | None) -> None:
        self.workers, self.max_side, self.short_side = max(1, workers), max_side, short_side
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _start(self):
        if self._pool is None:
            import multiprocessing

            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self._pool

    def map(self, items: Iterable[tuple[Any, ImageSource]], size: int | None) -> Iterator[tuple[Any, ImageSource, tuple]]:
        """(key, image, result) per item, in order; ``result`` as ``_encode_many`` gives it."""
        if self.workers == 1 or not (self.max_side or self.short_side) or (size is not None and size < POOL_MIN_IMAGES):
            for key, image in items:
                yield key, image, _encode_many([image], self.max_side, self.short_side)[0]
            return
        import collections
        import itertools

        pool = self._start()
        pending: collections.deque = collections.deque()
        iterator = iter(items)
        while True:
            while len(pending) < 4 * self.workers:
                group = list(itertools.islice(iterator, _TASK_IMAGES))
                if not group:
                    break
                images = [image for _, image in group]
                pending.append((group, pool.apply_async(_encode_many, (images, self.max_side, self.short_side))))
            if not pending:
                return
            group, result = pending.popleft()
            for (key, image), outcome in zip(group, result.get()):
                yield key, image, outcome


def _image_bytes(image: ImageSource, outcome: tuple) -> bytes:
    data = outcome[1]
    return image if data is None else data  # type: ignore[return-value]


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

    def merge(self, other: _SplitStats) -> None:
        self.count += other.count
        self.max_side = max(self.max_side, other.max_side)
        if other.min_side is not None:
            self.min_side = other.min_side if self.min_side is None else min(self.min_side, other.min_side)
        for size in sorted(other.sizes):
            if len(self.sizes) < 2:
                self.sizes.add(size)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "min_side": self.min_side, "max_side": self.max_side,
                "sizes": sorted(list(s) for s in self.sizes)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _SplitStats:
        stats = cls()
        stats.count, stats.min_side, stats.max_side = data["count"], data["min_side"], data["max_side"]
        stats.sizes = {tuple(s) for s in data["sizes"]}
        return stats


def split_stats_path(split_path: Path) -> Path:
    """Where a written split's image statistics wait for meta.json (removed once it is written)."""
    return split_path.with_name(f".{split_path.name}.stats.json")


class _Shards:
    """One split written as numbered Arrow shards of ``SHARD_IMAGES`` rows in ``<build>/<split>.shards/``.

    A shard exists under its name only once complete (written as ``.tmp``, its statistics saved, then
    renamed), so after a kill the finished shards are exactly the files present: a rerun keeps them and
    redoes at most one shard. ``assemble`` turns them into the layout ``Dataset.save_to_disk`` writes.
    """

    def __init__(self, split_path: Path, features) -> None:
        self.split_path, self.features = split_path, features
        self.folder = split_path.with_name(split_path.name + ".shards")
        self.folder.mkdir(parents=True, exist_ok=True)

    def _arrow(self, index: int) -> Path:
        return self.folder / f"shard-{index:06d}.arrow"

    def finished(self) -> tuple[int, _SplitStats]:
        """How many shards are complete (consecutive from the first) and their statistics together."""
        stats, index = _SplitStats(), 0
        while self._arrow(index).is_file():
            stats.merge(_SplitStats.from_json(json.loads(self._arrow(index).with_suffix(".json").read_text())))
            index += 1
        return index, stats

    def write(self, index: int, rows: Iterable[tuple[dict[str, Any], tuple[int, int]]]) -> _SplitStats:
        """Write one shard from (row, size) pairs; complete, or absent if this raises.

        Record batches of ``WRITER_BATCH`` rows built column by column with pyarrow: the layout and the
        values ``datasets``' ``ArrowWriter`` writes, without its per-row Python encoding (which cost
        more than the rest of storing a small image)."""
        import pyarrow as pa

        stats = _SplitStats()
        schema = self.features.arrow_schema
        image_type = schema.field("image").type
        temporary = self._arrow(index).with_suffix(".tmp")
        columns = [name for name in schema.names if name != "image"]

        def batch(buffered: list[dict[str, Any]]) -> pa.RecordBatch:
            images = pa.StructArray.from_arrays(
                [pa.array([r["image"]["bytes"] for r in buffered], pa.binary()),
                 pa.array([r["image"]["path"] for r in buffered], pa.string())],
                fields=list(image_type),
            )
            arrays = [images, *(pa.array([r[name] for r in buffered], schema.field(name).type) for name in columns)]
            return pa.record_batch(arrays, schema=schema)

        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            buffered: list[dict[str, Any]] = []
            for row, size in rows:
                buffered.append(row)
                stats.add(size)
                if len(buffered) == WRITER_BATCH:
                    writer.write_batch(batch(buffered))
                    buffered = []
            if buffered:
                writer.write_batch(batch(buffered))
        write_json_atomic(self._arrow(index).with_suffix(".json"), stats.to_json())
        os.replace(temporary, self._arrow(index))
        return stats

    def assemble(self, count: int, fingerprint: str, stats: _SplitStats) -> None:
        """The split folder as ``save_to_disk`` lays it out (``load_from_disk`` reads it), by renaming:
        completed in ``<split>.shards/`` and given the split's name last, so a split folder is always whole
        (its statistics, for meta.json, saved beside it first)."""
        import datasets
        from datasets.utils.py_utils import asdict  # the one save_to_disk uses: it serialises Features

        if count == 0:  # an empty split is still one (empty) file, as save_to_disk writes it
            self.write(0, [])
            count = 1
        names = [f"data-{index:05d}-of-{count:05d}.arrow" for index in range(count)]
        for index, name in enumerate(names):
            self._arrow(index).with_suffix(".json").unlink()
            os.replace(self._arrow(index), self.folder / name)
        info = asdict(datasets.DatasetInfo(features=self.features))
        (self.folder / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
        state = {
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        write_json_atomic(split_stats_path(self.split_path), stats.to_json())
        os.replace(self.folder, self.split_path)


def _check_example(example: Example, index: int, split: str, num_classes: int, num_groups: int | None) -> None:
    if not 0 <= int(example.label) < num_classes:
        raise FinebenchError(f"label {example.label} outside 0..{num_classes - 1} while writing {split}")
    if num_groups is not None and (example.group is None or not 0 <= int(example.group) < num_groups):
        raise FinebenchError(f"group {example.group} outside 0..{num_groups - 1} while writing {split} (example {index})")


def _write_split(
    examples: Iterable[Example],
    split_path: Path,
    features,
    num_classes: int,
    encoder: _Encoder,
    on_images,
    num_groups: int | None = None,
    fingerprint: str = "",
) -> _SplitStats:
    """Write a split shard by shard, starting after the shards an interrupted prepare finished."""
    import itertools

    split = split_path.name
    shards = _Shards(split_path, features)
    done, stats = shards.finished()
    if done:
        on_images(stats.count)
    size = len(examples) if hasattr(examples, "__len__") else None  # type: ignore[arg-type]
    start = done * SHARD_IMAGES
    if isinstance(examples, Sequence):  # skip by index: a lazy builder (crops) would otherwise make each skipped one
        rest: Iterator[tuple[int, Example]] = ((index, examples[index]) for index in range(start, len(examples)))
    else:
        rest = itertools.islice(enumerate(examples), start, None)

    def checked() -> Iterator[tuple[tuple[int, Example], ImageSource]]:
        for index, example in rest:
            _check_example(example, index, split, num_classes, num_groups)
            yield (index, example), example.image

    encoded = encoder.map(checked(), None if size is None else size - done * SHARD_IMAGES)

    def rows(items: Iterator[tuple]) -> Iterator[tuple[dict[str, Any], tuple[int, int]]]:
        for (index, example), image, outcome in items:
            if outcome[0] == "error":
                where = image if isinstance(image, Path) else f"example {index}"
                raise FinebenchError(f"cannot read image {where} of split {split!r}: {outcome[1]}")
            name = image.name if isinstance(image, Path) else None
            row = {"image": {"bytes": _image_bytes(image, outcome), "path": name}, "label": int(example.label)}
            if num_groups is not None:
                row[GROUP_COLUMN] = int(example.group)
            on_images(1)
            yield row, outcome[2]

    index = done
    while (first := next(encoded, None)) is not None:
        stats.merge(shards.write(index, rows(itertools.chain([first], itertools.islice(encoded, SHARD_IMAGES - 1)))))
        index += 1
    shards.assemble(index, fingerprint, stats)
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


STAGE_DIR = ".stage"
"""Where a streamed dataset's images wait, in archive order, until each split is written in its own order."""
_ROW_BITS = 40
"""A streamed image's key is ``split << _ROW_BITS | row``: one small int per listed image."""


class _Stage:
    """Images read from archives, in archive order, as numbered pairs ``stage-N.bin`` (the bytes, one
    after another) and ``stage-N.npy`` (per image: split, row, offset, length, width, height).

    The ``.npy`` is written last and atomically, so the finished stage shards are those with one; a
    rerun reads the archives again but re-encodes nothing before the first unfinished shard.
    """

    def __init__(self, folder: Path, sizes: list[int]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.where = [np.full((size, 5), -1, np.int64) for size in sizes]
        """Per split and row: stage shard, offset, length, width, height (-1: not read yet)."""
        self.shards = 0
        self.staged = 0
        while (folder / f"stage-{self.shards:06d}.npy").is_file():
            self._index(self.shards, np.load(folder / f"stage-{self.shards:06d}.npy"))
            self.shards += 1
        self._records: list[tuple[int, ...]] = []
        self._handle = None
        self._offset = 0

    def _index(self, shard: int, records: np.ndarray) -> None:
        for split, row, offset, length, width, height in records.tolist():
            self.where[split][row] = (shard, offset, length, width, height)
        self.staged += len(records)

    def seen(self, split: int, row: int) -> bool:
        return bool(self.where[split][row, 0] >= 0)

    def add(self, split: int, row: int, data: bytes, size: tuple[int, int]) -> None:
        if self._handle is None:
            self._handle = open(self.folder / f"stage-{self.shards:06d}.bin", "wb")  # noqa: SIM115
            self._offset = 0
        self._handle.write(data)
        self._records.append((split, row, self._offset, len(data), *size))
        self.where[split][row] = (-2, 0, 0, 0, 0)  # seen; placed when its shard is finished
        self._offset += len(data)
        if len(self._records) == SHARD_IMAGES:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        records = np.asarray(self._records, np.int64).reshape(-1, 6)
        path = self.folder / f"stage-{self.shards:06d}.npy"
        with open(path.with_suffix(".tmp"), "wb") as handle:
            np.save(handle, records)
        os.replace(path.with_suffix(".tmp"), path)
        self._index(self.shards, records)
        self._records = []
        self.shards += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _stage_archives(parsed: ParsedDataset, stage: _Stage, encoder: _Encoder, on_images) -> None:
    """Read every archive once, in order, keeping the listed images (after those already staged)."""
    from finebench.data.download import stream_tar

    stream = parsed.stream
    assert stream is not None
    names = list(parsed.splits)
    key_of: dict[str, int] = {}
    for split_id, split in enumerate(names):
        for row, member in enumerate(parsed.splits[split].members):  # type: ignore[attr-defined]
            key_of[member] = split_id << _ROW_BITS | row
    skip = stage.staged
    listed = 0

    def wanted(name: str) -> bool:
        nonlocal listed
        if name not in key_of:
            return False
        listed += 1
        return listed > skip

    def images() -> Iterator[tuple[tuple[int, int, str], bytes]]:
        for archive in stream.archives:
            for name, data in stream_tar(archive, wanted):
                key = key_of.get(name)
                if key is None:
                    if stream.is_image(name):
                        raise stream.unlisted(name)
                    continue
                if data is None:  # staged by the interrupted prepare
                    continue
                split_id, row = key >> _ROW_BITS, key & ((1 << _ROW_BITS) - 1)
                if stage.seen(split_id, row):
                    raise FinebenchError(f"{archive}: member {name} appears twice (an image is stored once)")
                yield (split_id, row, name), data

    for (split_id, row, name), image, outcome in encoder.map(images(), None):
        if outcome[0] == "error":
            raise FinebenchError(f"cannot read image {name} of split {names[split_id]!r}: {outcome[1]}")
        stage.add(split_id, row, _image_bytes(image, outcome), outcome[2])
        on_images(1)
    stage.finish_shard()
    for split_id, split in enumerate(names):
        missing = np.flatnonzero(stage.where[split_id][:, 0] < 0)
        if len(missing):
            raise stream.missing(split, parsed.splits[split].members[missing[0]], len(missing))  # type: ignore[attr-defined]


def _write_streamed_split(
    split: StreamedSplit, split_path: Path, features, stage: _Stage, where: np.ndarray, on_images, fingerprint: str
) -> _SplitStats:
    """A split in its own order from the stage: one positioned read per image, shard by shard."""
    shards = _Shards(split_path, features)
    done, stats = shards.finished()
    on_images(stats.count)
    handles: dict[int, int] = {}

    def rows(start: int, stop: int) -> Iterator[tuple[dict[str, Any], tuple[int, int]]]:
        for row in range(start, stop):
            shard, offset, length, width, height = (int(v) for v in where[row])
            if shard not in handles:
                if len(handles) >= 64:
                    os.close(handles.pop(next(iter(handles))))
                handles[shard] = os.open(stage.folder / f"stage-{shard:06d}.bin", os.O_RDONLY)
            data = os.pread(handles[shard], length, offset)
            record = {"image": {"bytes": data, "path": PurePosixPath(split.members[row]).name},
                      "label": int(split.labels[row])}
            if split.groups is not None:
                record[GROUP_COLUMN] = int(split.groups[row])
            on_images(1)
            yield record, (width, height)

    try:
        index = done
        for index in range(done, -(-len(split) // SHARD_IMAGES)):
            stats.merge(shards.write(index, rows(index * SHARD_IMAGES, min(len(split), (index + 1) * SHARD_IMAGES))))
        count = max(done, -(-len(split) // SHARD_IMAGES))
    finally:
        for handle in handles.values():
            os.close(handle)
    shards.assemble(count, fingerprint, stats)
    return stats


def _check_streamed(parsed: ParsedDataset, num_classes: int, num_groups: int | None) -> None:
    for split, streamed in parsed.splits.items():
        labels = np.asarray(streamed.labels)  # type: ignore[attr-defined]
        if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
            raise FinebenchError(f"label {int(labels.max())} outside 0..{num_classes - 1} while writing {split}")
        groups = streamed.groups  # type: ignore[attr-defined]
        if num_groups is not None and (groups is None or (len(groups) and not (0 <= groups.min() and groups.max() < num_groups))):
            raise FinebenchError(f"group outside 0..{num_groups - 1} while writing {split}")


BUILD_KEY_FILE = "build.json"
"""In a build folder: what its shards were made from (files, options), so only the same build resumes."""


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
    import hashlib

    key = {**key, "store_format": STORE_FORMAT, "shard_images": SHARD_IMAGES, "finebench_version": finebench.__version__}
    text = json.dumps(key, sort_keys=True, default=str)
    path = build / BUILD_KEY_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        for entry in build.iterdir():
            if entry.name != "raw":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        path.with_suffix(".tmp").write_text(text, encoding="utf-8")
        os.replace(path.with_suffix(".tmp"), path)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_store(
    parsed: ParsedDataset,
    build: Path,
    meta: dict[str, Any],
    *,
    max_side: int | None = None,
    quiet: bool = False,
    short_side: int | None = None,
    workers: int = 1,
    fingerprint: str = "",
) -> dict[str, Any]:
    """Write every split of ``parsed`` into ``build`` and then its meta.json (last, on purpose).

    ``meta`` carries what the caller knows (name, protocol, sources seen, ...); this adds the
    classes, split sizes, image size statistics, resize and creation facts. Returns the meta.
    Shards an interrupted write into the same ``build`` finished are kept, not written again.
    ``workers`` processes do the per-image work; ``fingerprint`` names the build in each split's
    state.json (deterministic, so a resumed build equals an uninterrupted one).
    """
    import datasets
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if len(set(parsed.classes)) != len(parsed.classes):
        raise FinebenchError(f"dataset {meta.get('name')!r} has duplicate class names; class names must be unique")
    columns = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(parsed.classes))}
    grouping = parsed.grouping
    if grouping is not None:
        columns[GROUP_COLUMN] = datasets.ClassLabel(names=list(grouping.names))
    features = datasets.Features(columns)
    num_groups = len(grouping.names) if grouping is not None else None
    split_sizes: dict[str, int] = {}
    image_stats: dict[str, Any] = {}
    encoder = _Encoder(workers, max_side, short_side)
    speed = TextColumn("{task.fields[rate]}")
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), speed, TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), disable=quiet,
    ) as progress:

        def task(description: str, total: int | None):
            """A counter for the images done; the display is updated at most 10 times a second, because
            rich's bookkeeping per call costs more than storing a small image does."""
            handle = progress.add_task(description, total=total, rate="")
            pending, done, shown = [0], [0], [time.monotonic()]

            def advance(count: int) -> None:
                if quiet:
                    return
                pending[0] += count
                done[0] += count
                now = time.monotonic()
                if now - shown[0] < 0.1 and done[0] != total:
                    return
                progress.advance(handle, pending[0])
                pending[0], shown[0] = 0, now
                rate = progress._tasks[handle].speed
                progress.update(handle, rate=f"{rate:,.0f} images/s" if rate else "")

            return advance

        try:
            if parsed.stream is not None:
                _check_streamed(parsed, len(parsed.classes), num_groups)
                stage = _Stage(build / STAGE_DIR, [len(split) for split in parsed.splits.values()])
                try:
                    complete = build / STAGE_DIR / "complete"
                    if not complete.is_file():  # every archive read to its end marker, every listed image found
                        total = sum(len(split) for split in parsed.splits.values())
                        _stage_archives(parsed, stage, encoder, task("reading archives", total))
                        complete.touch()
                finally:
                    stage.close()
                all_stats = {}
                for split_id, (split, streamed) in enumerate(parsed.splits.items()):
                    if (build / split).is_dir():  # written before an interruption
                        all_stats[split] = _SplitStats.from_json(json.loads(split_stats_path(build / split).read_text()))
                        continue
                    stats = _write_streamed_split(
                        streamed, build / split, features, stage, stage.where[split_id],  # type: ignore[arg-type]
                        task(f"writing {split}", len(streamed)), f"{fingerprint}-{split}",
                    )
                    all_stats[split] = stats
                shutil.rmtree(build / STAGE_DIR)
            else:
                all_stats = {}
                for split, examples in parsed.splits.items():
                    if (build / split).is_dir():  # written before an interruption
                        all_stats[split] = _SplitStats.from_json(json.loads(split_stats_path(build / split).read_text()))
                        continue
                    total = len(examples) if hasattr(examples, "__len__") else None
                    stats = _write_split(
                        examples, build / split, features, len(parsed.classes), encoder,
                        task(f"writing {split}", total), num_groups, f"{fingerprint}-{split}",
                    )
                    all_stats[split] = stats
        finally:
            encoder.close()
    for split, stats in all_stats.items():
        split_sizes[split] = stats.count
        image_stats[split] = {
            "min_side": stats.min_side,
            "max_side": stats.max_side,
            "uniform_size": list(next(iter(stats.sizes))) if len(stats.sizes) == 1 else None,
        }
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
    for split in all_stats:
        split_stats_path(build / split).unlink()
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
