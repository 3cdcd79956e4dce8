"""A prepared store's splits as the loaders read them: image bytes and labels straight from the
memory-mapped Arrow columns (no ``datasets`` row decoding), and ``StoreDataset``, which decodes one
image with PIL and applies its split's ``presets.Transform``.

Augmentation draws come from the dataset's own ``numpy`` generator, so results depend only on the
seed (``seed_worker`` reseeds it from the worker seed torch derives from the loader's seeded
generator) and never disturb the global torch RNG the model uses. Samples leave workers as uint8
tensors; normalisation is one vectorised operation on the whole batch (``presets.Collate``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from finebench.data import store
from finebench.data.presets import Transform
from finebench.errors import FinebenchError


class Columns:
    """The image bytes and labels of one or more Arrow splits, indexed without copying the images."""

    def __init__(self, split_dirs: list[Path]) -> None:
        import pyarrow

        self.chunks = []
        labels = []
        for split_dir in split_dirs:
            try:
                table = store.read_split(split_dir)  # memory-mapped: labels and byte columns, never rows
            except (OSError, ValueError, KeyError, pyarrow.ArrowException) as error:  # how pyarrow reports a truncated file
                raise FinebenchError(
                    f"{split_dir}: the prepared store cannot be read ({error}): "
                    f"rebuild it with `{store.prepare_command(split_dir.parent.name, split_dir.parent.parent, force=True)}`"
                ) from None
            labels.append(table.column("label").to_numpy())
            self.chunks.extend(chunk.field("bytes") for chunk in table.column("image").chunks)
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        self.offsets = np.cumsum([0] + [len(c) for c in self.chunks])

    def __len__(self) -> int:
        return len(self.labels)

    def image_bytes(self, index: int) -> bytes:
        chunk = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.chunks[chunk][index - int(self.offsets[chunk])].as_py()

    def subset(self, positions: np.ndarray | None) -> Columns | Positions:
        """These columns restricted to ``positions`` (None: all of them), read through in that order."""
        return self if positions is None else Positions(self, positions)


class Positions:
    """Some images of a ``Columns``, by position: the training split less its validation images, or
    those images themselves. Every loader path reads its images through it, so what it leaves out
    no path can see."""

    def __init__(self, columns: Columns, positions: np.ndarray) -> None:
        self.columns = columns
        self.positions = np.asarray(positions, dtype=np.int64)
        self.labels = columns.labels[self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def image_bytes(self, index: int) -> bytes:
        return self.columns.image_bytes(int(self.positions[index]))


class StoreDataset(Dataset):
    """(uint8 CxHxW tensor, label) pairs from a prepared store; see ``presets.Collate`` for normalisation."""

    def __init__(self, columns: Columns | Positions, transform: Transform, seed: int) -> None:
        self.columns = columns
        self.transform = transform
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(self.columns.image_bytes(index))) as image:
            image = self.transform.decode(image)
        array = self.transform.pixels(image, self.rng)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), int(self.columns.labels[index])


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: each worker's ``StoreDataset`` draws from the seed torch gave the worker."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset
    while not isinstance(dataset, StoreDataset):  # unwrap Subset
        dataset = dataset.dataset
    dataset.reseed(info.seed % 2**32)


def split_dirs(root: Path, spec: str, available: list[str], dataset: str) -> list[Path]:
    """The folders of ``spec`` (``"train"`` or ``"fold1+fold2"``); an unknown split is a user error."""
    names = [part.strip() for part in spec.split("+") if part.strip()]
    unknown = [n for n in names if n not in available]
    if not names or unknown:
        raise FinebenchError(
            f"dataset {dataset!r} has no split {(unknown or [spec])[0]!r} (asked for {spec!r}): "
            f"available splits are {', '.join(available)} (join several with '+')"
        )
    return [root / n for n in names]
