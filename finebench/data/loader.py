"""Train, test and validation loaders over a prepared store: which data path feeds the batches and
how they are delivered. What the pixels are is decided elsewhere: the run's settings by
``finebench.data.config.resolve_data_config``, the transforms of every path by ``finebench.data.presets``.

Three paths (``Loaders.path``): "workers" (``columns.StoreDataset`` decodes with PIL in worker
processes), "in_memory" (small images decoded once onto the device, ``finebench.data.in_memory``) and
"device_decode" (JPEG stores trained on CUDA: bytes read by workers, decoded and augmented in
batches on the device, ``finebench.data.gpu_decode``). Every path takes its training order from
``sampler.train_sampler`` and its held-out images from ``finebench.data.validation``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from finebench.data import store
from finebench.data.columns import (
    Columns,
    Positions,
    StoreDataset,
    seed_worker,
    split_dirs,
)
from finebench.data.config import DataConfig, resolve_data_config
from finebench.data.in_memory import InMemoryLoader, in_memory_loaders, wants_in_memory
from finebench.data.presets import (
    Collate,
    ColorJitter,
    EvalTransform,
    Normalization,
    Transform,
    rank_seed,
)
from finebench.data.sampler import (
    BatchShardSampler,
    SamplerFactory,
    per_worker_batch,
    train_sampler,
)
from finebench.data.validation import (
    ValidationChoice,
    resolve_validation,
    split_overlap,
)
from finebench.errors import FinebenchError

if TYPE_CHECKING:
    from finebench.data.gpu_decode import DeviceJpegLoader

__all__ = ["BatchShardSampler", "InMemoryLoader", "LoaderPlan", "Loaders", "build_eval_loader", "build_loaders",
           "check_loaders", "check_validation", "eval_transform", "per_worker_batch", "plan_loaders", "split_dirs"]
"""What callers import from here; the samplers and split folders live in ``sampler`` and ``columns``."""


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
    data: DataConfig | None = None
    """The run's resolved data settings (``config.resolve_data_config``)."""


