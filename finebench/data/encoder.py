"""``encode_image`` over a stream of images, in this process or in worker processes, in order."""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

from finebench.data import images as image_codec
from finebench.data.builders.base import ImageSource

POOL_MIN_IMAGES = 2000
"""Splits smaller than this are encoded in-process: starting worker processes would cost more than they save."""
TASK_IMAGES = 32
"""Images per task sent to a worker: fewer round trips, still fine-grained enough to keep every worker busy."""


def default_workers() -> int:
    """The cores this process may use (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def encode_many(images: list[ImageSource], max_side: int | None, short_side: int | None) -> list[tuple]:
    """Per-image work of one task, in a worker: ``("ok", bytes or None when unchanged input bytes, size)``
    or ``("error", message)`` so the caller can name the image. Unchanged bytes are not sent back."""
    done: list[tuple] = []
    for image in images:
        try:
            data, size = image_codec.encode_image(image, max_side, short_side)
        except OSError as error:  # missing file, unreadable or not an image (PIL's error is an OSError)
            done.append(("error", str(error)))
            continue
        done.append(("ok", None if data is image else data, size))
    return done


def image_bytes(image: ImageSource, outcome: tuple) -> bytes:
    """The bytes to store for ``image`` given its ``encode_many`` outcome."""
    data = outcome[1]
    return image if data is None else data  # type: ignore[return-value]


class Encoder:
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

    @property
    def resizes(self) -> bool:
        return bool(self.max_side or self.short_side)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def start(self):
        """The worker pool, started on first use and kept for the next split."""
        if self._pool is None:
            import multiprocessing

            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self._pool

    def map(self, items: Iterable[tuple[Any, ImageSource]], size: int | None) -> Iterator[tuple[Any, ImageSource, tuple]]:
        """(key, image, result) per item, in order; ``result`` as ``encode_many`` gives it."""
        if self.workers == 1 or not self.resizes or (size is not None and size < POOL_MIN_IMAGES):
            for key, image in items:
                yield key, image, encode_many([image], self.max_side, self.short_side)[0]
            return
        pool = self.start()
        pending: collections.deque = collections.deque()
        iterator = iter(items)
        while True:
            while len(pending) < 4 * self.workers:
                group = list(itertools.islice(iterator, TASK_IMAGES))
                if not group:
                    break
                images = [image for _, image in group]
                pending.append((group, pool.apply_async(encode_many, (images, self.max_side, self.short_side))))
            if not pending:
                return
            group, result = pending.popleft()
            for (key, image), outcome in zip(group, result.get()):
                yield key, image, outcome
