"""Torch datasets and DataLoaders over a prepared store, with the paper's two augmentation recipes.

Images are read straight from the memory-mapped Arrow columns (no ``datasets`` row decoding)
and decoded with PIL; augmentation is a few PIL/numpy operations driven by the dataset's own
``numpy`` generator, so results depend only on the seed (``worker_init_fn`` reseeds it from
the worker seed torch derives from the loader's seeded generator) and never disturb the
global torch RNG the model uses. Samples leave workers as uint8 tensors; normalisation is one
vectorised operation on the whole batch in ``collate``.

Recipes (the authors' transforms, docs/MECHANISM.md §3):
- ``cifar``: reflect-pad 4, random crop back to size, horizontal flip; CIFAR mean/std.
- ``imagenet``: train resize shorter side to round(s*256/224), random crop s, flip; test the
  same resize and a centre crop; ImageNet mean/std (``s`` = input_size, default 224).
- ``none``: to-tensor and normalise only (resized to input_size when given).
- ``auto``: ``cifar`` for stores whose images are at most 64 px (meta ``image_max_side``),
  ``imagenet`` otherwise. Datasets whose meta says ``info.no_flip`` (digits) are never flipped.

``color_jitter`` (``presets.ColorJitter``, off by default) adds torchvision's colour jitter to the
training images of any recipe but ``none``, after the crop and flip, on every path.
``resize`` (``presets.Resize``, default the ``imagenet`` rule above) replaces that recipe's resize
before the crop: an int for the shorter side, or (height, width) for an exact, aspect-changing
resize as the fine-grained methods' official pipelines do. ``normalize`` (a ``NORMALIZATIONS`` name
or ``presets.Normalization``, default the recipe's own) replaces the mean/std, on every recipe.

JPEG stores trained on CUDA (``decode``) take ``finebench.data.gpu_decode`` instead: the same
``imagenet`` recipe, decoded and augmented in batches on the device.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from finebench.atomic import atomic_write
from finebench.data import store
from finebench.data.presets import (
    ColorJitter,
    Normalise,
    Normalization,
    Resize,
    draft_size,
    rank_seed,
    resized_size,
)
from finebench.data.validation import (
    ValidationChoice,
    resolve_validation,
    split_overlap,
)
from finebench.errors import FinebenchError

if TYPE_CHECKING:
    from finebench.data.gpu_decode import DeviceJpegLoader

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF_MEAN, HALF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar": (CIFAR_MEAN, CIFAR_STD),
    "half": (HALF_MEAN, HALF_STD),
}
"""``dataset.normalize``'s named (mean, std) presets; "half" maps 0..1 pixels to -1..1 (PMG's official
``Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))``)."""
IMAGENET_INPUT_SIZE = 224
"""The ``imagenet`` recipe's crop when ``input_size`` is unset."""
SMALL_IMAGE_MAX_SIDE = 64
AUGMENTATIONS = ("auto", "cifar", "imagenet", "none")


@dataclass
class Loaders:
    train: DataLoader | InMemoryLoader | DeviceJpegLoader
    test: DataLoader | InMemoryLoader | DeviceJpegLoader
    classes: list[str]
    num_classes: int
    meta: dict
    train_size: int
    test_size: int
    path: str = "workers"
    """Which data path feeds the batches: "workers" (PIL in worker processes), "in_memory" (decoded
    splits on the device) or "device_decode" (JPEG bytes decoded and augmented in batches on the
    device, ``finebench.data.gpu_decode``). Runs record it in summary.json as ``data_path``."""
    validation: DataLoader | InMemoryLoader | DeviceJpegLoader | None = None
    """The validation images with the test transform (``dataset.validation``); None without one."""
    validation_size: int = 0
    validation_choice: ValidationChoice | None = None
    """Which images were held out (``finebench.data.validation``): the run records it."""


class _Columns:
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

    def subset(self, positions: np.ndarray | None) -> _Columns | _Positions:
        """These columns restricted to ``positions`` (None: all of them), read through in that order."""
        return self if positions is None else _Positions(self, positions)


