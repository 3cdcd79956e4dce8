"""The validation split of a run: the one resolver every loader path takes it from.

``dataset.validation`` is either ``{fraction, seed}``, a class-stratified share of the training
split held out of training, or ``{split}``, a split of the store of its own (FGVC-Aircraft's and
Oxford Flowers' ``val``). A carved split is chosen per class: each class gives
``floor(fraction * n + 0.5)`` of its ``n`` training images, picked by a permutation of that class's
positions drawn from ``numpy.random.default_rng(seed)``; a class that would give all its images is
refused (``CarveError``), so every class keeps at least one training image.

Why numpy's ``Generator`` and no library split (scikit-learn's ``StratifiedShuffleSplit``): numpy is
already what the loaders draw augmentation from, the generator is local (the global python, numpy
and torch streams that training draws from are untouched, so the training of a run does not depend
on whether its validation images were chosen before it), the per-class rule above is four lines we
can state exactly (scikit-learn's allocation of counts over classes does not promise a training image
per class), and it adds no dependency. numpy does not promise the same ``Generator`` stream across
its versions (NEP 19), so the chosen positions are recorded with their digest in the run's
``validation.json`` and a resume that would choose others stops rather than mix two splits.

Positions are indices into the run's training split as the loaders concatenate it (``train`` or,
on a k-fold dataset, ``fold1+fold2+...``: each held-out fold carves its own validation images from
its own training folds, never from the test fold).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from finebench.errors import FinebenchError


class CarveError(FinebenchError):
    """A fraction that would leave a class without a training image."""


def _taken(count: np.ndarray, fraction: float) -> np.ndarray:
    """Validation images per class: ``fraction`` of each class's count, rounded half up."""
    return np.floor(count * fraction + 0.5).astype(np.int64)


def largest_fraction(count: int) -> float:
    """The fraction just below which a class of ``count`` images keeps one training image:
    ``floor(f * n + 0.5) <= n - 1`` holds exactly when ``f < (n - 0.5) / n``."""
    return (count - 0.5) / count


def carve(labels: np.ndarray, fraction: float, seed: int, classes: Sequence[str] | None = None) -> np.ndarray:
    """The sorted positions (int64) of the validation images carved from training ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    counts = np.array([int((labels == label).sum()) for label in present], dtype=np.int64)
    taken = _taken(counts, fraction)
    full = np.nonzero(taken >= counts)[0]
    if len(full):
        worst = int(full[np.argmin(counts[full])])
        label = int(present[worst])
        name = classes[label] if classes is not None and label < len(classes) else str(label)
        smallest = int(counts.min())
        raise CarveError(
            f"dataset.validation.fraction = {fraction}: class {name!r} has {int(counts[worst])} training "
            f"image{'s' if counts[worst] != 1 else ''} and would keep none; a fraction below "
            f"{largest_fraction(smallest):.4g} keeps one of each class (the smallest has {smallest}), "
            "or name a split of the store with dataset.validation = { split = \"...\" }"
        )
    if not taken.sum():
        raise CarveError(
            f"dataset.validation.fraction = {fraction}: rounds to no validation image in any class "
            f"(the largest has {int(counts.max())} training images); choose a larger fraction"
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.nonzero(labels == label)[0])[:take] for label, take in zip(present, taken)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def digest(positions: Sequence[int] | np.ndarray) -> str:
    """sha256 of the positions, comma-separated in increasing order: the split's fingerprint."""
    text = ",".join(str(int(p)) for p in np.sort(np.asarray(positions, dtype=np.int64)))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ValidationChoice:
    """What the loaders hold out and evaluate: ``positions`` of the training split (carved), or ``split``."""

    train_split: str
    split: str | None = None
    """A named split of the store; training keeps every image of ``train_split``."""
    positions: np.ndarray | None = None
    """Carved: the held-out positions in ``train_split`` (sorted int64); training keeps the rest."""
    fraction: float | None = None
    seed: int | None = None

    def train_positions(self, size: int) -> np.ndarray | None:
        """The positions training keeps out of a split of ``size`` images (None: all of them)."""
        if self.positions is None:
            return None
        keep = np.ones(size, dtype=bool)
        keep[self.positions] = False
        return np.nonzero(keep)[0].astype(np.int64)

    def record(self, size: int | None = None) -> dict[str, Any]:
        """The run's record of it (``validation.json``): enough to check a resume or rebuild the split."""
        if self.positions is None:
            return {"split": self.split, "train_split": self.train_split}
        return {"fraction": self.fraction, "seed": self.seed, "train_split": self.train_split,
                "train_split_size": size, "count": len(self.positions), "digest": digest(self.positions),
                "ids": [int(p) for p in self.positions],
                "ids_are": "positions in train_split (its splits concatenated in order, as the loaders read them)"}


def resolve_validation(
    setting: Mapping[str, Any] | None, train_split: str, train_labels: np.ndarray,
    classes: Sequence[str] | None = None,
) -> ValidationChoice | None:
    """``dataset.validation`` (a recipe's or config.json's mapping) for one run's training split."""
    if not setting:
        return None
    if setting.get("split") is not None:
        return ValidationChoice(train_split, split=str(setting["split"]))
    fraction, seed = float(setting["fraction"]), int(setting.get("seed") or 0)
    return ValidationChoice(train_split, positions=carve(train_labels, fraction, seed, classes),
                            fraction=fraction, seed=seed)


def split_overlap(validation_split: str, train_split: str, test_split: str) -> str | None:
    """Why a named validation split cannot serve beside these splits (it is trained or tested on), or None."""
    names = {part.strip() for part in validation_split.split("+")}
    trained = names & {part.strip() for part in train_split.split("+")}
    tested = names & {part.strip() for part in test_split.split("+")}
    if trained:
        return (f"{min(trained)!r} is also in train_split {train_split!r}: training would see the "
                "validation images; drop it from train_split")
    if tested:
        return f"{min(tested)!r} is the test split {test_split!r}: select on a split of its own"
    return None
