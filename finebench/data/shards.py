"""A split written as numbered Arrow shards, and turned into the folder ``Dataset.save_to_disk`` writes.

Each shard holds ``SHARD_IMAGES`` rows in record batches of ``WRITER_BATCH``, built column by column with
pyarrow: the layout and the values ``datasets``' ``ArrowWriter`` writes, without its per-row Python
encoding. A shard exists under its name only once complete (written as ``.tmp``, its statistics saved,
then renamed), so after a kill the finished shards are exactly the files present.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finebench.atomic import atomic_write_json

SHARD_IMAGES = 1000
"""Images per shard: what an interrupted prepare redoes at most, and (with ``WRITER_BATCH``) what bounds its
memory. 1000 keeps the shard count of a 2.7-million-image split in the thousands, not the millions."""
WRITER_BATCH = 100
"""Rows per Arrow record batch (``datasets`` writes image sets in 100s too)."""


class SplitStats:
    """Count and side lengths of a split's images, for meta.json's ``image_stats`` (at most two distinct
    sizes are kept: one says the split is uniform, two that it is not)."""

    def __init__(self) -> None:
        self.count = 0
        self.min_side: int | None = None
        self.max_side = 0
        self.sizes: set[tuple[int, int]] = set()

    def add(self, size: tuple[int, int]) -> None:
        self.count += 1
        self.max_side = max(self.max_side, *size)
        self.min_side = min(size) if self.min_side is None else min(self.min_side, *size)
        if len(self.sizes) < 2:
            self.sizes.add(size)

    def add_many(self, widths: np.ndarray, heights: np.ndarray) -> None:
        """``add`` for each (width, height), without a Python call per image."""
        if not len(widths):
            return
        self.count += len(widths)
        self.max_side = max(self.max_side, int(widths.max()), int(heights.max()))
        low = min(int(widths.min()), int(heights.min()))
        self.min_side = low if self.min_side is None else min(self.min_side, low)
        if len(self.sizes) < 2:
            pairs = np.unique(np.stack([widths, heights], axis=1), axis=0)[:2]
            for width, height in pairs.tolist():
                if len(self.sizes) < 2:
                    self.sizes.add((width, height))

    def merge(self, other: SplitStats) -> None:
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
    def from_json(cls, data: dict[str, Any]) -> SplitStats:
        stats = cls()
        stats.count, stats.min_side, stats.max_side = data["count"], data["min_side"], data["max_side"]
        stats.sizes = {tuple(s) for s in data["sizes"]}
        return stats


def split_stats_path(split_path: Path) -> Path:
    """Where a written split's image statistics wait for meta.json (removed once it is written)."""
    return split_path.with_name(f".{split_path.name}.stats.json")


def _replace_json(path: Path, payload: dict[str, Any]) -> None:
    """Written beside and renamed over ``path``: whole or absent after a kill. Not fsynced (``atomic_write_json``
    is): the shard it describes is not either, so a sync (about 3 ms a shard here) would buy nothing."""
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(temporary, path)


@dataclass
class Batch:
    """One record batch's columns: the images' bytes (a pyarrow binary array or a list of bytes), their file
    names, the other columns by name, and the images' sizes."""

    images: Any
    paths: Sequence[str | None]
    columns: dict[str, Any]
    widths: np.ndarray
    heights: np.ndarray


def row_batches(rows: Iterable[tuple[dict[str, Any], tuple[int, int]]], columns: Sequence[str]) -> Iterator[Batch]:
    """(row, size) pairs, as the builders' examples give them, grouped into batches of ``WRITER_BATCH``."""
    buffered: list[tuple[dict[str, Any], tuple[int, int]]] = []

    def batch() -> Batch:
        sizes = np.asarray([size for _, size in buffered], np.int64).reshape(-1, 2)
        return Batch([r["image"]["bytes"] for r, _ in buffered], [r["image"]["path"] for r, _ in buffered],
                     {name: [r[name] for r, _ in buffered] for name in columns}, sizes[:, 0], sizes[:, 1])

    for item in rows:
        buffered.append(item)
        if len(buffered) == WRITER_BATCH:
            yield batch()
            buffered = []
    if buffered:
        yield batch()


class ShardWriter:
    """One split written as numbered Arrow shards of ``SHARD_IMAGES`` rows in ``<build>/<split>.shards/``;
    ``assemble`` turns them into the layout ``Dataset.save_to_disk`` writes."""

    def __init__(self, split_path: Path, features) -> None:
        self.split_path, self.features = split_path, features
        self.folder = split_path.with_name(split_path.name + ".shards")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.other_columns = [name for name in features.arrow_schema.names if name != "image"]

    def _arrow(self, index: int) -> Path:
        return self.folder / f"shard-{index:06d}.arrow"

    def finished(self) -> tuple[int, SplitStats]:
        """How many shards are complete (consecutive from the first) and their statistics together."""
        stats, index = SplitStats(), 0
        while self._arrow(index).is_file():
            stats.merge(SplitStats.from_json(json.loads(self._arrow(index).with_suffix(".json").read_text())))
            index += 1
        return index, stats

    def write(self, index: int, batches: Iterable[Batch]) -> SplitStats:
        """Write one shard; complete, or absent if this raises."""
        import pyarrow as pa

        stats = SplitStats()
        schema = self.features.arrow_schema
        image_type = schema.field("image").type
        temporary = self._arrow(index).with_suffix(".tmp")
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                images = batch.images if isinstance(batch.images, pa.Array) else pa.array(batch.images, pa.binary())
                struct = pa.StructArray.from_arrays([images, pa.array(batch.paths, pa.string())], fields=list(image_type))
                arrays = [struct, *(pa.array(batch.columns[name], schema.field(name).type) for name in self.other_columns)]
                writer.write_batch(pa.record_batch(arrays, schema=schema))
                stats.add_many(batch.widths, batch.heights)
        _replace_json(self._arrow(index).with_suffix(".json"), stats.to_json())
        os.replace(temporary, self._arrow(index))
        return stats

    def assemble(self, count: int, fingerprint: str, stats: SplitStats) -> None:
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
        atomic_write_json(split_stats_path(self.split_path), stats.to_json())
        os.replace(self.folder, self.split_path)