class _Positions:
    """Some images of a ``_Columns``, by position: the training split less its validation images, or
    those images themselves. Every loader path reads its images through it, so what it leaves out
    no path can see."""

    def __init__(self, columns: _Columns, positions: np.ndarray) -> None:
        self.columns = columns
        self.positions = np.asarray(positions, dtype=np.int64)
        self.labels = columns.labels[self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def image_bytes(self, index: int) -> bytes:
        return self.columns.image_bytes(int(self.positions[index]))


@dataclass(frozen=True)
class _Recipe:
    kind: str  # "cifar" | "imagenet" | "none"
    train: bool
    size: int | None  # final side (crop); None keeps the stored size
    resize: Resize | None  # imagenet: presets.Resize before cropping; cifar/none: square side
    flip: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jitter: ColorJitter | None = None  # training only


class StoreDataset(Dataset):
    """(uint8 CxHxW tensor, label) pairs from a prepared store; see ``collate`` for normalisation."""

    def __init__(self, columns: _Columns | _Positions, recipe: _Recipe, seed: int) -> None:
        self.columns = columns
        self.recipe = recipe
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(self.columns.image_bytes(index))) as image:
            image = decode_rgb(image, self.recipe.kind, self.recipe.resize)
        array = self._transform(image)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), int(self.columns.labels[index])

    def _transform(self, image: Image.Image) -> np.ndarray:
        recipe, rng = self.recipe, self.rng
        if recipe.kind == "imagenet":
            width, height = resized_size(*image.size, recipe.resize, recipe.size)
            if recipe.train:
                left, top = int(rng.integers(0, width - recipe.size + 1)), int(rng.integers(0, height - recipe.size + 1))
            else:
                left, top = (width - recipe.size) // 2, (height - recipe.size) // 2
            # torch's uint8 antialiased bilinear resize equals PIL's BILINEAR within one grey level and
            # runs about five times faster: it was most of a sample's cost (benchmarks/loader.py).
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
            resized = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
            array = resized[0, :, top : top + recipe.size, left : left + recipe.size].permute(1, 2, 0).numpy()
        else:
            if recipe.resize is not None and image.size != (recipe.resize, recipe.resize):
                image = image.resize((recipe.resize, recipe.resize), Image.BILINEAR)
            array = np.asarray(image)
            if recipe.kind == "cifar" and recipe.train:
                # Reflect-pad 4 then crop, done as one gather (np.pad per sample costs more than the decode).
                top, left = rng.integers(-4, 5, size=2)
                array = array[np.ix_(_reflect(np.arange(array.shape[0]) + top, array.shape[0]),
                                     _reflect(np.arange(array.shape[1]) + left, array.shape[1]))]
        if recipe.train and recipe.flip and rng.random() < 0.5:
            array = array[:, ::-1]
        if recipe.train and recipe.jitter is not None:
            # A torch generator seeded from the dataset's own numpy one: the draws stay in the state
            # the engine checkpoints (and worker_init_fn reseeds), and torchvision's draw order holds.
            generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
            pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
            array = recipe.jitter.apply(pixels, generator).permute(1, 2, 0).numpy()
        return array


def decode_rgb(image: Image.Image, kind: str, resize: Resize | None) -> Image.Image:
    """The RGB pixels of an opened image as the loaders decode them: for the ``imagenet`` recipe a
    JPEG not yet loaded is decoded at 1/2, 1/4 or 1/8 scale where the resize would discard those
    pixels anyway (libjpeg's DCT scaling, so its pixels differ from a full decode then a resize)."""
    if kind == "imagenet" and image.format == "JPEG" and resize is not None:
        image.draft("RGB", draft_size(*image.size, resize))
    return image.convert("RGB")


def _reflect(indices: np.ndarray, size: int) -> np.ndarray:
    """Indices into an axis of ``size`` as ``np.pad(mode="reflect")`` maps out-of-range ones."""
    indices = np.abs(indices)
    return np.where(indices >= size, 2 * (size - 1) - indices, indices)


