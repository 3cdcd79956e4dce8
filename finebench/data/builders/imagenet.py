"""ImageNet ILSVRC2012 classification: the three registration-only files, read in place.

ILSVRC2012_img_train.tar is a tar of 1,000 per-class tars (``<wnid>.tar``). Unpacking those
inner tars would need another ~140 GB next to them, so the train split streams each inner tar's
JPEG members straight into the store instead: nothing from an inner tar is ever written to disk
(so its member names cannot escape anywhere either). A copy whose train images are already
extracted as ``train/<wnid>/*.JPEG`` (``--from`` an extracted layout) is read too.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from finebench.data.builders._layout import (
    as_list,
    labels_from_one_based,
    load_mat,
    mat_field,
    parse_int,
    read_rows,
    require_dir,
    require_file,
)
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.errors import FinebenchError

NUM_CLASSES = 1000
_JPEG_SUFFIXES = (".jpeg", ".jpg")


def _leaf_synsets(meta_path: Path) -> tuple[list[str], list[str], list[int]]:
    """(wnids, names, label of each ILSVRC2012_ID - 1) of the 1,000 leaf synsets, in sorted-wnid order.

    Labels follow the sorted WordNet ids, the order of torchvision's ``ImageNet`` (an ``ImageFolder``
    over ``<wnid>/`` folders), timm and every pretrained ImageNet head, so their classifiers score on
    this store as they do elsewhere; the devkit's own ILSVRC2012_ID order would scramble them.
    ``meta.mat`` also holds the inner WordNet nodes, which are dropped.
    """
    synsets = np.atleast_1d(mat_field(load_mat(meta_path), "synsets", meta_path))
    try:
        ids = [int(v) for v in as_list(synsets["ILSVRC2012_ID"])]
        wnids = [str(v) for v in as_list(synsets["WNID"])]
        words = [str(v) for v in as_list(synsets["words"])]
        children = [int(v) for v in as_list(synsets["num_children"])]
    except (ValueError, KeyError, IndexError, TypeError):
        raise FinebenchError(
            f"{meta_path}: 'synsets' must be a struct array with ILSVRC2012_ID, WNID, words, num_children"
        ) from None
    by_id = sorted((i, w, n) for i, w, n, c in zip(ids, wnids, words, children) if c == 0)
    if [i for i, _, _ in by_id] != list(range(1, len(by_id) + 1)):
        raise FinebenchError(f"{meta_path}: leaf synsets must have ILSVRC2012_ID 1..{len(by_id)}")
    leaves = sorted((w, n) for _, w, n in by_id)
    if len({w for w, _ in leaves}) != len(leaves):
        raise FinebenchError(f"{meta_path}: two leaf synsets share a WNID")
    names = [n for _, n in leaves]
    # A few leaves share their words (two different "crane"s): the wnid keeps class names unique.
    names = [f"{n} ({w})" if names.count(n) > 1 else n for (w, _), n in zip(leaves, names)]
    label_of_wnid = {w: label for label, (w, _) in enumerate(leaves)}
    return [w for w, _ in leaves], names, [label_of_wnid[w] for _, w, _ in by_id]


class _InnerTarImages(Sequence[Example]):
    """The JPEG members of per-class tars, read one tar at a time, as encoded bytes."""

    def __init__(self, tars: list[tuple[Path, int]]) -> None:
        self._tars = []
        for path, label in tars:
            with tarfile.open(path) as tar:
                members = sorted(
                    m.name for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(_JPEG_SUFFIXES)
                )
            self._tars.append((path, label, members))
        self._count = sum(len(m) for _, _, m in self._tars)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        for path, label, members in self._tars:
            if index < len(members):
                with tarfile.open(path) as tar:
                    return Example(self._read(tar, path, members[index]), label)
            index -= len(members)
        raise IndexError(index)

    @staticmethod
    def _read(tar: tarfile.TarFile, path: Path, name: str) -> bytes:
        handle = tar.extractfile(name)
        if handle is None:
            raise FinebenchError(f"{path}: member {name!r} is not a regular file")
        return handle.read()

    def __iter__(self) -> Iterator[Example]:
        for path, label, members in self._tars:
            with tarfile.open(path) as tar:
                for name in members:
                    yield Example(self._read(tar, path, name), label)


def _train_split(raw_dir: Path, wnids: list[str]) -> Sequence[Example]:
    extracted = raw_dir / "train"
    if extracted.is_dir() and any((extracted / w).is_dir() for w in wnids):
        return [
            Example(path, label)
            for label, wnid in enumerate(wnids)
            for path in sorted(require_dir(extracted / wnid, "one folder per class").iterdir())
            if path.suffix.lower() in _JPEG_SUFFIXES
        ]
    inner_tars = [raw_dir / f"{wnid}.tar" for wnid in wnids]
    return _InnerTarImages(
        [(require_file(path, "from ILSVRC2012_img_train.tar"), label) for label, path in enumerate(inner_tars)]
    )


def _val_split(raw_dir: Path, ground_truth_path: Path, label_of_id: list[int]) -> list[Example]:
    ids = [parse_int(row[0], ground_truth_path, "ILSVRC2012_ID") for row in read_rows(ground_truth_path, min_fields=1)]
    labels = [label_of_id[index] for index in labels_from_one_based(ids, len(label_of_id), ground_truth_path)]
    folder = raw_dir / "val" if (raw_dir / "val" / "ILSVRC2012_val_00000001.JPEG").is_file() else raw_dir
    return [
        Example(require_file(folder / f"ILSVRC2012_val_{index:08d}.JPEG", "from ILSVRC2012_img_val.tar"), label)
        for index, label in enumerate(labels, start=1)
    ]


def parse(raw_dir: Path) -> ParsedDataset:
    devkit = require_dir(raw_dir / "ILSVRC2012_devkit_t12" / "data", "from ILSVRC2012_devkit_t12.tar.gz")
    wnids, names, label_of_id = _leaf_synsets(devkit / "meta.mat")
    return ParsedDataset(
        classes=names,
        splits={
            "train": _train_split(raw_dir, wnids),
            # The official validation set is the de-facto test set: the real test labels were never released.
            "test": _val_split(raw_dir, devkit / "ILSVRC2012_validation_ground_truth.txt", label_of_id),
        },
        info={"wnids": wnids, "class_order": "sorted WordNet id (torchvision, timm)",
              "test_split": "ILSVRC2012 validation set (50,000 images)"},
    )


SPEC = DatasetSpec(
    name="imagenet",
    num_classes=NUM_CLASSES,
    split_sizes={"train": 1281167, "test": 50000},
    protocol="ILSVRC2012 classification: train on the 1,281,167 training images, report top-1/top-5 "
    "on the 50,000 validation images (stored as the test split; the test labels are not public). "
    "Classes in sorted WordNet-id order (label 0 is n01440764), as torchvision, timm and pretrained "
    "ImageNet classifiers number them; not the devkit's ILSVRC2012_ID order.",
    terms="Registration required; non-commercial research and education only (ImageNet terms of access).",
    homepage="https://image-net.org/challenges/LSVRC/2012/",
    parse=parse,
    sources=(
        Source("ILSVRC2012_img_train.tar", md5="1d675b47d978889d74fa0da5fadfb00e"),
        Source("ILSVRC2012_img_val.tar", md5="29b22e2961454d5413ddabcf34fc5622"),
        Source("ILSVRC2012_devkit_t12.tar.gz", md5="fa75699e90414af021442c21a62c3abf"),
    ),
    manual=True,
    manual_instructions="Log in at https://image-net.org/download-images.php, open the ILSVRC2012 page "
    "and download ILSVRC2012_img_train.tar (138 GB), ILSVRC2012_img_val.tar (6.3 GB) and "
    "ILSVRC2012_devkit_t12.tar.gz (2.5 MB, 'Development kit (Task 1 & 2)'); put them in one folder "
    "and run: finebench prepare imagenet --from <folder>. Expect several hours and ~150 GB free.",
    description="ImageNet ILSVRC2012: 1,000 classes. Class names are the devkit synset words "
    "(a wnid is appended where two synsets share words).",
)
