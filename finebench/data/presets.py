"""What every data path shares about its pixels (after torchvision's references/classification/presets.py):
the resize box, the normalisation and the per-rank augmentation seed. The worker, in-memory, device-decode and
evaluation paths all call these, so the four paths cannot drift apart.
"""

from __future__ import annotations

import torch

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


def resized_size(width: int, height: int, resize: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``resize``, never below the crop ``size``:
    one rule, so the worker and device paths crop the same boxes."""
    scale = resize / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))