class _Collate:
    """Stack uint8 samples and normalise the whole batch at once (picklable for worker processes)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.normalise = Normalise(mean, std)

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in batch]).float()
        labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
        return self.normalise(images), labels


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


def _seed_worker(worker_id: int) -> None:
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


def as_resize(value: int | Sequence[int] | None) -> Resize | None:
    """``dataset.resize`` as the loaders take it: a recipe's (or config.json's) [height, width] list
    becomes a tuple; an int or None stays."""
    if value is None or isinstance(value, int):
        return value
    height, width = value
    return int(height), int(width)


def resize_problem(resize: int | Sequence[int] | None, kind: str, input_size: int | None) -> str | None:
    """Why ``dataset.resize`` cannot apply to the augmentation ``kind`` (not "auto") at this
    ``input_size``, or None: the recipe check (``--dry-run``) and the loaders ask the same question."""
    resize = as_resize(resize)
    if resize is None:
        return None
    if kind != "imagenet":
        return (f"augmentation {kind!r} has no resize before a crop; remove resize or choose augmentation "
                "imagenet (or auto on a store of photos)")
    size = input_size or IMAGENET_INPUT_SIZE
    if min(resize if isinstance(resize, tuple) else (resize,)) < size:
        return (f"smaller than the {size} px crop (dataset.input_size = {input_size}): "
                f"every side must be at least {size}")
    return None


def normalization(setting: str | Normalization | Mapping[str, Any] | None,
                  default: tuple[tuple[float, ...], tuple[float, ...]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of ``dataset.normalize``: a ``NORMALIZATIONS`` name, numbers (a config.json
    mapping too), or None for the augmentation's own ``default``."""
    if setting is None:
        return default
    if isinstance(setting, str):
        if setting not in NORMALIZATIONS:
            raise FinebenchError(f"dataset.normalize {setting!r} is not a preset: expected one of "
                                 f"{', '.join(NORMALIZATIONS)} or {{mean = [r, g, b], std = [r, g, b]}}")
        return NORMALIZATIONS[setting]
    numbers = setting if isinstance(setting, Normalization) else Normalization.model_validate(dict(setting))
    return numbers.pair()


