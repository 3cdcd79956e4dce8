"""Streamed datasets (iNat): the image archives read once, in archive order, into a stage on disk; then each
split written from the stage in its annotation file's order, so a store is the same whether its images came
from the archives or an extracted folder.

Without resizing, the per-image work is a tar member read, a header read (``images.image_size``) and an
append to the stage; writing a split then reads each record batch's bytes with one positioned read where
they lie together in the stage (the usual case: archives list images in the annotations' order) and hands
them to Arrow as one buffer, not as a Python object per image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from finebench.data import images as image_codec
from finebench.data import shards
from finebench.data.builders.base import ParsedDataset, StreamedSplit
from finebench.data.encoder import Encoder, image_bytes
from finebench.data.store import GROUP_COLUMN
from finebench.errors import FinebenchError

STAGE_DIR = ".stage"
"""Where a streamed dataset's images wait, in archive order, until each split is written in its own order."""
ROW_BITS = 40
"""A streamed image's key is ``split << ROW_BITS | row``: one small int per listed image."""
OPEN_STAGE_FILES = 64
"""Stage files kept open while a split is written (its rows may be spread over all of them)."""
STAGE_BUFFER = 1 << 20
"""Write buffer of a stage file: one system call per MiB of images, not per 8 KiB (Python's default)."""


class Stage:
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
        for split in np.unique(records[:, 0]).tolist():
            mine = records[records[:, 0] == split]
            self.where[split][mine[:, 1]] = np.column_stack([np.full(len(mine), shard), mine[:, 2:]])
        self.staged += len(records)

    def seen(self, split: int, row: int) -> bool:
        return bool(self.where[split][row, 0] >= 0)

    def add(self, split: int, row: int, data: bytes, size: tuple[int, int]) -> None:
        if self._handle is None:
            self._handle = open(self.folder / f"stage-{self.shards:06d}.bin", "wb", buffering=STAGE_BUFFER)  # noqa: SIM115
            self._offset = 0
        self._handle.write(data)
        self._records.append((split, row, self._offset, len(data), *size))
        self.where[split][row, 0] = -2  # seen; placed when its shard is finished
        self._offset += len(data)
        if len(self._records) == shards.SHARD_IMAGES:
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


class _Locator:
    """(split, row) of an archive member, or ``None`` when no split lists it.

    Archives usually hold a split's images in its annotation file's order: while they do, each member is
    compared with the next listed name, and no index is built. At the first member out of that order a
    dict of every listed name is made (once) and used from then on."""

    def __init__(self, members_of: list[list[str]]) -> None:
        self.members_of = members_of
        self.split = self.row = 0
        self.key_of: dict[str, int] | None = None

    def __call__(self, name: str) -> tuple[int, int] | None:
        if self.key_of is None:
            while self.split < len(self.members_of) and self.row >= len(self.members_of[self.split]):
                self.split, self.row = self.split + 1, 0
            if self.split < len(self.members_of) and self.members_of[self.split][self.row] == name:
                self.row += 1
                return self.split, self.row - 1
            self.key_of = {member: split << ROW_BITS | row for split, members in enumerate(self.members_of)
                           for row, member in enumerate(members)}
        key = self.key_of.get(name)
        return None if key is None else (key >> ROW_BITS, key & ((1 << ROW_BITS) - 1))


def stage_archives(parsed: ParsedDataset, stage: Stage, encoder: Encoder, on_images) -> None:
    """Read every archive once, in order, keeping the listed images (after those already staged)."""
    from finebench.data.download import stream_tar

    stream = parsed.stream
    assert stream is not None
    names = list(parsed.splits)
    locate = _Locator([parsed.splits[split].members for split in names])  # type: ignore[attr-defined]
    skip = stage.staged
    listed = 0
    located: tuple[int, int] | None = None

    def wanted(name: str) -> bool:
        nonlocal listed, located
        located = locate(name)
        if located is None:
            return False
        listed += 1
        return listed > skip

    def images() -> Iterator[tuple[tuple[int, int, str], bytes]]:
        for archive in stream.archives:
            for name, data in stream_tar(archive, wanted):  # wanted(name) has just located this member
                if located is None:
                    if stream.is_image(name):
                        raise stream.unlisted(name)
                    continue
                if data is None:  # staged by the interrupted prepare
                    continue
                split_id, row = located
                if stage.seen(split_id, row):
                    raise FinebenchError(f"{archive}: member {name} appears twice (an image is stored once)")
                yield (split_id, row, name), data

    if not encoder.resizes:  # the bytes as they are: only the header is read, here (no hand-off to a process)
        for (split_id, row, name), data in images():
            try:
                size = image_codec.image_size(data)
            except OSError as error:
                raise FinebenchError(f"cannot read image {name} of split {names[split_id]!r}: {error}") from None
            stage.add(split_id, row, data, size)
            on_images(1)
    else:
        for (split_id, row, name), image, outcome in encoder.map(images(), None):
            if outcome[0] == "error":
                raise FinebenchError(f"cannot read image {name} of split {names[split_id]!r}: {outcome[1]}")
            stage.add(split_id, row, image_bytes(image, outcome), outcome[2])
            on_images(1)
    stage.finish_shard()
    for split_id, split in enumerate(names):
        missing = np.flatnonzero(stage.where[split_id][:, 0] < 0)
        if len(missing):
            raise stream.missing(split, parsed.splits[split].members[missing[0]], len(missing))  # type: ignore[attr-defined]


