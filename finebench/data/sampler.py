"""The training batch order every data path shares: a global batch split into equal per-worker shares,
so a distributed run sees the same batches as a one-process run."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from finebench.errors import FinebenchError


def per_worker_batch(global_batch: int, world_size: int, field: str = "train.batch_size") -> int:
    """The recipe's batch is the global one; each worker takes an equal share of it."""
    if global_batch % world_size:
        raise FinebenchError(
            f"{field} = {global_batch} does not split evenly across {world_size} workers: "
            f"use a multiple of {world_size} (the recipe's batch size is the global batch)"
        )
    return global_batch // world_size


SamplerFactory = Callable[..., "Sampler[int] | None"]
"""A method's own batch order (``finebench.methods.Method.batch_sampler``), called as
``factory(labels, global_batch, seed=, rank=, world_size=)`` with the training labels (int64 array);
None keeps ``BatchShardSampler``. What it returns offers ``BatchShardSampler``'s interface
(``set_epoch``, ``local_batch``, ``steps``, ``__len__``, ``indices()``) and yields this worker's
indices batch by batch."""


def train_sampler(factory: SamplerFactory | None, labels: np.ndarray, global_batch: int, *, rank: int,
                  world_size: int, seed: int) -> Sampler[int]:
    """The training order every loader path uses: the method's own, else ``BatchShardSampler``."""
    own = factory(labels, global_batch, seed=seed, rank=rank, world_size=world_size) if factory else None
    return own if own is not None else BatchShardSampler(len(labels), global_batch, rank=rank,
                                                         world_size=world_size, seed=seed)


class BatchShardSampler(Sampler[int]):
    """Indices for one worker: its contiguous share of every global batch of one shuffled epoch.

    With ``world_size`` 1 this is a plain shuffle whose global batches equal those of any other
    worker count, so a distributed run sees the same batches as a one-process run. The last,
    partial global batch is trimmed to a multiple of ``world_size`` (every worker must take the
    same number of steps and equal slices keep DDP's mean exact) and dropped when that leaves a
    worker fewer than two images (a batch of one breaks BatchNorm in training mode).
    """

    def __init__(self, size: int, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.global_batch = global_batch
        self.local_batch = per_worker_batch(global_batch, world_size)
        self.full_batches, tail = divmod(size, global_batch)
        self.tail_local = tail // world_size
        if self.full_batches and self.tail_local < 2:
            self.tail_local = 0
        if not self.full_batches and not self.tail_local:
            raise FinebenchError(
                f"the training split has {size} images, too few for {world_size} workers to take one each"
            )

    def set_epoch(self, epoch: int) -> None:
        """A different, reproducible shuffle each epoch, the same on every worker."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.full_batches * self.local_batch + self.tail_local

    @property
    def steps(self) -> int:
        """Optimiser steps per epoch, the same on every worker."""
        return self.full_batches + (1 if self.tail_local else 0)

    def indices(self) -> torch.Tensor:
        """This worker's indices for the current epoch, in order (int64)."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        full = order[: self.full_batches * self.global_batch].view(self.full_batches, self.global_batch)
        mine = full[:, self.rank * self.local_batch : (self.rank + 1) * self.local_batch].reshape(-1)
        if self.tail_local:
            start = self.full_batches * self.global_batch + self.rank * self.tail_local
            mine = torch.cat([mine, order[start : start + self.tail_local]])
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