def _recipes(
    meta: dict, augmentation: str, input_size: int | None, color_jitter: ColorJitter | None = None,
    resize: int | Sequence[int] | None = None, normalize: str | Normalization | Mapping[str, Any] | None = None,
) -> tuple[_Recipe, _Recipe]:
    if augmentation not in AUGMENTATIONS:
        raise FinebenchError(f"augmentation {augmentation!r} is not valid: expected one of {', '.join(AUGMENTATIONS)}")
    max_side = meta.get("image_max_side") or 0
    small = max_side <= SMALL_IMAGE_MAX_SIDE
    kind = augmentation if augmentation != "auto" else ("cifar" if small else "imagenet")
    if color_jitter is not None and kind == "none":
        raise FinebenchError("dataset.color_jitter: augmentation 'none' trains on unaugmented images; "
                             "remove color_jitter or choose augmentation auto, cifar or imagenet")
    problem = resize_problem(resize, kind, input_size)
    if problem:
        shown = list(resize) if isinstance(resize, (list, tuple)) else resize
        raise FinebenchError(f"dataset.resize = {shown}: {problem}")
    flip = kind != "none" and not meta.get("info", {}).get("no_flip", False)
    if kind == "imagenet":
        size = input_size or IMAGENET_INPUT_SIZE
        default_resize = round(size * 256 / IMAGENET_INPUT_SIZE)
        resize, mean, std = as_resize(resize) or default_resize, IMAGENET_MEAN, IMAGENET_STD
    else:
        uniform = meta.get("image_size")
        if input_size is None and not (uniform and uniform[0] == uniform[1]):
            if kind == "cifar":
                input_size = max_side  # small images of mixed sizes: square them at the largest side
            else:
                raise FinebenchError(
                    f"dataset {meta.get('name')!r} has images of different sizes: augmentation 'none' needs input_size"
                )
        size = resize = input_size
        mean, std = (CIFAR_MEAN, CIFAR_STD) if small else (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = normalization(normalize, (mean, std))
    train = _Recipe(kind, True, size, resize, flip, mean, std, color_jitter)
    return train, _Recipe(kind, False, size, resize, False, mean, std)


# ---- the evaluation transform, public for tools that feed a trained model ---------------------


@dataclass(frozen=True)
class EvalTransform:
    """The test-time transform a run's loader applies: a PIL image → the uint8 H×W×3 array the
    network sees (resize / centre crop of the store's recipe), then ``normalise`` → float C×H×W.

    ``finebench attend``, ``eval`` and ``export`` use it so that what they feed a trained model is
    exactly what its test loader fed it.
    """

    kind: str
    size: int | None
    resize: Resize | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """``image`` as just opened (``Image.open``) decodes as the loader decodes the store's bytes
        (a JPEG at reduced scale, ``decode_rgb``); an image already loaded is taken as it is."""
        recipe = _Recipe(self.kind, False, self.size, self.resize, False, self.mean, self.std)
        return np.array(StoreDataset(None, recipe, 0)._transform(decode_rgb(image, self.kind, self.resize)),
                        dtype=np.uint8)

    def normalise(self, array: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()
        return Normalise(self.mean, self.std)(pixels.unsqueeze(0))[0]


def eval_transform(
    meta: dict, augmentation: str = "auto", input_size: int | None = None,
    resize: int | Sequence[int] | None = None, normalize: str | Normalization | Mapping[str, Any] | None = None,
) -> EvalTransform:
    """The evaluation transform for a store described by ``meta`` (its meta.json) and a run's settings
    (``resize`` and ``normalize`` as a recipe's or config.json's ``dataset`` section holds them)."""
    _, recipe = _recipes(meta, augmentation, input_size, resize=resize, normalize=normalize)
    return EvalTransform(recipe.kind, recipe.size, recipe.resize, recipe.mean, recipe.std)


def build_eval_loader(
    dataset: str,
    data_root: Path,
    split: str,
    *,
    batch_size: int,
    input_size: int | None = None,
    augmentation: str = "auto",
    workers: int = 0,
    resize: int | Sequence[int] | None = None,
    normalize: str | Normalization | Mapping[str, Any] | None = None,
) -> tuple[DataLoader, dict]:
    """A loader over one prepared split (or ``a+b``) with the test transform, in store order,
    batches as the test loader of ``build_loaders`` makes them; returns it with the store's meta."""
    meta = store.read_meta(Path(data_root), dataset)
    root = store.store_dir(Path(data_root), dataset)
    _, recipe = _recipes(meta, augmentation, input_size, resize=resize, normalize=normalize)
    folders = split_dirs(root, split, list(meta.get("splits", {})), dataset)
    source = StoreDataset(_Columns(folders), recipe, 0)
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_Collate(recipe.mean, recipe.std))
    return loader, meta


# ---- in-memory path for small images ----------------------------------------------------------

IN_MEMORY_MAX_BYTES = 2 * 2**30
"""``in_memory="auto"`` holds the splits in memory only below this many decoded bytes (CIFAR-10: 184 MB)."""
IN_MEMORY_CHOICES = ("auto", True, False)


class InMemoryLoader:
    """Batches of a split decoded once into a uint8 N×3×H×W tensor on the training device.

    The approach of the fastest CIFAR trainers: no per-sample Python and no workers; the ``cifar``
    augmentation (reflect-pad 4, random crop, flip) is one gather per batch whose indices fold in
    the padding, the crop and the flip (then the recipe's colour jitter, image by image). Training
    order comes from the same ``BatchShardSampler`` as the worker path (call ``sampler.set_epoch``);
    crop offsets, flips and jitter factors come from ``generator`` (CPU, so the stream is the same
    on any device; the engine checkpoints it, so a resumed run repeats the uninterrupted one).
    Batches are (float32 B×3×H×W normalised, int64 B) on the images' device, like the worker path's.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        recipe: _Recipe,
        *,
        batch_size: int,
        seed: int,
        sampler: BatchShardSampler | None = None,
    ) -> None:
        self.images, self.labels, self.recipe, self.sampler = images, labels, recipe, sampler
        self.batch_size = sampler.local_batch if sampler is not None else batch_size
        self.generator = torch.Generator().manual_seed(seed)
        device = images.device
        self.normalise = Normalise(recipe.mean, recipe.std, device)
        height, width = images.shape[2:]
        self.pad = 4 if recipe.kind == "cifar" and recipe.train else 0
        self.augment = recipe.train and (self.pad > 0 or recipe.flip)
        # Source row/column of every position of the reflect-padded image.
        self.rows = torch.from_numpy(_reflect(np.arange(-self.pad, height + self.pad), height)).to(device)
        self.cols = torch.from_numpy(_reflect(np.arange(-self.pad, width + self.pad), width)).to(device)

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
            yield self._augmented(index), self.labels[index]

    def _augmented(self, index: torch.Tensor) -> torch.Tensor:
        if not self.augment:
            batch = self.images[index]
        else:
            count, (height, width), device = len(index), self.images.shape[2:], self.rows.device
            offsets = torch.randint(0, 2 * self.pad + 1, (count, 2), generator=self.generator).to(device)
            flips = torch.rand(count, generator=self.generator) < 0.5
            flips = (flips if self.recipe.flip else torch.zeros_like(flips)).to(device)
            row_index = self.rows[offsets[:, :1] + torch.arange(height, device=device)]
            steps = torch.arange(width, device=device)
            col_index = self.cols[offsets[:, 1:] + torch.where(flips[:, None], width - 1 - steps, steps)]
            # Advanced indices around a slice put their dims first: B×H×W×C, back to B×C×H×W below.
            batch = self.images[index[:, None, None], :, row_index[:, :, None], col_index[:, None, :]].permute(0, 3, 1, 2)
        if self.recipe.train and self.recipe.jitter is not None:
            batch = self.recipe.jitter.apply_batch(batch, self.generator)
        return self.normalise(batch.float()).contiguous()


def _stack_uint8(batch: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    return torch.stack([image for image, _ in batch])


def _decode_split(split_dir: Path, recipe: _Recipe, side: int, workers: int) -> np.ndarray:
    """Every image of one split as uint8 N×3×H×W, decoded (and resized) exactly as the worker path's
    test transform does; cached as ``<split>.u8-<H>x<W>.npy`` beside the split, which goes away
    with the store when it is prepared again."""
    cache = split_dir.parent / f"{split_dir.name}.u8-{side}x{side}.npy"
    if cache.is_file():
        try:
            return np.load(cache, mmap_mode="r")
        except (OSError, ValueError):  # truncated (a full disk, a killed copy): decode again and replace it
            pass
    dataset = StoreDataset(_Columns([split_dir]), recipe, seed=0)
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


def _decoded(split_dirs: list[Path], recipe: _Recipe, side: int, workers: int, device: torch.device) -> torch.Tensor:
    frozen = replace(recipe, train=False, flip=False, jitter=None)
    arrays = [_decode_split(split_dir, frozen, side, workers) for split_dir in split_dirs]
    return torch.from_numpy(np.concatenate(arrays)).to(device)


def _wants_in_memory(
    in_memory: str | bool, recipe: _Recipe, side: int | None, meta: dict, split_dirs: list[Path], dataset: str
) -> bool:
    if in_memory not in IN_MEMORY_CHOICES:
        raise FinebenchError(f"in_memory={in_memory!r} is not valid: expected one of auto, True, False")
    small = recipe.kind in ("cifar", "none") and side is not None and side <= SMALL_IMAGE_MAX_SIDE
    if in_memory is True and not small:
        raise FinebenchError(
            f"dataset {dataset!r}: in_memory needs small images of one size (cifar or none augmentation, "
            f"input_size <= {SMALL_IMAGE_MAX_SIDE}), got {recipe.kind!r} at {side}"
        )
    if in_memory != "auto":
        return bool(in_memory)
    count = sum(int(meta.get("splits", {}).get(path.name, 0)) for path in split_dirs)
    return small and count * 3 * side**2 <= IN_MEMORY_MAX_BYTES


def _in_memory_loaders(
    meta: dict, train_dirs: list[Path], test_dirs: list[Path], train_recipe: _Recipe, test_recipe: _Recipe,
    side: int, *, batch_size: int, eval_batch_size: int | None, workers: int, seed: int, rank: int,
    world_size: int, device: torch.device, sampler_factory: SamplerFactory | None = None,
    choice: ValidationChoice | None = None, validation_dirs: list[Path] | None = None,
) -> Loaders:
    labels = _Columns(train_dirs).labels
    images = _decoded(train_dirs, train_recipe, side, workers, device)
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
            val_images = _decoded(validation_dirs or [], test_recipe, side, workers, device)
            val_labels = torch.from_numpy(_Columns(validation_dirs or []).labels).to(device)
        validation_size = len(val_labels)
        validation = InMemoryLoader(val_images[rank::world_size], val_labels[rank::world_size], test_recipe,
                                    batch_size=eval_batch, seed=seed)
    train_labels = torch.from_numpy(labels).to(device)
    test_labels = torch.from_numpy(_Columns(test_dirs).labels).to(device)
    sampler = train_sampler(sampler_factory, labels, batch_size, rank=rank, world_size=world_size, seed=seed)
    train = InMemoryLoader(
        images, train_labels, train_recipe,
        batch_size=batch_size, seed=rank_seed(seed, rank), sampler=sampler,
    )
    # Non-padded shards, as on the worker path: every test image is evaluated once, by one worker.
    test = InMemoryLoader(
        _decoded(test_dirs, test_recipe, side, workers, device)[rank::world_size], test_labels[rank::world_size],
        test_recipe, batch_size=eval_batch, seed=seed,
    )
    return Loaders(
        train=train, test=test, classes=list(meta["classes"]), num_classes=len(meta["classes"]), meta=meta,
        train_size=len(train_labels), test_size=len(test_labels), path="in_memory", validation=validation,
        validation_size=validation_size, validation_choice=choice,
    )


# ---- device decode path for JPEG datasets (finebench.data.gpu_decode) ---------------------------

def _device_decode_loaders(
    meta: dict, train_columns: _Columns | _Positions, test_columns: _Columns, train_recipe: _Recipe,
    test_recipe: _Recipe, *, batch_size: int, eval_batch_size: int | None, workers: int, seed: int, rank: int,
    world_size: int, pin_memory: bool, device: torch.device, sampler_factory: SamplerFactory | None = None,
    validation_columns: _Columns | _Positions | None = None,
) -> Loaders:
    from finebench.data.gpu_decode import DeviceJpegLoader, DeviceTransform

    def transform(recipe: _Recipe) -> DeviceTransform:
        return DeviceTransform(recipe.size, recipe.resize, recipe.train, recipe.flip, recipe.mean, recipe.std,
                               recipe.jitter)

    def evaluation(columns: _Columns | _Positions) -> DeviceJpegLoader:
        # Non-padded shards, as on the worker path: every image is evaluated once, by one worker.
        return DeviceJpegLoader(
            columns, transform(test_recipe), batch_size=-(-(eval_batch_size or batch_size) // world_size),
            seed=seed, device=device, indices=range(rank, len(columns), world_size), workers=workers,
            pin_memory=pin_memory,
        )

    sampler = train_sampler(sampler_factory, train_columns.labels, batch_size, rank=rank, world_size=world_size,
                            seed=seed)
    train = DeviceJpegLoader(
        train_columns, transform(train_recipe), batch_size=batch_size, seed=rank_seed(seed, rank), device=device,
        sampler=sampler, workers=workers, pin_memory=pin_memory,
    )
    return Loaders(
        train=train, test=evaluation(test_columns), classes=list(meta["classes"]), num_classes=len(meta["classes"]),
        meta=meta, train_size=len(train_columns), test_size=len(test_columns), path="device_decode",
        validation=None if validation_columns is None else evaluation(validation_columns),
        validation_size=0 if validation_columns is None else len(validation_columns),
    )


@dataclass(frozen=True)
class LoaderPlan:
    """Which data path a run's loaders take and what they read, decided without decoding an image.

    ``build_loaders`` builds from it; ``finebench run``'s pre-flight check (``check_loaders``) stops
    at it, so checking a dataset costs the store's metadata and label columns, not a decoded split
    copied to the device."""

    meta: dict
    train_recipe: _Recipe
    test_recipe: _Recipe
    train_dirs: list[Path]
    test_dirs: list[Path]
    side: int | None
    device: torch.device
    path: str
    """"workers", "in_memory" or "device_decode" (``Loaders.path``)."""
    train_columns: _Columns | _Positions
    """The images training reads: the training split less its carved validation images."""
    validation: ValidationChoice | None = None
    validation_dirs: list[Path] | None = None
    """A named validation split's folders (None when carved or unset)."""
    validation_columns: _Columns | _Positions | None = None

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def input_size(self) -> int | None:
        """The side of the square images the network gets (None: images of their own sizes)."""
        return self.test_recipe.size or self.side


def _check_store_scale(meta: Mapping[str, Any], recipe: _Recipe, dataset: str, data_root: Path) -> None:
    """A store shrunk at prepare time (``--short-side``) below the shorter side this recipe resizes
    to would be upscaled back on every decode: blurrier images than the recipe's own, silently."""
    shrunk = (meta.get("resize") or {}).get("short_side")
    if recipe.kind != "imagenet" or not shrunk or recipe.resize is None:
        return
    needed = recipe.resize if isinstance(recipe.resize, int) else min(recipe.resize)
    if shrunk < needed:
        raise FinebenchError(
            f"dataset {dataset!r} in {data_root} was prepared with --short-side {shrunk}, below the {needed} px "
            f"this recipe resizes the shorter side to, so training would upscale every image: rebuild it with "
            f"`{store.prepare_command(dataset, data_root, force=True)}` (full size, or add --short-side {needed})"
        )


def plan_loaders(
    dataset: str, data_root: Path, *, input_size: int | None = None, augmentation: str = "auto",
    train_split: str = "train", test_split: str = "test", in_memory: str | bool = False,
    device: torch.device | str | None = None, decode: str = "auto", color_jitter: ColorJitter | None = None,
    resize: int | Sequence[int] | None = None, normalize: str | Normalization | Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
) -> LoaderPlan:
    """Every check ``build_loaders`` makes (store, splits, augmentation, data path, the validation
    split: ``finebench.data.validation``), nothing decoded."""
    meta = store.read_meta(Path(data_root), dataset)
    store.check_store_info(meta, dataset, Path(data_root))
    root = store.store_dir(Path(data_root), dataset)
    available = list(meta.get("splits", {}))
    train_recipe, test_recipe = _recipes(meta, augmentation, input_size, color_jitter, resize, normalize)
    _check_store_scale(meta, train_recipe, dataset, Path(data_root))
    train_dirs = split_dirs(root, train_split, available, dataset)
    test_dirs = split_dirs(root, test_split, available, dataset)
    side = train_recipe.size or (meta.get("image_size") or [None])[0]
    target = torch.device(device) if device is not None else torch.device("cpu")
    split_columns = _Columns(train_dirs)
    choice = resolve_validation(validation, train_split, split_columns.labels, meta.get("classes"))
    validation_dirs, validation_columns = None, None
    if choice is not None and choice.split is not None:
        problem = split_overlap(choice.split, train_split, test_split)
        if problem:
            raise FinebenchError(f"dataset.validation.split = {choice.split!r}: {problem}")
        validation_dirs = split_dirs(root, choice.split, available, dataset)
        validation_columns = _Columns(validation_dirs)
    elif choice is not None:
        validation_columns = split_columns.subset(choice.positions)
    train_columns = split_columns.subset(choice.train_positions(len(split_columns)) if choice else None)
    if _wants_in_memory(in_memory, train_recipe, side, meta, train_dirs + test_dirs + (validation_dirs or []),
                        dataset):
        path = "in_memory"
    else:
        from finebench.data.gpu_decode import all_jpeg, decode_on_device

        on_device = decode_on_device(decode, augmentation=train_recipe.kind, device=target,
                                     jpeg=lambda: all_jpeg(train_columns), dataset=dataset)
        path = "device_decode" if on_device else "workers"
    return LoaderPlan(meta, train_recipe, test_recipe, train_dirs, test_dirs, side, target, path, train_columns,
                      choice, validation_dirs, validation_columns)


def check_validation(dataset: str, data_root: Path, *, train_split: str, test_split: str,
                     validation: Mapping[str, Any] | None) -> ValidationChoice | None:
    """The run's validation split resolved from the prepared store's labels alone (what ``--dry-run``
    checks: a fraction that leaves a class without a training image, a named split the store lacks)."""
    if not validation:
        return None
    meta = store.read_meta(Path(data_root), dataset)
    root, available = store.store_dir(Path(data_root), dataset), list(meta.get("splits", {}))
    labels = _Columns(split_dirs(root, train_split, available, dataset)).labels
    choice = resolve_validation(validation, train_split, labels, meta.get("classes"))
    if choice is not None and choice.split is not None:
        split_dirs(root, choice.split, available, dataset)
    return choice


def check_loaders(
    dataset: str, data_root: Path, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
    sampler_factory: SamplerFactory | None = None, **choices: Any,
) -> LoaderPlan:
    """``plan_loaders`` plus the training batch order (a method's own sampler checks the batch size
    against the labels), for a check before anything is written; ``choices`` as ``plan_loaders``."""
    plan = plan_loaders(dataset, data_root, **choices)
    train_sampler(sampler_factory, plan.train_columns.labels, batch_size, rank=rank, world_size=world_size, seed=seed)
    return plan


def build_loaders(
    dataset: str,
    data_root: Path,
    *,
    batch_size: int,
    eval_batch_size: int | None = None,
    workers: int = 0,
    seed: int = 0,
    input_size: int | None = None,
    augmentation: str = "auto",
    train_split: str = "train",
    test_split: str = "test",
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    in_memory: str | bool = False,
    device: torch.device | str | None = None,
    decode: str = "auto",
    sampler_factory: SamplerFactory | None = None,
    color_jitter: ColorJitter | None = None,
    resize: int | Sequence[int] | None = None,
    normalize: str | Normalization | Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
) -> Loaders:
    """Train and test loaders over ``<data_root>/<dataset>``; batches are (float32 Bx3xHxW, int64 B).

    ``batch_size`` and ``eval_batch_size`` are global: with ``world_size > 1`` each rank loads its
    share of every global batch (``BatchShardSampler``; call ``loaders.train.sampler.set_epoch``
    each epoch) and evaluates the test indices ``rank::world_size``, so every test image counts
    exactly once. ``in_memory`` (True, or "auto": small images whose splits fit in
    ``IN_MEMORY_MAX_BYTES``, what ``finebench run`` passes) swaps both loaders for
    ``InMemoryLoader``s holding the decoded splits on ``device`` (default CPU; pass the training
    device so the augmentation runs there). ``decode`` ("auto": JPEG stores with the ``imagenet``
    recipe when ``device`` is CUDA; "device" forces it on any device, "workers" never) swaps both
    for ``gpu_decode.DeviceJpegLoader``s: workers only read bytes, the device decodes and augments.
    ``Loaders.path`` says which path was taken. ``sampler_factory``: a method's own batch order
    (``SamplerFactory``), on every path. ``color_jitter``: torchvision's colour jitter on the
    training images (``presets.ColorJitter``), on every path. ``resize``: the ``imagenet`` recipe's
    resize before its crops (``presets.Resize``; a [height, width] list works), ``normalize``: the
    mean/std (``normalization``); both default to the recipe's own, on every path. ``validation``:
    ``dataset.validation`` as a mapping (``{fraction, seed}`` or ``{split}``): its images leave the
    training loader and get a loader of their own (``Loaders.validation``, the test transform), on
    every path (``finebench.data.validation``).
    """
    plan = plan_loaders(dataset, data_root, input_size=input_size, augmentation=augmentation,
                        train_split=train_split, test_split=test_split, in_memory=in_memory, device=device,
                        decode=decode, color_jitter=color_jitter, resize=resize, normalize=normalize,
                        validation=validation)
    meta, train_recipe, test_recipe, target = plan.meta, plan.train_recipe, plan.test_recipe, plan.device
    if plan.path == "in_memory":
        return _in_memory_loaders(
            meta, plan.train_dirs, plan.test_dirs, train_recipe, test_recipe, plan.side,
            batch_size=batch_size, eval_batch_size=eval_batch_size, workers=workers, seed=seed, rank=rank,
            world_size=world_size, device=target, sampler_factory=sampler_factory, choice=plan.validation,
            validation_dirs=plan.validation_dirs,
        )
    train_columns = plan.train_columns
    if plan.path == "device_decode":
        loaders = _device_decode_loaders(
            meta, train_columns, _Columns(plan.test_dirs), train_recipe, test_recipe, batch_size=batch_size,
            eval_batch_size=eval_batch_size, workers=workers, seed=seed, rank=rank, world_size=world_size,
            pin_memory=pin_memory, device=target, sampler_factory=sampler_factory,
            validation_columns=plan.validation_columns,
        )
        return replace(loaders, validation_choice=plan.validation)
    train_set = StoreDataset(train_columns, train_recipe, rank_seed(seed, rank))
    test_set = StoreDataset(_Columns(plan.test_dirs), test_recipe, seed)
    generator = torch.Generator().manual_seed(rank_seed(seed, rank))
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin_memory,
        "collate_fn": _Collate(train_recipe.mean, train_recipe.std),
        "worker_init_fn": _seed_worker if workers > 0 else None,
        "persistent_workers": workers > 0,
    }
    sampler = train_sampler(sampler_factory, train_columns.labels, batch_size, rank=rank, world_size=world_size,
                            seed=seed)
    train = DataLoader(train_set, batch_size=sampler.local_batch, sampler=sampler, generator=generator, **common)
    # Non-padded shards: every test image is evaluated once, by one worker.
    test_source = test_set if world_size == 1 else torch.utils.data.Subset(test_set, range(rank, len(test_set), world_size))
    test = DataLoader(test_source, batch_size=-(-(eval_batch_size or batch_size) // world_size), shuffle=False, **common)
    validation = None
    if plan.validation_columns is not None:
        validation_set = StoreDataset(plan.validation_columns, test_recipe, seed)
        shard = range(rank, len(validation_set), world_size)  # non-padded, as the test split's
        validation = DataLoader(validation_set if world_size == 1 else torch.utils.data.Subset(validation_set, shard),
                                batch_size=-(-(eval_batch_size or batch_size) // world_size), shuffle=False, **common)
    return Loaders(
        train=train,
        test=test,
        classes=list(meta["classes"]),
        num_classes=len(meta["classes"]),
        meta=meta,
        train_size=len(train_set),
        test_size=len(test_set),
        validation=validation,
        validation_size=len(plan.validation_columns) if plan.validation_columns is not None else 0,
        validation_choice=plan.validation,
    )