def _file_name(member: str) -> str:
    """``PurePosixPath(member).name``, without building a path object for the usual plain name."""
    name = member.rpartition("/")[2]
    if name in ("", ".") or "//" in member or "/./" in member:
        return PurePosixPath(member).name
    return name


class _StageReader:
    """Positioned reads of staged bytes, with a bounded number of stage files open."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.handles: dict[int, int] = {}

    def _handle(self, shard: int) -> int:
        if shard not in self.handles:
            if len(self.handles) >= OPEN_STAGE_FILES:
                os.close(self.handles.pop(next(iter(self.handles))))
            self.handles[shard] = os.open(self.folder / f"stage-{shard:06d}.bin", os.O_RDONLY)
        return self.handles[shard]

    def read(self, block: np.ndarray):
        """The bytes of the rows ``block`` (stage shard, offset, length, ...) as a pyarrow binary array:
        one read when they lie one after another in one stage file, else one read per row."""
        import pyarrow as pa

        shard, offsets, lengths = block[:, 0], block[:, 1], block[:, 2]
        together = (shard == shard[0]).all() and (offsets[1:] == offsets[:-1] + lengths[:-1]).all()
        if not together:
            return [os.pread(self._handle(int(s)), int(n), int(o)) for s, o, n in block[:, :3].tolist()]
        total = int(lengths.sum())
        data = os.pread(self._handle(int(shard[0])), total, int(offsets[0]))
        if len(data) != total:
            raise FinebenchError(f"{self.folder}: stage file {int(shard[0])} is shorter than its index says")
        ends = np.zeros(len(block) + 1, np.int32)
        np.cumsum(lengths, out=ends[1:])
        return pa.Array.from_buffers(pa.binary(), len(block), [None, pa.py_buffer(ends), pa.py_buffer(data)])

    def close(self) -> None:
        for handle in self.handles.values():
            os.close(handle)
        self.handles = {}


def write_streamed_split(
    split: StreamedSplit, split_path: Path, features, stage: Stage, where: np.ndarray, on_images, fingerprint: str
) -> shards.SplitStats:
    """A split in its own order from the stage, shard by shard, a record batch at a time."""
    writer = shards.ShardWriter(split_path, features)
    done, stats = writer.finished()
    on_images(stats.count)
    reader = _StageReader(stage.folder)
    with_groups = GROUP_COLUMN in writer.other_columns

    def batches(start: int, stop: int) -> Iterator[shards.Batch]:
        for first in range(start, stop, shards.WRITER_BATCH):
            last = min(stop, first + shards.WRITER_BATCH)
            block = where[first:last]
            columns = {"label": split.labels[first:last]}
            if with_groups:
                columns[GROUP_COLUMN] = split.groups[first:last]  # type: ignore[index]
            paths = [_file_name(member) for member in split.members[first:last]]
            yield shards.Batch(reader.read(block), paths, columns, block[:, 3], block[:, 4])
            on_images(last - first)

    per_shard = shards.SHARD_IMAGES
    count = max(done, -(-len(split) // per_shard))
    try:
        for index in range(done, count):
            stats.merge(writer.write(index, batches(index * per_shard, min(len(split), (index + 1) * per_shard))))
    finally:
        reader.close()
    writer.assemble(count, fingerprint, stats)
    return stats


def check_streamed(parsed: ParsedDataset, num_classes: int, num_groups: int | None) -> None:
    """Labels and groups of every streamed split in range, before any archive is read."""
    for split, streamed in parsed.splits.items():
        labels = np.asarray(streamed.labels)  # type: ignore[attr-defined]
        if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
            raise FinebenchError(f"label {int(labels.max())} outside 0..{num_classes - 1} while writing {split}")
        groups = streamed.groups  # type: ignore[attr-defined]
        if num_groups is not None and (groups is None or (len(groups) and not (0 <= groups.min() and groups.max() < num_groups))):
            raise FinebenchError(f"group outside 0..{num_groups - 1} while writing {split}")
