"""build_loaders over tiny prepared stores: shapes, normalisation, determinism, splits, sharding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset
from finebench.data.config import CIFAR_MEAN, CIFAR_STD
from finebench.data.loader import build_loaders
from finebench.data.prepare import prepare_dataset
from finebench.data.sampler import BatchShardSampler
from finebench.errors import FinebenchError

RNG = np.random.default_rng(0)
SMALL_TRAIN = RNG.integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)
SMALL_TEST = RNG.integers(0, 256, (7, 32, 32), dtype=np.uint8)  # grayscale on purpose


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def _parse_small(raw_dir: Path) -> ParsedDataset:
    return ParsedDataset(
        ["a", "b", "c"],
        {
            "train": [Example(image, i % 3) for i, image in enumerate(SMALL_TRAIN)],
            "test": [Example(image, i % 3) for i, image in enumerate(SMALL_TEST)],
        },
    )


def _parse_large(raw_dir: Path) -> ParsedDataset:
    rng = np.random.default_rng(1)
    images = [_jpeg(rng.integers(0, 256, (90 + 7 * i, 120, 3), dtype=np.uint8)) for i in range(6)]
    return ParsedDataset(["x", "y"], {f"fold{k}": [Example(images[2 * k + j], j) for j in range(2)] for k in range(3)})


def _spec(name: str, parse) -> DatasetSpec:
    return DatasetSpec(name=name, num_classes=0, split_sizes={}, protocol="test", terms="test", homepage="", parse=parse, offline=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name, parse in (("tiny_small", _parse_small), ("tiny_large", _parse_large)):
        with registry.override(_spec(name, parse)):
            prepare_dataset(name, root, quiet=True)
    return root


def _batches(loader, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            break
    return out


def test_batches_are_normalised_float_images_and_int64_labels(data_root: Path) -> None:
    loaders = build_loaders("tiny_small", data_root, batch_size=8)
    images, labels = next(iter(loaders.train))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert (loaders.classes, loaders.num_classes, loaders.train_size, loaders.test_size) == (["a", "b", "c"], 3, 21, 7)
    test_images, test_labels = next(iter(loaders.test))
    assert test_images.shape == (7, 3, 32, 32) and test_labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    # Test images are not augmented: grayscale copied to three channels, then normalised.
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    expected = (torch.from_numpy(SMALL_TEST[2]).float().expand(3, 32, 32) / 255 - mean) / std
    torch.testing.assert_close(test_images[2], expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_depend_only_on_the_seed(data_root: Path, workers: int) -> None:
    first = _batches(build_loaders("tiny_small", data_root, batch_size=4, seed=3, workers=workers).train)
    again = _batches(build_loaders("tiny_small", data_root, batch_size=4, seed=3, workers=workers).train)
    other = _batches(build_loaders("tiny_small", data_root, batch_size=4, seed=4, workers=workers).train)
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(x1, x3) for (x1, _), (x3, _) in zip(first, other))


def test_cifar_augmentation_changes_pixels_but_not_labels_and_none_is_exact(data_root: Path) -> None:
    plain = build_loaders("tiny_small", data_root, batch_size=21, augmentation="none", seed=0)
    augmented = build_loaders("tiny_small", data_root, batch_size=21, augmentation="cifar", seed=0)
    (x_plain, y_plain), (x_aug, y_aug) = next(iter(plain.train)), next(iter(augmented.train))
    assert torch.equal(y_plain, y_aug)  # same seed, same shuffle
    assert not torch.equal(x_plain, x_aug)


def test_imagenet_recipe_resizes_and_crops_to_input_size(data_root: Path) -> None:
    loaders = build_loaders("tiny_large", data_root, batch_size=2, input_size=64, train_split="fold1+fold2", test_split="fold0")
    assert (loaders.train_size, loaders.test_size) == (4, 2)
    images, _ = next(iter(loaders.train))
    test_images, _ = next(iter(loaders.test))
    assert images.shape == test_images.shape == (2, 3, 64, 64)
    assert loaders.meta["image_max_side"] > 64


def test_unknown_split_lists_the_available_ones(data_root: Path) -> None:
    with pytest.raises(FinebenchError, match=r"no split 'fold9'.*fold0, fold1, fold2"):
        build_loaders("tiny_large", data_root, batch_size=2, train_split="fold1+fold9", test_split="fold0")


def test_unprepared_dataset_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(FinebenchError, match=r"dataset 'cifar10' is not prepared in .*: run `finebench prepare cifar10 --data-root "):
        build_loaders("cifar10", tmp_path, batch_size=2)


def test_distributed_shards_cover_every_test_image_exactly_once(data_root: Path) -> None:
    seen = []
    for rank in range(3):
        loaders = build_loaders("tiny_small", data_root, batch_size=6, rank=rank, world_size=3, seed=0)
        assert isinstance(loaders.train.sampler, BatchShardSampler)
        assert loaders.train.sampler.world_size == 3 and loaders.train.sampler.rank == rank
        seen.extend(loaders.test.dataset.indices)
    assert sorted(seen) == list(range(7))


def test_a_last_training_batch_of_one_is_dropped(data_root: Path) -> None:
    loaders = build_loaders("tiny_small", data_root, batch_size=10)  # 21 = 10 + 10 + 1
    assert [len(y) for _, y in loaders.train] == [10, 10]
