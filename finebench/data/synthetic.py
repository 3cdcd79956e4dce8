"""Synthetic photographs and a JPEG store made of them, for timing data paths without a download.

The images are smooth random colour fields with a few hard edges and sensor-like noise, so their
JPEG sizes and decode times are close to real photographs' (a flat image decodes far faster).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field with a few hard edges and sensor-like noise."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.int16)
    for _ in range(3):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[top : top + height // 3, left : left + width // 3] += rng.integers(-60, 60, 3).astype(np.int16)
    image += rng.integers(-8, 9, image.shape).astype(np.int16)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    synthetic_photo(rng, width, height).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def prepare_synthetic_jpeg_store(
    data_root: Path, name: str, *, train: int, test: int, size: tuple[int, int], classes: int = 10, seed: int = 0
) -> Path:
    """Prepare ``<data_root>/<name>`` from synthetic JPEGs of ``size`` (width, height) through the real
    store writer, under a temporary registry entry; returns the data root."""
    from finebench.data.prepare import prepare_dataset

    rng = np.random.default_rng(seed)
    names = [f"class{i}" for i in range(classes)]

    def parse(_raw_dir: Path) -> ParsedDataset:
        splits = {split: [Example(synthetic_jpeg(rng, *size), i % classes) for i in range(count)]
                  for split, count in (("train", train), ("test", test))}
        return ParsedDataset(names, splits)

    spec = DatasetSpec(name=name, num_classes=classes, split_sizes={}, protocol="synthetic", terms="synthetic",
                       homepage="", parse=parse, offline=True)
    with registry.override(spec):
        prepare_dataset(name, Path(data_root), quiet=True)
    return Path(data_root)
