"""The transforms of every data path (after torchvision's references/classification/presets.py): the
train and eval presets that turn a store's images into the pixels the network sees, on the PIL worker
path (``Transform.pixels``), in memory (``InMemoryAugment``), on the device (``device_pixels``) and for
tools that feed a trained model (``EvalTransform``), with what they share: the resize box, the
normalisation, the per-rank augmentation seed and the training colour jitter. One module, so the four
paths cannot drift apart; the settings come resolved from ``finebench.data.config``, and the loaders
(``finebench.data.loader``, ``in_memory``, ``gpu_decode``) only deliver batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from torchvision.transforms import v2

RANK_SEED_STRIDE = 1000
"""Ranks of a distributed run draw augmentations from seeds this far apart."""


def rank_seed(seed: int, rank: int) -> int:
    """The augmentation seed of one rank: each rank's random crops and flips differ, and a run with
    the same seed and world size draws the same ones again."""
    return seed + RANK_SEED_STRIDE * rank


class Normalise:
    """uint8-scale pixels (0-255, as floats) to ``(x / 255 - mean) / std``, per channel.

    The statistics are scaled by 255 once, so every path does the same two float operations and
    gives the same bits. Shaped ``1×3×1×1`` for a batch (B×C×H×W); one image goes in as a batch of one.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | None = None) -> None:
        self.mean = (torch.tensor(mean) * 255).view(1, 3, 1, 1).to(device)
        self.std = (torch.tensor(std) * 255).view(1, 3, 1, 1).to(device)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std


Resize = int | tuple[int, int]
"""The resize before the crop: an int scales the shorter side to it (aspect kept, torchvision's
``Resize(n)``); a (height, width) pair scales to exactly that size (aspect not kept, torchvision's
``Resize((h, w))``, the official pipelines of WS-DAN, CAL, API-Net, PMG and MCL)."""


def resized_size(width: int, height: int, resize: Resize, size: int) -> tuple[int, int]:
    """(width, height) after ``resize`` (see ``Resize``), never below the crop ``size``: one rule,
    so the worker and device paths crop the same boxes."""
    if isinstance(resize, tuple):
        return max(size, resize[1]), max(size, resize[0])
    scale = resize / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def draft_size(width: int, height: int, resize: Resize) -> tuple[int, int]:
    """The smallest (width, height) a JPEG may be decoded at (PIL ``draft``) and still hold every
    pixel ``resize`` keeps: libjpeg then decodes at 1/2, 1/4 or 1/8 scale where it can."""
    if isinstance(resize, tuple):
        return resize[1], resize[0]
    scale = resize / min(width, height)
    return math.ceil(width * scale), math.ceil(height * scale)


class Normalization(BaseModel):
    """``dataset.normalize`` as numbers: per-channel (R, G, B) ``mean`` and ``std`` of pixels scaled
    to 0..1, as torchvision's ``Normalize(mean, std)`` takes them."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    mean: Annotated[list[float], Field(min_length=3, max_length=3)]
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)]

    def pair(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(mean, std) as the loaders take them."""
        return (self.mean[0], self.mean[1], self.mean[2]), (self.std[0], self.std[1], self.std[2])