def data_settings(
    input_size: int | None = None, augmentation: str = "auto", color_jitter: ColorJitter | None = None,
    resize: int | Sequence[int] | None = None, normalize: str | Normalization | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The loaders' keyword arguments as the ``dataset`` settings ``resolve_data_config`` reads."""
    return {"input_size": input_size, "augmentation": augmentation, "color_jitter": color_jitter, "resize": resize,
            "normalize": normalize}


@dataclass(frozen=True)
class LoaderPlan:
    """Which data path a run's loaders take and what they read, decided without decoding an image.

    ``build_loaders`` builds from it; ``finebench run``'s pre-flight check (``check_loaders``) stops
    at it, so checking a dataset costs the store's metadata and label columns, not a decoded split
    copied to the device."""

    meta: dict
    data: DataConfig
    train_dirs: list[Path]
    test_dirs: list[Path]
    device: torch.device
    path: str
    """"workers", "in_memory" or "device_decode" (``Loaders.path``)."""
    train_columns: Columns | Positions
    """The images training reads: the training split less its carved validation images."""
    validation: ValidationChoice | None = None
    validation_dirs: list[Path] | None = None
    """A named validation split's folders (None when carved or unset)."""
    validation_columns: Columns | Positions | None = None

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def input_size(self) -> int | None:
        """The side of the square images the network gets (None: images of their own sizes)."""
        return self.data.input_size


def _check_store_scale(meta: Mapping[str, Any], data: DataConfig, dataset: str, data_root: Path) -> None:
    """A store shrunk at prepare time (``--short-side``) below the shorter side this recipe resizes
    to would be upscaled back on every decode: blurrier images than the recipe's own, silently."""
    shrunk = (meta.get("resize") or {}).get("short_side")
    if data.augmentation != "imagenet" or not shrunk or data.resize is None:
        return
    needed = data.resize if isinstance(data.resize, int) else min(data.resize)
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
    data = resolve_data_config(data_settings(input_size, augmentation, color_jitter, resize, normalize), meta)
    _check_store_scale(meta, data, dataset, Path(data_root))
    train_dirs = split_dirs(root, train_split, available, dataset)
    test_dirs = split_dirs(root, test_split, available, dataset)
    target = torch.device(device) if device is not None else torch.device("cpu")
    split_columns = Columns(train_dirs)
    choice = resolve_validation(validation, train_split, split_columns.labels, meta.get("classes"))
    validation_dirs, validation_columns = None, None
    if choice is not None and choice.split is not None:
        problem = split_overlap(choice.split, train_split, test_split)
        if problem:
            raise FinebenchError(f"dataset.validation.split = {choice.split!r}: {problem}")
        validation_dirs = split_dirs(root, choice.split, available, dataset)
        validation_columns = Columns(validation_dirs)
    elif choice is not None:
        validation_columns = split_columns.subset(choice.positions)
    train_columns = split_columns.subset(choice.train_positions(len(split_columns)) if choice else None)
    if wants_in_memory(in_memory, data.transform(train=True), data.input_size, meta,
                       train_dirs + test_dirs + (validation_dirs or []), dataset):
        path = "in_memory"
    else:
        from finebench.data.gpu_decode import all_jpeg, decode_on_device

        on_device = decode_on_device(decode, augmentation=data.augmentation, device=target,
                                     jpeg=lambda: all_jpeg(train_columns), dataset=dataset)
        path = "device_decode" if on_device else "workers"
    return LoaderPlan(meta, data, train_dirs, test_dirs, target, path, train_columns, choice, validation_dirs,
                      validation_columns)


def check_validation(dataset: str, data_root: Path, *, train_split: str, test_split: str,
                     validation: Mapping[str, Any] | None) -> ValidationChoice | None:
    """The run's validation split resolved from the prepared store's labels alone (what ``--dry-run``
    checks: a fraction that leaves a class without a training image, a named split the store lacks)."""
    if not validation:
        return None
    meta = store.read_meta(Path(data_root), dataset)
    root, available = store.store_dir(Path(data_root), dataset), list(meta.get("splits", {}))
    labels = Columns(split_dirs(root, train_split, available, dataset)).labels
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
    mean/std (``config.normalization``); all resolved by ``config.resolve_data_config``, on every path. ``validation``:
    ``dataset.validation`` as a mapping (``{fraction, seed}`` or ``{split}``): its images leave the
    training loader and get a loader of their own (``Loaders.validation``, the test transform), on
    every path (``finebench.data.validation``).
    """
    plan = plan_loaders(dataset, data_root, input_size=input_size, augmentation=augmentation,
                        train_split=train_split, test_split=test_split, in_memory=in_memory, device=device,
                        decode=decode, color_jitter=color_jitter, resize=resize, normalize=normalize,
                        validation=validation)
    meta, data, target = plan.meta, plan.data, plan.device
    train_transform, test_transform = data.transform(train=True), data.transform(train=False)
    common_loaders = {"classes": list(meta["classes"]), "num_classes": len(meta["classes"]), "meta": meta,
                      "validation_choice": plan.validation, "data": data}
    if plan.path == "in_memory":
        held = in_memory_loaders(
            plan.train_dirs, plan.test_dirs, train_transform, test_transform, data.input_size,
            batch_size=batch_size, eval_batch_size=eval_batch_size, workers=workers, seed=seed, rank=rank,
            world_size=world_size, device=target, sampler_factory=sampler_factory, choice=plan.validation,
            validation_dirs=plan.validation_dirs,
        )
        return Loaders(train=held.train, test=held.test, train_size=held.train_size, test_size=held.test_size,
                       path="in_memory", validation=held.validation, validation_size=held.validation_size,
                       **common_loaders)
    train_columns, validation_columns = plan.train_columns, plan.validation_columns
    test_columns = Columns(plan.test_dirs)
    validation_size = len(validation_columns) if validation_columns is not None else 0
    if plan.path == "device_decode":
        from finebench.data.gpu_decode import device_decode_loaders

        on_device = device_decode_loaders(
            train_columns, test_columns, train_transform, test_transform, batch_size=batch_size,
            eval_batch_size=eval_batch_size, workers=workers, seed=seed, rank=rank, world_size=world_size,
            pin_memory=pin_memory, device=target, sampler_factory=sampler_factory,
            validation_images=validation_columns,
        )
        return Loaders(train=on_device.train, test=on_device.test, train_size=len(train_columns),
                       test_size=len(test_columns), path="device_decode", validation=on_device.validation,
                       validation_size=validation_size, **common_loaders)
    train_set = StoreDataset(train_columns, train_transform, rank_seed(seed, rank))
    test_set = StoreDataset(test_columns, test_transform, seed)
    generator = torch.Generator().manual_seed(rank_seed(seed, rank))
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin_memory,
        "collate_fn": Collate(data.mean, data.std),
        "worker_init_fn": seed_worker if workers > 0 else None,
        "persistent_workers": workers > 0,
    }
    sampler = train_sampler(sampler_factory, train_columns.labels, batch_size, rank=rank, world_size=world_size,
                            seed=seed)
    train = DataLoader(train_set, batch_size=sampler.local_batch, sampler=sampler, generator=generator, **common)
    eval_batch = -(-(eval_batch_size or batch_size) // world_size)

    def evaluation(source: StoreDataset) -> DataLoader:
        # Non-padded shards: every test (and validation) image is evaluated once, by one worker.
        shard = source if world_size == 1 else torch.utils.data.Subset(source, range(rank, len(source), world_size))
        return DataLoader(shard, batch_size=eval_batch, shuffle=False, **common)

    validation = None
    if validation_columns is not None:
        validation = evaluation(StoreDataset(validation_columns, test_transform, seed))
    return Loaders(train=train, test=evaluation(test_set), train_size=len(train_set), test_size=len(test_set),
                   validation=validation, validation_size=validation_size, **common_loaders)


def eval_transform(
    meta: dict, augmentation: str = "auto", input_size: int | None = None,
    resize: int | Sequence[int] | None = None, normalize: str | Normalization | Mapping[str, Any] | None = None,
) -> EvalTransform:
    """The evaluation transform for a store described by ``meta`` (its meta.json) and a run's settings
    (``resize`` and ``normalize`` as a recipe's or config.json's ``dataset`` section holds them)."""
    settings = data_settings(input_size, augmentation, resize=resize, normalize=normalize)
    return EvalTransform.of(resolve_data_config(settings, meta).transform(train=False))


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
    settings = data_settings(input_size, augmentation, resize=resize, normalize=normalize)
    transform: Transform = resolve_data_config(settings, meta).transform(train=False)
    folders = split_dirs(root, split, list(meta.get("splits", {})), dataset)
    source = StoreDataset(Columns(folders), transform, 0)
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=Collate(transform.mean, transform.std))
    return loader, meta
