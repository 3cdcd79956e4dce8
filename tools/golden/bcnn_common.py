"""Inputs both sides of the B-CNN golden test make from seeds (the 52M-entry classifier and the
512x28x28 features are regenerated, not stored): the harness (tools/golden/bcnn.py) and
tests/test_bcnn.py import this file, never the official code."""

from __future__ import annotations

import torch

BATCH, CHANNELS, SIDE, CLASSES = 2, 512, 28, 200
PROJECTIONS = 4


def features() -> torch.Tensor:
    """relu5_3-like non-negative features, B×512×28×28 (the port asserts 448 px input, 28x28 here)."""
    return torch.rand(BATCH, CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def classifier() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(CLASSES, CHANNELS**2, generator=generator, dtype=torch.float64) * 0.003
    bias = torch.randn(CLASSES, generator=generator, dtype=torch.float64) * 0.01
    return weight, bias


def labels() -> torch.Tensor:
    return torch.tensor([3, 187])


def projections(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Seeded random directions: a large gradient is compared through its projections on them."""
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(PROJECTIONS)]
