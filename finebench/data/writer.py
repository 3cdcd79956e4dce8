"""Writing a parsed dataset into a build folder: every split, then meta.json (last, on purpose).

Each split is written in shards (``shards.py``), so memory stays flat whatever the split's size and a killed
prepare, run again, keeps the finished shards. Why not ``Dataset.from_generator`` + ``save_to_disk`` as
before: it writes every image twice (a cache, then the copy) and cannot resume; the shards are the files
``save_to_disk`` would write, in its layout, and hold the same rows (``tests/test_prepare_stream.py``
checks the digests of stores written before). Streamed datasets go through the stage (``staging.py``).
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import finebench
from finebench.atomic import atomic_write_json
from finebench.data import shards, staging
from finebench.data.builders.base import Example, ImageSource, ParsedDataset
from finebench.data.encoder import Encoder, image_bytes
from finebench.data.store import GROUP_COLUMN, META_FILE, STORE_FORMAT
from finebench.errors import FinebenchError


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
    encoder: Encoder,
    on_images,
    num_groups: int | None = None,
    fingerprint: str = "",
) -> shards.SplitStats:
    """Write a split shard by shard, starting after the shards an interrupted prepare finished."""
    split = split_path.name
    writer = shards.ShardWriter(split_path, features)
    done, stats = writer.finished()
    if done:
        on_images(stats.count)
    size = len(examples) if hasattr(examples, "__len__") else None  # type: ignore[arg-type]
    start = done * shards.SHARD_IMAGES
    if isinstance(examples, Sequence):  # skip by index: a lazy builder (crops) would otherwise make each skipped one
        rest: Iterator[tuple[int, Example]] = ((index, examples[index]) for index in range(start, len(examples)))
    else:
        rest = itertools.islice(enumerate(examples), start, None)

    def checked() -> Iterator[tuple[tuple[int, Example], ImageSource]]:
        for index, example in rest:
            _check_example(example, index, split, num_classes, num_groups)
            yield (index, example), example.image

    encoded = encoder.map(checked(), None if size is None else size - start)

    def rows(items: Iterator[tuple]) -> Iterator[tuple[dict[str, Any], tuple[int, int]]]:
        for (index, example), image, outcome in items:
            if outcome[0] == "error":
                where = image if isinstance(image, Path) else f"example {index}"
                raise FinebenchError(f"cannot read image {where} of split {split!r}: {outcome[1]}")
            name = image.name if isinstance(image, Path) else None
            row = {"image": {"bytes": image_bytes(image, outcome), "path": name}, "label": int(example.label)}
            if num_groups is not None:
                row[GROUP_COLUMN] = int(example.group)
            on_images(1)
            yield row, outcome[2]

    index = done
    while (first := next(encoded, None)) is not None:
        shard_rows = rows(itertools.chain([first], itertools.islice(encoded, shards.SHARD_IMAGES - 1)))
        stats.merge(writer.write(index, shards.row_batches(shard_rows, writer.other_columns)))
        index += 1
    writer.assemble(index, fingerprint, stats)
    return stats


class _Progress:
    """Counters of images done with images/s and ETA; the display is updated at most 10 times a second,
    because rich's bookkeeping per call costs more than storing a small image does."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=quiet,
        )

    def task(self, description: str, total: int | None):
        progress, quiet = self.progress, self.quiet
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
            rate = progress.tasks[[t.id for t in progress.tasks].index(handle)].speed
            progress.update(handle, rate=f"{rate:,.0f} images/s" if rate else "")

        return advance


def _finished_stats(split_path: Path) -> shards.SplitStats:
    return shards.SplitStats.from_json(json.loads(shards.split_stats_path(split_path).read_text()))


def _write_streamed(parsed: ParsedDataset, build: Path, features, encoder: Encoder, num_groups: int | None,
                    progress: _Progress, fingerprint: str) -> dict[str, shards.SplitStats]:
    staging.check_streamed(parsed, len(parsed.classes), num_groups)
    stage = staging.Stage(build / staging.STAGE_DIR, [len(split) for split in parsed.splits.values()])
    try:
        complete = build / staging.STAGE_DIR / "complete"
        if not complete.is_file():  # every archive read to its end marker, every listed image found
            total = sum(len(split) for split in parsed.splits.values())
            staging.stage_archives(parsed, stage, encoder, progress.task("reading archives", total))
            complete.touch()
    finally:
        stage.close()
    all_stats = {}
    for split_id, (split, streamed) in enumerate(parsed.splits.items()):
        if (build / split).is_dir():  # written before an interruption
            all_stats[split] = _finished_stats(build / split)
            continue
        all_stats[split] = staging.write_streamed_split(
            streamed, build / split, features, stage, stage.where[split_id],  # type: ignore[arg-type]
            progress.task(f"writing {split}", len(streamed)), f"{fingerprint}-{split}",
        )
    shutil.rmtree(build / staging.STAGE_DIR)
    return all_stats


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

    if len(set(parsed.classes)) != len(parsed.classes):
        raise FinebenchError(f"dataset {meta.get('name')!r} has duplicate class names; class names must be unique")
    columns = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(parsed.classes))}
    grouping = parsed.grouping
    if grouping is not None:
        columns[GROUP_COLUMN] = datasets.ClassLabel(names=list(grouping.names))
    features = datasets.Features(columns)
    num_groups = len(grouping.names) if grouping is not None else None
    encoder = Encoder(workers, max_side, short_side)
    progress = _Progress(quiet)
    with progress.progress:
        try:
            if parsed.stream is not None:
                all_stats = _write_streamed(parsed, build, features, encoder, num_groups, progress, fingerprint)
            else:
                all_stats = {}
                for split, examples in parsed.splits.items():
                    if (build / split).is_dir():  # written before an interruption
                        all_stats[split] = _finished_stats(build / split)
                        continue
                    total = len(examples) if hasattr(examples, "__len__") else None
                    all_stats[split] = _write_split(
                        examples, build / split, features, len(parsed.classes), encoder,
                        progress.task(f"writing {split}", total), num_groups, f"{fingerprint}-{split}",
                    )
        finally:
            encoder.close()
    split_sizes: dict[str, int] = {}
    image_stats: dict[str, Any] = {}
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
    atomic_write_json(build / META_FILE, full_meta)
    for split in all_stats:
        shards.split_stats_path(build / split).unlink()
    return full_meta
