"""What a dataset builder is, so a new dataset is one short file.

A builder never downloads, verifies or writes: the shared code in ``download.py`` fetches and
checks the sources listed in its ``DatasetSpec`` and extracts them into ``raw_dir``; the builder's
``parse(raw_dir)`` reads the official layout and returns classes plus examples per split;
``writer.py`` writes them. This mirrors torchvision's datasets (sources as data at the top,
a few lines of parsing) without repeating the download logic in every dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

ImageSource = Union[Path, bytes, np.ndarray, Image.Image]
"""A file on disk (read as is, so JPEGs are not re-encoded), encoded bytes, an HxW(xC) uint8
array, or a PIL image."""


@dataclass(frozen=True)
class Example:
    image: ImageSource
    label: int
    group: int | None = None
    """Index into ``ParsedDataset.grouping.names`` (iNat's supercategory), for datasets that have one."""


@dataclass(frozen=True)
class Source:
    """One file of a dataset's official distribution.

    ``filename`` is the name the file has on disk after download (and what ``--from`` looks for).
    ``md5``/``sha256`` are verified before anything is read; ``None`` means no published digest
    (the digest actually seen is still recorded in meta.json). ``extract`` says whether the file
    is an archive to unpack into raw_dir, or a plain file to copy there.
    """

    filename: str
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    mirrors: tuple[str, ...] = ()
    extract: bool = True
    stream: bool = False
    """An image archive the builder can read member by member while the store is written (a tar it
    never needs on disk): prepare links it into raw_dir instead of extracting it, provided every such
    source of the dataset is at hand (else all are extracted, as before)."""


@dataclass(frozen=True)
class Grouping:
    """A coarse group every image belongs to (iNat's supercategory: Aves, Plantae, ...).

    Stored as the ``group`` column so accuracy can be broken down by group without the source
    annotations; ``of_class`` (class -> group index) is set only where the class decides the group,
    which is what lets a report derive per-group accuracy from a confusion matrix alone.
    """

    kind: str
    names: list[str]
    of_class: list[int] | None = None


@dataclass
class StreamedSplit:
    """A split whose images are members of image archives, read while the store is written, never
    extracted. Arrays, not an ``Example`` per image: 2.7 million of those would cost gigabytes."""

    members: Sequence[str]
    """Member names (no leading ``./``) in the split's order, which is the store's order."""
    labels: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class ArchiveStream:
    """Where a streamed dataset's images are, and how the builder names a disagreement with its lists."""

    archives: tuple[Path, ...]
    is_image: Callable[[str], bool]
    """Whether an archive member is an image that some split must list."""
    missing: Callable[[str, str, int], Exception]
    """(split, member, how many listed members are missing) -> the error to raise."""
    unlisted: Callable[[str], Exception]
    """An image member no split lists -> the error to raise (at once: nothing is stored for it)."""


@dataclass
class ParsedDataset:
    classes: list[str]
    splits: dict[str, Iterable[Example]]
    """Split name -> examples. ``train``/``test`` (+ ``val``), or ``fold0``..``foldK`` for k-fold."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything worth recording in meta.json (e.g. which split files were used)."""
    grouping: Grouping | None = None
    """When set, every example carries ``group`` and the store gets a ``group`` column."""
    stream: ArchiveStream | None = None
    """When set, ``splits`` holds ``StreamedSplit``\ s whose images the store reads from these archives."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    split_sizes: dict[str, int]
    """Official split sizes, for ``finebench datasets`` and for checking a full prepare."""
    protocol: str
    terms: str
    homepage: str
    parse: Callable[[Path], ParsedDataset]
    sources: tuple[Source, ...] = ()
    manual: bool = False
    """Registration-only: no URL may be fetched; ``--from`` is required."""
    manual_instructions: str = ""
    hub_id: str | None = None
    """A Hugging Face Hub copy usable with ``--source hub``."""
    hub_splits: Mapping[str, str] = field(default_factory=dict)
    """Our split name -> the Hub copy's split name; required with ``hub_id``. Only these splits are
    read and stored, because Hub copies name splits their own way (Food-101's official test set is
    its ``validation``) and some carry extra ones (corrupted variants of a test set)."""
    hub_image_column: str | None = None
    """The Hub copy's image column; ``None``: its only ``datasets.Image`` column."""
    hub_label_column: str | None = None
    """The Hub copy's label column (a ``ClassLabel`` with ``num_classes`` names); ``None``: the
    ``ClassLabel`` column with ``num_classes`` names."""
    offline: bool = False
    """Built from data shipped in an installed package: no download at all."""
    folds: int = 0
    """k-fold protocol: the store holds splits ``fold0``..``fold{k-1}`` and each run holds one out
    for testing and trains on the others; 0 for a fixed train/test split."""
    description: str = ""
    input_size: int = 224
    """The side the network sees when a recipe leaves ``dataset.input_size`` unset, known before the
    store is read (the dry run's costs): the images' own side for datasets of small square images of
    one size (what ``data.config.resolve_data_config`` gives their store), else the 224 px crop of the
    ``imagenet`` augmentation."""
    store_info: Mapping[str, Any] = field(default_factory=dict)
    """Entries a prepared store's ``meta.json`` ``info`` must hold: a store an older finebench
    prepared differently under the same name (FGVC-Aircraft's banner, once cropped) is refused with
    the command that rebuilds it, rather than trained on silently."""