class ColorJitter(BaseModel):
    """``dataset.color_jitter``: torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` on
    training images, after the crop and flip and before normalisation (where WS-DAN's and CAL's
    official transforms put it); never at test. 0 leaves a property alone, as in torchvision.

    Why torchvision's own transform with only the draws moved: the ranges (brightness ``b`` gives
    factors in [max(0, 1-b), 1+b]), the random order of the four adjustments and the uint8 colour
    arithmetic are then torchvision's by construction, while the factors come from the run's
    augmentation generator instead of the global torch RNG, so seeded runs and kill-and-resume
    repeat them. The kernels are torchvision's uint8 tensor ones; the official code jittered PIL
    images (``transforms.ColorJitter``), which give the same factors' pixels within 2 grey levels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    brightness: Annotated[float, Field(ge=0)] = 0.0
    contrast: Annotated[float, Field(ge=0)] = 0.0
    saturation: Annotated[float, Field(ge=0)] = 0.0
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.0

    @model_validator(mode="after")
    def _something_to_do(self) -> ColorJitter:
        # One way to say "no jitter" (leave the key out), so a no-op table cannot change a run id.
        if not any((self.brightness, self.contrast, self.saturation, self.hue)):
            raise ValueError("every property is 0: set brightness, contrast, saturation or hue above 0, "
                             "or remove color_jitter for no jitter")
        return self

    def torchvision(self) -> v2.ColorJitter:
        """The torchvision transform of these settings (built once per setting)."""
        return _torchvision_jitter(self.brightness, self.contrast, self.saturation, self.hue)

    def draw(self, generator: torch.Generator) -> dict[str, Any]:
        """One image's parameters, drawn as torchvision's ``ColorJitter.make_params`` draws them
        (a permutation of the four adjustments, then one uniform factor per active property, in
        the order brightness, contrast, saturation, hue), from ``generator``."""
        jitter = self.torchvision()
        order = torch.randperm(4, generator=generator, device="cpu")

        def factor(bounds: tuple[float, float] | None) -> float | None:
            if bounds is None:
                return None
            return float(torch.empty(1, device="cpu").uniform_(bounds[0], bounds[1], generator=generator).item())

        return {"fn_idx": order, "brightness_factor": factor(jitter.brightness),
                "contrast_factor": factor(jitter.contrast), "saturation_factor": factor(jitter.saturation),
                "hue_factor": factor(jitter.hue)}

    def apply(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One uint8 3×H×W image jittered with factors drawn from ``generator`` (uint8 out)."""
        return self.torchvision().transform(image, self.draw(generator))

    def apply_batch(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 B×3×H×W images, each with its own draw (in batch order), as torchvision jitters
        each image of a dataset; one image at a time because torchvision's factors are scalars."""
        return torch.stack([self.apply(image, generator) for image in images])


@lru_cache(maxsize=16)
def _torchvision_jitter(brightness: float, contrast: float, saturation: float, hue: float) -> v2.ColorJitter:
    from torchvision.transforms import v2

    return v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)


# ---- the worker path and evaluation: one PIL image at a time ----------------------------------


