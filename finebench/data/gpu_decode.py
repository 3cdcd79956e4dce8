"""JPEG batches decoded and augmented on the training device; CPU workers only read encoded bytes.

Why: at 224 px the worker path spends most of a sample's time in the PIL JPEG decode, so on a
16-core GPU host it delivered less than the GPU trains on (benchmarks/README.md, "Decisions"). Here worker processes read each batch's encoded bytes from the
Arrow store; the main process decodes the whole batch with one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA, batched and on the
hardware JPEG engine where the GPU has one; libjpeg-turbo on CPU), then resizes (antialiased
bilinear), crops, flips and normalises on the device. The arithmetic is the worker path's
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
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from finebench.data.presets import ColorJitter, Normalise, Resize, resized_size
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


# ---- transforms -------------------------------------------------------------------------------


def crop_offsets(
    sizes: Sequence[tuple[int, int]], size: int, generator: torch.Generator | None
) -> torch.Tensor:
    """(left, top) of each crop in its resized image: uniform (train) or centred (``generator`` None)."""
    spans = torch.tensor([[width - size, height - size] for width, height in sizes], dtype=torch.int64).view(-1, 2)
    if generator is None:
        return spans // 2
    draws = torch.rand(spans.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((draws * (spans + 1)).floor().to(torch.int64), spans)


def resize_crop_flip(
    images: Sequence[torch.Tensor],
    *,
    size: int,
    resize: Resize,
    offsets: torch.Tensor,
    flips: torch.Tensor | None = None,
    float_resize: bool | None = None,
) -> torch.Tensor:
    """float32 B×3×size×size of whole grey levels 0..255: each uint8 3×H×W image resized (``resize``
    as ``presets.resized_size`` reads it, antialiased bilinear), cropped at its ``offsets`` row (left, top) and flipped
    where ``flips``. Images of one size are resized in one call.

    ``float_resize`` (default: everywhere but on the CPU) resizes in float32, because CUDA has no
    uint8 antialiased kernel; on the CPU the uint8 kernel is the worker path's own and several
    times faster. Both agree with the worker path within one grey level, and the tests run both on
    CPU tensors, so the code the GPU runs is covered.
    """
    if not images:
        raise ValueError("resize_crop_flip needs at least one image")
    device = images[0].device
    in_float = device.type != "cpu" if float_resize is None else float_resize
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32 if in_float else torch.uint8, device=device)
    if _pixel_major(images[0]):
        out = out.contiguous(memory_format=torch.channels_last)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[1:]), []).append(index)
    lefts, tops = offsets[:, 0].tolist(), offsets[:, 1].tolist()
    for (height, width), members in groups.items():
        new_width, new_height = resized_size(width, height, resize, size)
        batch = _stack_keeping_layout([images[i] for i in members])
        if in_float:
            batch = batch.float()
        if (new_height, new_width) != (height, width):
            batch = F.interpolate(batch, size=(new_height, new_width), mode="bilinear", antialias=True,
                                  align_corners=False)
        for row, index in enumerate(members):
            top, left = tops[index], lefts[index]
            out[index] = batch[row, :, top : top + size, left : left + size]
    if flips is not None and bool(flips.any()):
        # torch.where, not boolean indexing: indexing with a mask waits for the GPU to count it.
        out = torch.where(flips.to(device).view(-1, 1, 1, 1), out.flip(-1), out)
    return out.round_() if in_float else out.float()  # whole grey levels, as the worker path's uint8 images


def _pixel_major(image: torch.Tensor) -> bool:
    """Whether a 3×H×W image is an H×W×3 block seen through a permute (how libjpeg's output comes)."""
    return image.permute(1, 2, 0).is_contiguous()


def _stack_keeping_layout(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """B×3×H×W in the images' own memory order: stacking pixel-major images as planes is an
    element-by-element copy, several times slower than the resize itself on the CPU."""
    if all(_pixel_major(image) for image in images):
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(list(images))


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


@dataclass(frozen=True)
class DeviceTransform:
    """The ``imagenet`` recipe's settings (see ``finebench.data.loader``) for one split."""

    size: int
    resize: Resize
    train: bool
    flip: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jitter: ColorJitter | None = None
    """Training only: colour jitter after the crop and flip, on the uint8 pixels as the worker path."""


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
        transform: DeviceTransform,
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
        transform = self.transform
        images = decode_jpegs(encoded, self.device, indices)
        sizes = [resized_size(image.shape[2], image.shape[1], transform.resize, transform.size) for image in images]
        offsets = crop_offsets(sizes, transform.size, self.generator if transform.train else None)
        flips = None
        if transform.train and transform.flip:
            flips = torch.rand(len(images), generator=self.generator) < 0.5
        pixels = resize_crop_flip(images, size=transform.size, resize=transform.resize, offsets=offsets, flips=flips)
        if transform.train and transform.jitter is not None:
            # whole grey levels 0..255 already: uint8 exactly, jittered as the worker path's uint8 images
            pixels = transform.jitter.apply_batch(pixels.clamp(0, 255).to(torch.uint8), self.generator).float()
        return self.normalise(pixels).contiguous(), labels.to(self.device, non_blocking=True)
