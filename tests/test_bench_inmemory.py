"""The in-memory uint8 path for small images: shapes, determinism, pixel/label correspondence, cache, choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset
from finebench.data.in_memory import InMemoryLoader
from finebench.data.loader import build_loaders
from finebench.data.prepare import prepare_dataset
from finebench.errors import FinebenchError
from finebench.train.rng import capture_rng_state, restore_rng_state

RNG = np.random.default_rng(7)
TRAIN = RNG.integers(0, 256, (22, 32, 32, 3), dtype=np.uint8)
TEST = RNG.integers(0, 256, (9, 32, 32), dtype=np.uint8)  # grayscale: expanded to RGB like the worker path
LARGE = RNG.integers(0, 256, (4, 80, 96, 3), dtype=np.uint8)


def _spec(name: str, splits: dict[str, np.ndarray]) -> DatasetSpec:
    def parse(_raw: Path) -> ParsedDataset:
        return ParsedDataset(["a", "b", "c"], {s: [Example(im, i % 3) for i, im in enumerate(a)] for s, a in splits.items()})

    return DatasetSpec(name=name, num_classes=3, split_sizes={}, protocol="test", terms="test", homepage="",
                       parse=parse, offline=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name, splits in (("mem_small", {"train": TRAIN, "test": TEST}), ("mem_large", {"train": LARGE, "test": LARGE})):
        with registry.override(_spec(name, splits)):
            prepare_dataset(name, root, quiet=True)
    return root


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_auto_holds_small_images_in_memory_with_the_usual_batches(data_root: Path) -> None:
    assert not isinstance(build_loaders("mem_small", data_root, batch_size=8).train, InMemoryLoader)  # opt-in
    loaders = build_loaders("mem_small", data_root, batch_size=8, seed=0, in_memory="auto")
    assert isinstance(loaders.train, InMemoryLoader) and isinstance(loaders.test, InMemoryLoader)
    batches = _epoch(loaders.train)
    assert len(loaders.train) == len(batches) == 3
    assert [tuple(images.shape) for images, _ in batches] == [(8, 3, 32, 32), (8, 3, 32, 32), (6, 3, 32, 32)]
    assert all(images.dtype == torch.float32 and labels.dtype == torch.int64 for images, labels in batches)
    assert sorted(torch.cat([labels for _, labels in batches]).tolist()) == sorted(i % 3 for i in range(22))


def test_auto_keeps_large_images_on_the_worker_path_and_forcing_them_is_an_error(data_root: Path) -> None:
    loaders = build_loaders("mem_large", data_root, batch_size=2, input_size=64, in_memory="auto")
    assert not isinstance(loaders.train, InMemoryLoader)
    with pytest.raises(FinebenchError, match="in_memory needs small images"):
        build_loaders("mem_large", data_root, batch_size=2, input_size=64, in_memory=True)
    with pytest.raises(FinebenchError, match="in_memory='fast'"):
        build_loaders("mem_small", data_root, batch_size=2, in_memory="fast")


def test_without_augmentation_batches_equal_the_worker_path_exactly(data_root: Path) -> None:
    fast = build_loaders("mem_small", data_root, batch_size=4, augmentation="none", in_memory=True)
    slow = build_loaders("mem_small", data_root, batch_size=4, augmentation="none", in_memory=False)
    for (fast_images, fast_labels), (slow_images, slow_labels) in zip(fast.test, slow.test, strict=True):
        assert torch.equal(fast_labels, slow_labels)
        assert torch.equal(fast_images, slow_images)


def test_the_same_seed_gives_the_same_epochs_and_another_seed_differs(data_root: Path) -> None:
    def two_epochs(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = build_loaders("mem_small", data_root, batch_size=8, seed=seed, in_memory=True).train
        first = _epoch(loader)
        loader.sampler.set_epoch(1)
        return first + _epoch(loader)

    first, again, other = two_epochs(3), two_epochs(3), two_epochs(4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], first[3][0])  # the second epoch is a new shuffle and new crops


def test_every_augmented_image_is_a_reflect_padded_crop_of_its_own_source_maybe_flipped() -> None:
    sources = torch.from_numpy(RNG.integers(0, 256, (12, 3, 8, 10), dtype=np.uint8))
    probe = build_probe(sources)
    seen_flip = seen_shift = False
    for images, labels in probe:
        for image, label in zip(images, labels, strict=True):
            pixels = (image * probe.std[0] + probe.mean[0]).round().to(torch.uint8)  # undo the normalisation
            padded = np.pad(sources[label].numpy(), ((0, 0), (4, 4), (4, 4)), mode="reflect")
            matches = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
                       if np.array_equal(pixels.numpy(), _crop(padded, top, left, flip))]
            assert matches, f"image of label {label} is no crop of its source"
            seen_flip |= any(flip for *_, flip in matches) and not any(not flip for *_, flip in matches)
            seen_shift |= (4, 4) not in [(top, left) for top, left, _ in matches]
    assert seen_flip and seen_shift


def build_probe(sources: torch.Tensor) -> InMemoryLoader:
    from finebench.data.config import CIFAR_MEAN, CIFAR_STD
    from finebench.data.presets import Transform

    recipe = Transform("cifar", True, 8, 8, True, CIFAR_MEAN, CIFAR_STD)
    return InMemoryLoader(sources, torch.arange(len(sources)), recipe, batch_size=5, seed=0)


def _crop(padded: np.ndarray, top: int, left: int, flip: bool) -> np.ndarray:
    crop = padded[:, top : top + 8, left : left + 10]
    return crop[:, :, ::-1] if flip else crop


def test_the_decoded_split_is_cached_beside_the_store_and_reused(data_root: Path) -> None:
    first = _epoch(build_loaders("mem_small", data_root, batch_size=8, seed=1, in_memory=True).train)
    cache = data_root / "mem_small" / "train.u8-32x32.npy"
    assert cache.is_file() and np.load(cache).shape == (22, 3, 32, 32)
    again = _epoch(build_loaders("mem_small", data_root, batch_size=8, seed=1, in_memory=True).train)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))


def test_decoding_a_split_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """Only a process that finds no cache decodes (on two workers, whichever reaches the store
    first), so a draw there would shift the run's dropout by whether, and where, the cache existed."""
    with registry.override(_spec("mem_fresh", {"train": TRAIN, "test": TEST})):
        prepare_dataset("mem_fresh", tmp_path, quiet=True)
    cache = tmp_path / "mem_fresh" / "train.u8-32x32.npy"
    for cached in (False, True):
        assert cache.is_file() == cached
        torch.manual_seed(0)
        before = torch.get_rng_state()
        build_loaders("mem_fresh", tmp_path, batch_size=8, seed=0, in_memory=True)
        assert torch.equal(torch.get_rng_state(), before), f"cache present: {cached}"


