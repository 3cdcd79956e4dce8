"""What every data path shares about its pixels (after torchvision's references/classification/presets.py):
the resize box, the normalisation, the per-rank augmentation seed and the training colour jitter. The worker,
in-memory, device-decode and evaluation paths all call these, so the four paths cannot drift apart.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any

import torch
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
