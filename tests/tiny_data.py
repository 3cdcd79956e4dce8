"""A tiny learnable image dataset prepared through finebench's real store, for end-to-end runs.

It is stored under a registered offline name (``mnist5k``) so that ``finebench`` subprocesses and
torchrun workers, which cannot see a test's registry override, still find the store by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset
from finebench.data.prepare import prepare_dataset

DATASET = "mnist5k"
CLASSES = 10


def _bars(count: int, rng: np.random.Generator) -> list[Example]:
    """16x16 noise with a bright bar whose row encodes the class: learnable in a few steps."""
    examples = []
    for i in range(count):
        label = i % CLASSES
        image = rng.integers(0, 60, (16, 16), dtype=np.uint8)
        image[label : label + 4, 2:14] = 255
        examples.append(Example(image, label))
    return examples


def prepare_tiny_bars(root: Path, train_images: int, test_images: int) -> Path:
    """Prepare the bars dataset into ``root`` and return ``root`` (the data root)."""

    def parse(raw_dir: Path) -> ParsedDataset:
        rng = np.random.default_rng(0)
        return ParsedDataset(
            [str(c) for c in range(CLASSES)], {"train": _bars(train_images, rng), "test": _bars(test_images, rng)}
        )

    spec = DatasetSpec(name=DATASET, num_classes=CLASSES, split_sizes={}, protocol="test", terms="test",
                       homepage="", parse=parse, offline=True)
    with registry.override(spec):
        prepare_dataset(DATASET, root, quiet=True)
    return root