@dataclass(frozen=True)
class Transform:
    """One split's transform (``config.DataConfig.transform``): ``kind`` "cifar" | "imagenet" | "none",
    ``train`` (random crop, flip and jitter) or test (centre crop), ``size`` the final side (None keeps
    the stored size), ``resize`` (imagenet: ``Resize`` before cropping; cifar/none: the square side)."""

    kind: str
    train: bool
    size: int | None
    resize: Resize | None
    flip: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jitter: ColorJitter | None = None  # training only

    def pixels(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """uint8 H×W×3 pixels of one decoded RGB image; crop offsets, flips and jitter drawn from ``rng``."""
        if self.kind == "imagenet":
            width, height = resized_size(*image.size, self.resize, self.size)
            if self.train:
                left, top = int(rng.integers(0, width - self.size + 1)), int(rng.integers(0, height - self.size + 1))
            else:
                left, top = (width - self.size) // 2, (height - self.size) // 2
            # torch's uint8 antialiased bilinear resize equals PIL's BILINEAR within one grey level and
            # runs about five times faster: it was most of a sample's cost (benchmarks/loader.py).
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
            resized = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
            array = resized[0, :, top : top + self.size, left : left + self.size].permute(1, 2, 0).numpy()
        else:
            if self.resize is not None and image.size != (self.resize, self.resize):
                image = image.resize((self.resize, self.resize), Image.BILINEAR)
            array = np.asarray(image)
            if self.kind == "cifar" and self.train:
                # Reflect-pad 4 then crop, done as one gather (np.pad per sample costs more than the decode).
                top, left = rng.integers(-4, 5, size=2)
                array = array[np.ix_(reflect_indices(np.arange(array.shape[0]) + top, array.shape[0]),
                                     reflect_indices(np.arange(array.shape[1]) + left, array.shape[1]))]
        if self.train and self.flip and rng.random() < 0.5:
            array = array[:, ::-1]
        if self.train and self.jitter is not None:
            # A torch generator seeded from the dataset's own numpy one: the draws stay in the state
            # the engine checkpoints (and worker_init_fn reseeds), and torchvision's draw order holds.
            generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
            pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
            array = self.jitter.apply(pixels, generator).permute(1, 2, 0).numpy()
        return array

    def decode(self, image: Image.Image) -> Image.Image:
        """The RGB pixels of an opened image as the loaders decode them: for the ``imagenet`` recipe a
        JPEG not yet loaded is decoded at 1/2, 1/4 or 1/8 scale where the resize would discard those
        pixels anyway (libjpeg's DCT scaling, so its pixels differ from a full decode then a resize)."""
        if self.kind == "imagenet" and image.format == "JPEG" and self.resize is not None:
            image.draft("RGB", draft_size(*image.size, self.resize))
        return image.convert("RGB")


def reflect_indices(indices: np.ndarray, size: int) -> np.ndarray:
    """Indices into an axis of ``size`` as ``np.pad(mode="reflect")`` maps out-of-range ones."""
    indices = np.abs(indices)
    return np.where(indices >= size, 2 * (size - 1) - indices, indices)


class Collate:
    """Stack uint8 samples and normalise the whole batch at once (picklable for worker processes)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.normalise = Normalise(mean, std)

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in batch]).float()
        labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
        return self.normalise(images), labels


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

    @classmethod
    def of(cls, transform: Transform) -> EvalTransform:
        return cls(transform.kind, transform.size, transform.resize, transform.mean, transform.std)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """``image`` as just opened (``Image.open``) decodes as the loader decodes the store's bytes
        (a JPEG at reduced scale, ``Transform.decode``); an image already loaded is taken as it is."""
        transform = Transform(self.kind, False, self.size, self.resize, False, self.mean, self.std)
        return np.array(transform.pixels(transform.decode(image), np.random.default_rng(0)), dtype=np.uint8)

    def normalise(self, array: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()
        return Normalise(self.mean, self.std)(pixels.unsqueeze(0))[0]


# ---- in memory: batches of decoded uint8 images on the device -----------------------------------


class InMemoryAugment:
    """The ``cifar`` augmentation (reflect-pad 4, random crop, flip) as one gather per batch whose
    indices fold in the padding, the crop and the flip, then the colour jitter image by image, then
    the normalisation; draws from the caller's CPU generator, so the stream is the same on any device."""

    def __init__(self, transform: Transform, height: int, width: int, device: torch.device) -> None:
        self.transform = transform
        self.normalise = Normalise(transform.mean, transform.std, device)
        self.pad = 4 if transform.kind == "cifar" and transform.train else 0
        self.augment = transform.train and (self.pad > 0 or transform.flip)
        # Source row/column of every position of the reflect-padded image.
        self.rows = torch.from_numpy(reflect_indices(np.arange(-self.pad, height + self.pad), height)).to(device)
        self.cols = torch.from_numpy(reflect_indices(np.arange(-self.pad, width + self.pad), width)).to(device)

    def __call__(self, images: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """float32 B×3×H×W normalised pixels of ``images[index]`` (uint8 N×3×H×W)."""
        if not self.augment:
            batch = images[index]
        else:
            count, (height, width), device = len(index), images.shape[2:], self.rows.device
            offsets = torch.randint(0, 2 * self.pad + 1, (count, 2), generator=generator).to(device)
            flips = torch.rand(count, generator=generator) < 0.5
            flips = (flips if self.transform.flip else torch.zeros_like(flips)).to(device)
            row_index = self.rows[offsets[:, :1] + torch.arange(height, device=device)]
            steps = torch.arange(width, device=device)
            col_index = self.cols[offsets[:, 1:] + torch.where(flips[:, None], width - 1 - steps, steps)]
            # Advanced indices around a slice put their dims first: B×H×W×C, back to B×C×H×W below.
            batch = images[index[:, None, None], :, row_index[:, :, None], col_index[:, None, :]].permute(0, 3, 1, 2)
        if self.transform.train and self.transform.jitter is not None:
            batch = self.transform.jitter.apply_batch(batch, generator)
        return self.normalise(batch.float()).contiguous()


# ---- on the device: decoded uint8 images of any sizes, in batches --------------------------------


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
    as ``resized_size`` reads it, antialiased bilinear), cropped at its ``offsets`` row (left, top) and flipped
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


def device_pixels(images: Sequence[torch.Tensor], transform: Transform, generator: torch.Generator,
                  normalise: Normalise) -> torch.Tensor:
    """The ``imagenet`` transform of decoded uint8 3×H×W images on their device: resize, random
    (train) or centre crop, flip and jitter drawn from ``generator``, normalised float32 B×3×H×W."""
    sizes = [resized_size(image.shape[2], image.shape[1], transform.resize, transform.size) for image in images]
    offsets = crop_offsets(sizes, transform.size, generator if transform.train else None)
    flips = None
    if transform.train and transform.flip:
        flips = torch.rand(len(images), generator=generator) < 0.5
    pixels = resize_crop_flip(images, size=transform.size, resize=transform.resize, offsets=offsets, flips=flips)
    if transform.train and transform.jitter is not None:
        # whole grey levels 0..255 already: uint8 exactly, jittered as the worker path's uint8 images
        pixels = transform.jitter.apply_batch(pixels.clamp(0, 255).to(torch.uint8), generator).float()
    return normalise(pixels).contiguous()
