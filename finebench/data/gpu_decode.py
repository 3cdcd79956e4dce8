"""JPEG batches decoded and augmented on the training device; CPU workers only read encoded bytes.

Why: at 224 px the worker path spends most of a sample's time in the PIL JPEG decode, so on a
16-core GPU host it delivered less than the GPU trains on (benchmarks/README.md, "Decisions"). Here worker processes read each batch's encoded bytes from the
Arrow store; the main process decodes the whole batch with one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA, batched and on the
hardware JPEG engine where the GPU has one; libjpeg-turbo on CPU), then resizes (antialiased
bilinear), crops, flips and normalises on the device (``presets.device_pixels``). The arithmetic is the worker path's
``imagenet`` recipe (``resize``: the shorter side to an int, or an exact (height, width); random or
centre crop ``size``, flip), so both
paths give the same pixels within one grey level on the same JPEGs (tests/test_gpu_decode.py).
One exception: for photos whose shorter side is at least twice ``resize`` the worker path lets
libjpeg decode at 1/2, 1/4 or 1/8 scale (PIL draft), which this path cannot ask nvJPEG for (a
few grey levels apart then: ``compare_with_workers("cpu")``); preparing at training scale (``finebench prepare NAME
--short-side 256``) removes that case and makes every decode cheaper on either path.

Why not NVIDIA DALI, the library built for exactly this: it is faster in principle (decode,
resize and crop fused in one pipelined graph that prefetches across iterations, ROI decoding of
only the crop), and ``nvidia-dali-cuda130`` is on PyPI. It was not chosen because it is a large,
Linux-only binary dependency tied to one CUDA major version (a project that also runs on CPU-only
machines would carry it or branch on it); its graph cannot run where finebench's tests run, so
the GPU branch would be covered by no test; and its resize filters and random streams differ from
the worker path, so the two paths could not be checked pixel for pixel. torchvision is already a
dependency and reaches the same nvJPEG hardware engine. If the H200 measurement
(``measure_throughput``) falls short of the issue's target (the loader at 1.5x the WRN-50-2 + A&R
step it feeds), DALI is the next candidate behind the same ``dataset.decode`` switch.

Hazard handled here: nvJPEG's hardware engine may write its output buffers before work already
queued on the allocating stream has run, and PyTorch's caching allocator hands out a block as
soon as it is freed on that stream (pytorch/vision#9606, meta-pytorch/torchcodec#1634). So on
CUDA the decode and transforms run on a side stream that holds only this loader's own work and is
synchronised before each decode: freed training tensors (main stream) are never handed to the
decoder, and the training step queued on the main stream keeps running during the decode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finebench.data.presets import Normalise, Transform, device_pixels, rank_seed
from finebench.data.sampler import SamplerFactory, train_sampler
from finebench.errors import FinebenchError

JPEG_MAGIC = b"\xff\xd8\xff"
PROBE_IMAGES = 32
"""Images (spread over a split) whose header bytes decide whether a store is JPEG-encoded."""


class EncodedImages(Protocol):
    """Encoded images and labels of one or more store splits (the loader's column reader)."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def image_bytes(self, index: int) -> bytes: ...


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def all_jpeg(images: EncodedImages, probe: int = PROBE_IMAGES) -> bool:
    """Whether the images are JPEG-encoded, judged from up to ``probe`` of them spread evenly."""
    if len(images) == 0:
        return False
    picks = np.unique(np.linspace(0, len(images) - 1, num=min(probe, len(images))).round().astype(int))
    return all(is_jpeg(images.image_bytes(int(i))) for i in picks)


DECODE_CHOICES = ("auto", "workers", "device")
"""The ``dataset.decode`` recipe switch: "auto" takes this path for JPEG stores with the ``imagenet``
recipe when training on CUDA; "device" forces it on any device (CPU too); "workers" never."""


def decode_on_device(
    decode: str, *, augmentation: str, device: torch.device, jpeg: Callable[[], bool], dataset: str
) -> bool:
    """Whether a store's batches should be decoded on ``device``; ``jpeg`` is asked only when it matters.

    "auto" stays on the worker path off CUDA: there one process decodes each batch image by image,
    while worker processes decode on every core, so only the worker path grows with the core count
    (on the 2-core development machine the two ran within noise of each other: benchmarks/README.md).
    """
    if decode not in DECODE_CHOICES:
        raise FinebenchError(f"decode {decode!r} is not valid: expected one of {', '.join(DECODE_CHOICES)}")
    if decode == "workers" or (decode == "auto" and torch.device(device).type != "cuda"):
        return False
    if augmentation != "imagenet":
        if decode == "device":
            raise FinebenchError(
                f"dataset {dataset!r}: decode 'device' needs the imagenet augmentation (resize, crop), "
                f"got {augmentation!r}"
            )
        return False
    if not jpeg():
        if decode == "device":
            raise FinebenchError(
                f"dataset {dataset!r}: decode 'device' needs JPEG-encoded images; the store holds others"
            )
        return False
    return True


def decoder_library(choice: str | None = None) -> str:
    """The library that decodes images: TorchCodec where it is installed and loads (torchvision 0.29
    deprecates its own decoders in its favour; ``pip install 'finebench[codec]'``), torchvision.io
    otherwise. Both give the same pixels on the CPU (tested)."""
    if choice is not None:
        return choice
    try:
        import torchcodec.decoders  # noqa: F401  (it loads native libraries: may fail though installed)
    except (ImportError, OSError, RuntimeError):
        return "torchvision"
    return "torchcodec"


def image_decoders(library: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(decode_jpeg, decode_image) of ``library``, both returning RGB uint8 3×H×W tensors;
    decode_jpeg also takes a list and a ``device`` (nvJPEG on CUDA)."""
    if library == "torchcodec":
        from torchcodec.decoders import decode_image, decode_jpeg

        return partial(decode_jpeg, mode="RGB"), partial(decode_image, mode="RGB")
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    return partial(decode_jpeg, mode=ImageReadMode.RGB), partial(decode_image, mode=ImageReadMode.RGB)


def decode_jpegs(
    encoded: Sequence[torch.Tensor], device: torch.device, names: Sequence[object] | None = None,
    library: str | None = None,
) -> list[torch.Tensor]:
    """uint8 3×H×W images on ``device`` from 1-D uint8 CPU tensors of encoded bytes, in one batched call.

    Entries that are not JPEG (a PNG in a mostly-JPEG store) are decoded on the CPU and moved, and
    so, when the batched call fails, is each JPEG the device decoder rejects (nvJPEG does not take
    every JPEG libjpeg does, e.g. CMYK or arithmetic-coded ones). An image no decoder takes is a
    ``FinebenchError`` naming it by ``names`` (dataset indices) or its position. ``library``:
    ``decoder_library``'s choice unless given.
    """
    decode_jpeg, decode_image = image_decoders(decoder_library(library))

    def one(position: int) -> torch.Tensor:
        data = encoded[position]
        if device.type != "cpu" and is_jpeg(bytes(data[:3].tolist())):
            with contextlib.suppress(RuntimeError):
                return decode_jpeg(data, device=device)
        try:
            return decode_image(data).to(device)
        except RuntimeError as error:
            name = names[position] if names is not None else f"at batch position {position}"
            raise FinebenchError(f"image {name} cannot be decoded ({error}): prepare the dataset again") from error

    jpeg = [i for i, data in enumerate(encoded) if is_jpeg(bytes(data[:3].tolist()))]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    if jpeg:
        try:
            decoded = decode_jpeg([encoded[i] for i in jpeg], device=device)
        except RuntimeError:
            decoded = [one(i) for i in jpeg]
        for i, image in zip(jpeg, decoded):
            images[i] = image
    return [image if image is not None else one(i) for i, image in enumerate(images)]


# ---- byte reading in workers ------------------------------------------------------------------


class EncodedBytes(Dataset):
    """(encoded bytes as a 1-D uint8 tensor, label) per index: all a worker process does on this path."""

    def __init__(self, images: EncodedImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        data = self.images.image_bytes(index)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), int(self.images.labels[index]), index


def collate_bytes(batch: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, ...]:
    """One flat byte tensor, the lengths, the labels and the indices: one shared-memory block per
    batch instead of one per image (128 separate tensors would cost 128 file descriptors between
    processes)."""
    lengths = torch.tensor([len(data) for data, _, _ in batch], dtype=torch.int64)
    return (torch.cat([data for data, _, _ in batch]), lengths, torch.tensor([label for _, label, _ in batch]),
            torch.tensor([index for _, _, index in batch]))


# ---- the loader -------------------------------------------------------------------------------


class DeviceJpegLoader:
    """Batches (float32 B×3×size×size normalised, int64 B) on ``device`` from JPEG bytes.

    Order comes from ``sampler`` (a ``BatchShardSampler``, the same batches as the worker path;
    call ``sampler.set_epoch``) or ``indices`` (evaluation shards); crop offsets, flips and colour
    jitter factors come from ``generator`` (CPU, so the stream is the same on any device, and the engine checkpoints
    it, so a resumed run repeats the uninterrupted one).
    """

    def __init__(
        self,
        images: EncodedImages,
        transform: Transform,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        sampler: Sampler[int] | None = None,
        indices: Sequence[int] | None = None,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.transform, self.device, self.sampler = transform, torch.device(device), sampler
        self.batch_size = getattr(sampler, "local_batch", batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.normalise = Normalise(transform.mean, transform.std, self.device)
        order = sampler if sampler is not None else (list(indices) if indices is not None else None)
        self.reader = DataLoader(
            EncodedBytes(images), batch_size=self.batch_size, sampler=order, shuffle=False, num_workers=workers,
            collate_fn=collate_bytes, pin_memory=pin_memory, persistent_workers=workers > 0,
        )
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __len__(self) -> int:
        steps = getattr(self.sampler, "steps", None)
        return steps if steps is not None else len(self.reader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for flat, lengths, labels, indices in self.reader:
            yield self.batch(list(torch.split(flat, lengths.tolist())), labels, indices.tolist())

    def batch(
        self, encoded: list[torch.Tensor], labels: torch.Tensor, indices: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training or evaluation batch from encoded images (``indices`` name them in errors)."""
        if self.stream is None:
            return self._batch(encoded, labels, indices)
        main = torch.cuda.current_stream(self.device)
        self.stream.synchronize()  # see the module docstring: nothing queued when nvJPEG gets its buffers
        with torch.cuda.stream(self.stream):
            images, labels = self._batch(encoded, labels, indices)
        main.wait_stream(self.stream)
        images.record_stream(main)
        labels.record_stream(main)
        return images, labels

    def _batch(
        self, encoded: list[torch.Tensor], labels: torch.Tensor, indices: Sequence[int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = decode_jpegs(encoded, self.device, indices)
        pixels = device_pixels(images, self.transform, self.generator, self.normalise)
        return pixels, labels.to(self.device, non_blocking=True)


@dataclass
class DeviceSplits:
    """The device-decode path's loaders (``Loaders.path`` "device_decode")."""

    train: DeviceJpegLoader
    test: DeviceJpegLoader
    validation: DeviceJpegLoader | None


def device_decode_loaders(
    train_images: EncodedImages, test_images: EncodedImages, train_transform: Transform, test_transform: Transform,
    *, batch_size: int, eval_batch_size: int | None, workers: int, seed: int, rank: int, world_size: int,
    pin_memory: bool, device: torch.device, sampler_factory: SamplerFactory | None = None,
    validation_images: EncodedImages | None = None,
) -> DeviceSplits:
    """Train, test and validation loaders on this path, sharded as the worker path's."""

    def evaluation(images: EncodedImages) -> DeviceJpegLoader:
        # Non-padded shards, as on the worker path: every image is evaluated once, by one worker.
        return DeviceJpegLoader(
            images, test_transform, batch_size=-(-(eval_batch_size or batch_size) // world_size),
            seed=seed, device=device, indices=range(rank, len(images), world_size), workers=workers,
            pin_memory=pin_memory,
        )

    sampler = train_sampler(sampler_factory, train_images.labels, batch_size, rank=rank, world_size=world_size,
                            seed=seed)
    train = DeviceJpegLoader(
        train_images, train_transform, batch_size=batch_size, seed=rank_seed(seed, rank), device=device,
        sampler=sampler, workers=workers, pin_memory=pin_memory,
    )
    return DeviceSplits(train, evaluation(test_images),
                        None if validation_images is None else evaluation(validation_images))