def test_ranks_take_their_share_of_each_global_batch_and_evaluate_each_test_image_once(data_root: Path) -> None:
    train_labels, test_labels = [], []
    for rank in range(2):
        loaders = build_loaders("mem_small", data_root, batch_size=8, seed=0, rank=rank, world_size=2, in_memory=True)
        loaders.train.sampler.set_epoch(5)
        batches = _epoch(loaders.train)
        assert [len(labels) for _, labels in batches] == [4, 4, 3]  # 22 = 2 x 8 + 6: the tail split 3 + 3
        train_labels.append(torch.cat([labels for _, labels in batches]))
        test_labels.append(torch.cat([labels for _, labels in loaders.test]))
    assert sorted(torch.cat(train_labels).tolist()) == sorted(i % 3 for i in range(22))
    assert sorted(torch.cat(test_labels).tolist()) == sorted(i % 3 for i in range(9))


def test_restoring_the_engines_rng_capture_replays_the_same_augmentation(data_root: Path) -> None:
    loader = build_loaders("mem_small", data_root, batch_size=8, seed=0, in_memory=True).train
    loader.sampler.set_epoch(2)
    state = capture_rng_state(loader)
    expected = _epoch(loader)
    _epoch(loader)
    restore_rng_state(state, loader)
    loader.sampler.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(expected, _epoch(loader), strict=True))


def test_large_images_are_resized_like_pil_bilinear_within_one_level(data_root: Path) -> None:
    from PIL import Image

    from finebench.data.config import IMAGENET_MEAN, IMAGENET_STD

    loaders = build_loaders("mem_large", data_root, batch_size=4, input_size=64)
    images, _ = next(iter(loaders.test))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255, torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    for image, source in zip(images, LARGE, strict=True):
        height, width = source.shape[:2]
        scale = round(64 * 256 / 224) / min(width, height)
        size = (round(width * scale), round(height * scale))
        resized = np.array(Image.fromarray(source).resize(size, Image.BILINEAR))
        left, top = (size[0] - 64) // 2, (size[1] - 64) // 2
        expected = torch.from_numpy(resized[top : top + 64, left : left + 64]).permute(2, 0, 1).int()
        pixels = (image * std + mean).round().int()
        assert (pixels - expected).abs().max() <= 1
