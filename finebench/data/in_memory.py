"""The in-memory path for small images: each split decoded once into a uint8 N×3×H×W tensor on the
training device and delivered in batches, the approach of the fastest CIFAR trainers (no per-sample
Python, no workers). The pixels are ``presets.InMemoryAugment``'s; this module only delivers them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from finebench.atomic import atomic_write
from finebench.data.columns import Columns, StoreDataset
from finebench.data.config import SMALL_IMAGE_MAX_SIDE
from finebench.data.presets import InMemoryAugment, Transform, rank_seed
from finebench.data.sampler import BatchShardSampler, SamplerFactory, train_sampler
from finebench.data.validation import ValidationChoice
from finebench.errors import FinebenchError

IN_MEMORY_MAX_BYTES = 2 * 2**30
"""``in_memory="auto"`` holds the splits in memory only below this many decoded bytes (CIFAR-10: 184 MB)."""
IN_MEMORY_CHOICES = ("auto", True, False)


class InMemoryLoader:
    """Batches of a split decoded once into a uint8 N×3×H×W tensor on the training device.

    Training order comes from the same ``BatchShardSampler`` as the worker path (call
    ``sampler.set_epoch``); crop offsets, flips and jitter come from ``generator`` (CPU, so the
    stream is the same on any device; the engine checkpoints it, so a resumed run repeats the
    uninterrupted one). Batches are (float32 B×3×H×W normalised, int64 B) on the images' device,
    like the worker path's.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        recipe: Transform,
        *,
        batch_size: int,
        seed: int,
        sampler: BatchShardSampler | None = None,
    ) -> None:
        self.images, self.labels, self.recipe, self.sampler = images, labels, recipe, sampler
        self.batch_size = sampler.local_batch if sampler is not None else batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.augment = InMemoryAugment(recipe, *images.shape[2:], images.device)
        self.normalise = self.augment.normalise

    # The statistics in the batch shape, for callers that undo the normalisation.
    mean = property(lambda self: self.normalise.mean)
    std = property(lambda self: self.normalise.std)

    def __len__(self) -> int:
        return self.sampler.steps if self.sampler is not None else -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.sampler.indices() if self.sampler is not None else torch.arange(len(self.labels))
        order = order.to(self.images.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.augment(self.images, index, self.generator), self.labels[index]


def _stack_uint8(batch: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    return torch.stack([image for image, _ in batch])


def _decode_split(split_dir: Path, transform: Transform, side: int, workers: int) -> np.ndarray:
    """Every image of one split as uint8 N×3×H×W, decoded (and resized) exactly as the worker path's
    test transform does; cached as ``<split>.u8-<H>x<W>.npy`` beside the split, which goes away
    with the store when it is prepared again."""
    cache = split_dir.parent / f"{split_dir.name}.u8-{side}x{side}.npy"
    if cache.is_file():
        try:
            return np.load(cache, mmap_mode="r")
        except (OSError, ValueError):  # truncated (a full disk, a killed copy): decode again and replace it
            pass
    dataset = StoreDataset(Columns([split_dir]), transform, seed=0)
    # A generator of its own: a DataLoader without one draws its workers' base seed from the global
    # torch RNG, which the run's dropout reads next, and only a process that finds no cache decodes
    # (on two workers, whichever reaches the store first), so the run would depend on the cache.
    loader = DataLoader(dataset, batch_size=512, num_workers=workers, collate_fn=_stack_uint8,
                        generator=torch.Generator())
    chunks = [batch.numpy() for batch in loader]
    array = np.concatenate(chunks) if chunks else np.zeros((0, 3, side, side), np.uint8)
    try:
        atomic_write(cache, lambda handle: np.save(handle, array))
    except OSError:  # a read-only store still works, only without the cache
        pass
    return array


def decoded(split_dirs: list[Path], transform: Transform, side: int, workers: int,
            device: torch.device) -> torch.Tensor:
    """The splits' images, unaugmented, as one uint8 N×3×H×W tensor on ``device``."""
    frozen = replace(transform, train=False, flip=False, jitter=None)
    arrays = [_decode_split(split_dir, frozen, side, workers) for split_dir in split_dirs]
    return torch.from_numpy(np.concatenate(arrays)).to(device)


def wants_in_memory(
    in_memory: str | bool, transform: Transform, side: int | None, meta: dict, split_dirs: list[Path], dataset: str
) -> bool:
    """Whether the run takes this path: forced (True), refused (False) or, for "auto", small images
    of one size whose splits fit in ``IN_MEMORY_MAX_BYTES``."""
    if in_memory not in IN_MEMORY_CHOICES:
        raise FinebenchError(f"in_memory={in_memory!r} is not valid: expected one of auto, True, False")
    small = transform.kind in ("cifar", "none") and side is not None and side <= SMALL_IMAGE_MAX_SIDE
    if in_memory is True and not small:
        raise FinebenchError(
            f"dataset {dataset!r}: in_memory needs small images of one size (cifar or none augmentation, "
            f"input_size <= {SMALL_IMAGE_MAX_SIDE}), got {transform.kind!r} at {side}"
        )
    if in_memory != "auto":
        return bool(in_memory)
    count = sum(int(meta.get("splits", {}).get(path.name, 0)) for path in split_dirs)
    return small and count * 3 * side**2 <= IN_MEMORY_MAX_BYTES


@dataclass
class InMemorySplits:
    """The in-memory path's loaders and what they hold."""

    train: InMemoryLoader
    test: InMemoryLoader
    train_size: int
    test_size: int
    validation: InMemoryLoader | None
    validation_size: int


def in_memory_loaders(
    train_dirs: list[Path], test_dirs: list[Path], train_transform: Transform, test_transform: Transform,
    side: int, *, batch_size: int, eval_batch_size: int | None, workers: int, seed: int, rank: int,
    world_size: int, device: torch.device, sampler_factory: SamplerFactory | None = None,
    choice: ValidationChoice | None = None, validation_dirs: list[Path] | None = None,
) -> InMemorySplits:
    """Train, test and validation loaders over the decoded splits, sharded as the worker path's."""
    labels = Columns(train_dirs).labels
    images = decoded(train_dirs, train_transform, side, workers, device)
    eval_batch = -(-(eval_batch_size or batch_size) // world_size)
    validation, validation_size = None, 0
    if choice is not None:
        # Non-padded shards, as the test split's: every validation image is evaluated once, by one worker.
        if choice.positions is not None:
            held = torch.from_numpy(choice.positions).to(device)
            val_images, val_labels = images[held], torch.from_numpy(labels[choice.positions]).to(device)
            keep = choice.train_positions(len(labels))
            images, labels = images[torch.from_numpy(keep).to(device)], labels[keep]
        else:
            val_images = decoded(validation_dirs or [], test_transform, side, workers, device)
            val_labels = torch.from_numpy(Columns(validation_dirs or []).labels).to(device)
        validation_size = len(val_labels)
        validation = InMemoryLoader(val_images[rank::world_size], val_labels[rank::world_size], test_transform,
                                    batch_size=eval_batch, seed=seed)
    train_labels = torch.from_numpy(labels).to(device)
    test_labels = torch.from_numpy(Columns(test_dirs).labels).to(device)
    sampler = train_sampler(sampler_factory, labels, batch_size, rank=rank, world_size=world_size, seed=seed)
    train = InMemoryLoader(
        images, train_labels, train_transform,
        batch_size=batch_size, seed=rank_seed(seed, rank), sampler=sampler,
    )
    # Non-padded shards, as on the worker path: every test image is evaluated once, by one worker.
    test = InMemoryLoader(
        decoded(test_dirs, test_transform, side, workers, device)[rank::world_size], test_labels[rank::world_size],
        test_transform, batch_size=eval_batch, seed=seed,
    )
    return InMemorySplits(train, test, len(train_labels), len(test_labels), validation, validation_size)
