"""The iNaturalist competition sets (visipedia/inat_comp) 2017, 2018 and 2021 (full and mini).

Each year ships an image archive and COCO-style annotation JSONs (``images``, ``annotations``,
``categories``). The public validation set is finebench's test split (the competitions' test labels
were never released). Labels follow the category ids; the ``_<level>`` variants relabel the same
images at one taxonomy level (kingdom ... genus), which 2018 and 2021 carry (2017 has only the
supercategory). Every image's supercategory is stored as the store's ``group`` column.

The archives are large, so the parser trusts nothing it can check cheaply: every listed image must
be in the archive, every image in the archive must be listed, and every category id must be in the
taxonomy, or the prepare stops with the file and the entry, rather than storing a set that looks
complete and is not.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from finebench.data.builders import coco
from finebench.data.builders._layout import require_dir, require_file
from finebench.data.builders.base import (
    ArchiveStream,
    DatasetSpec,
    Example,
    Grouping,
    ParsedDataset,
    Source,
    StreamedSplit,
)
from finebench.errors import FinebenchError

_S3 = "https://ml-inat-competition-datasets.s3.amazonaws.com/"
HOMEPAGE = "https://github.com/visipedia/inat_comp"

LEVELS = ("kingdom", "phylum", "class", "order", "family", "genus")
"""The taxonomy levels 2018 and 2021 give every category, top down (2017 has none of them)."""

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Year:
    """One competition's files, as its README (visipedia/inat_comp/<year>/README.md) describes them."""

    key: str
    annotations: Mapping[str, str]
    """finebench split -> annotation JSON (the public val file is the test split)."""
    image_roots: tuple[str, ...]
    """First path component of every ``file_name``: the folders the image archives unpack to."""
    sources: tuple[Source, ...]
    taxonomy_file: str | None = None
    """2018 only: the un-obfuscated categories, released after the competition."""

    @property
    def image_archives(self) -> tuple[str, ...]:
        return tuple(s.filename for s in self.sources if s.stream)


def _source(year: str, filename: str, md5: str | None = None, images: bool = False) -> Source:
    """``images``: an image archive, streamed while storing (the annotations are separate archives)."""
    return Source(filename, url=f"{_S3}{year}/{filename}", md5=md5, stream=images)


_VAL_2021 = (_source("2021", "val.tar.gz", "f6f6e0e242e3d4c9569ba56400938afc", images=True),
             _source("2021", "val.json.tar.gz", "4d761e0f6a86cc63e8f7afc91f6a8f0b"))

# MD5s are the ones each year's README publishes (the image archives' also in torchvision's INaturalist).
# train_val2017.zip has none published: its MD5 is the one other loaders of the same URL check (e.g. the
# INat2017 VisionDataset copied around FGVC repositories), as for FGVC-Aircraft. 2018's categories.json.tar.gz
# has none anywhere.
YEARS = {
    "2017": Year(
        "2017", {"train": "train2017.json", "test": "val2017.json"}, ("train_val_images",),
        (_source("2017", "train_val_images.tar.gz", "7c784ea5e424efaec655bd392f87301f", images=True),
         _source("2017", "train_val2017.zip", "444c835f6459867ad69fcb36478786e7")),
    ),
    "2018": Year(
        "2018", {"train": "train2018.json", "test": "val2018.json"}, ("train_val2018",),
        (_source("2018", "train_val2018.tar.gz", "b1c6952ce38f31868cc50ea72d066cc3", images=True),
         _source("2018", "train2018.json.tar.gz", "bfa29d89d629cbf04d826a720c0a68b0"),
         _source("2018", "val2018.json.tar.gz", "f2ed8bfe3e9901cdefceb4e53cd3775d"),
         _source("2018", "categories.json.tar.gz")),
        taxonomy_file="categories.json",
    ),
    "2021": Year(
        "2021", {"train": "train.json", "test": "val.json"}, ("train", "val"),
        (_source("2021", "train.tar.gz", "e0526d53c7f7b2e3167b2b43bb2690ed", images=True),
         _source("2021", "train.json.tar.gz", "38a7bb733f7a09214d44293460ec0021"), *_VAL_2021),
    ),
    "2021_mini": Year(
        "2021_mini", {"train": "train_mini.json", "test": "val.json"}, ("train_mini", "val"),
        (_source("2021", "train_mini.tar.gz", "db6ed8330e634445efc8fec83ae81442", images=True),
         _source("2021", "train_mini.json.tar.gz", "395a35be3651d86dc3b0d365b8ea5f92"), *_VAL_2021),
    ),
}

IMAGE_SUFFIXES = (".jpg", ".jpeg")
"""What the archives hold (every README: "converted to JPEG format"); other files are not images."""


# ---- reading the annotation files ---------------------------------------------------------------


def _taxonomy(raw_dir: Path, year: Year, per_split: Mapping[str, dict[int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """category id -> its fields; the splits' lists must agree, and 2018's names come from categories.json."""
    (first, reference), *others = per_split.items()
    for split, categories in others:
        if set(categories) != set(reference):
            odd = min(set(categories) ^ set(reference))
            raise FinebenchError(
                f"{raw_dir / year.annotations[split]}: its categories differ from {year.annotations[first]}'s "
                f"(category id {odd} is in only one of them)"
            )
        for category_id, entry in categories.items():
            if entry.get("name") != reference[category_id].get("name"):
                raise FinebenchError(
                    f"{raw_dir / year.annotations[split]}: category id {category_id} is named {entry.get('name')!r}, "
                    f"but {reference[category_id].get('name')!r} in {year.annotations[first]}"
                )
    if year.taxonomy_file is None:
        return reference
    path = require_file(raw_dir / year.taxonomy_file, "from categories.json.tar.gz")
    try:
        released = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FinebenchError(f"{path}: not valid JSON ({error})") from None
    if isinstance(released, dict):  # the README says "replace the categories list": accept either shape
        released = released.get("categories")
    if not isinstance(released, list):
        raise FinebenchError(f"{path}: expected a list of categories (or an object with 'categories')")
    named = coco.categories_of({"categories": released}, path)
    missing = sorted(set(reference) - set(named))
    if missing:
        raise FinebenchError(f"{path}: category id {missing[0]} of {year.annotations[first]} is not in it")
    return {category_id: {**reference[category_id], **named[category_id]} for category_id in reference}


# ---- the archive against the lists ----------------------------------------------------------------


def _split_of_image(raw_dir: Path, year: Year, listed: Mapping[str, coco.SplitList]) -> dict[str, str]:
    """file_name -> the split that lists it; an image listed by two splits is refused."""
    listed_by: dict[str, str] = {}
    for split, items in listed.items():
        for name in items.names:
            other = listed_by.setdefault(name, split)
            if other != split:  # 2017/2018 share one image folder: an image in both splits would leak the test set
                raise FinebenchError(
                    f"{raw_dir / year.annotations[split]}: lists image {name}, which "
                    f"{year.annotations[other]} lists too (an image may be in one split only)"
                )
    return listed_by


def _check_disjoint(raw_dir: Path, year: Year, listed: Mapping[str, coco.SplitList]) -> None:
    """``_split_of_image``'s check without its dict of every image: sets of all splits but the largest."""
    by_size = sorted(listed, key=lambda split: len(listed[split]))
    seen: set[str] = set()
    for split in by_size[:-1]:
        names = set(listed[split].names)
        if not seen.isdisjoint(names):
            break
        seen |= names
    else:
        if seen.isdisjoint(listed[by_size[-1]].names):
            return
    _split_of_image(raw_dir, year, listed)  # raises, naming the image and both files


def _missing_error(raw_dir: Path, year: Year, split: str, file_name: str, count: int) -> FinebenchError:
    return FinebenchError(
        f"{raw_dir / year.annotations[split]}: lists image {file_name}, which is not in the image "
        f"archive ({count} listed images missing: the archive is incomplete or from another year)"
    )


def _unlisted_text(year: Year, count: str) -> str:
    return (f"this image is in the archive but in none of {', '.join(sorted(set(year.annotations.values())))} "
            f"({count} such images: the annotation files are from another year or version)")


def _check_archive_matches(raw_dir: Path, year: Year, listed: Mapping[str, coco.SplitList]) -> None:
    """Every listed image is a file, and every image file under the roots is listed (by some split)."""
    listed_by = _split_of_image(raw_dir, year, listed)
    present: set[str] = set()
    for root in year.image_roots:
        folder = require_dir(raw_dir / root, "from the image archive")
        for directory, _, files in os.walk(folder, followlinks=True):
            relative = Path(directory).relative_to(raw_dir).as_posix()
            present.update(f"{relative}/{name}" for name in files if name.lower().endswith(IMAGE_SUFFIXES))
    absent = sorted(set(listed_by) - present)
    if absent:
        raise _missing_error(raw_dir, year, listed_by[absent[0]], absent[0], len(absent))
    unlisted = sorted(present - set(listed_by))
    if unlisted:
        raise FinebenchError(f"{raw_dir / unlisted[0]}: {_unlisted_text(year, str(len(unlisted)))}")


def _streamed(
    raw_dir: Path, year: Year, listed: Mapping[str, coco.SplitList], label_of: Mapping[int, int], group_of: Mapping[int, int]
) -> tuple[dict[str, StreamedSplit], ArchiveStream]:
    """The splits as member names and label arrays, checked against the archives while they are read."""
    _check_disjoint(raw_dir, year, listed)

    def is_image(name: str) -> bool:
        parts = PurePosixPath(name).parts
        return len(parts) > 1 and parts[0] in year.image_roots and name.lower().endswith(IMAGE_SUFFIXES)

    def per_image(mapping: Mapping[int, int], items: coco.SplitList) -> np.ndarray:
        """``mapping[category id]`` of each image, looked up in arrays (one Python call per image costs ~1 s a million)."""
        keys = np.asarray(sorted(mapping), np.int64)
        values = np.asarray([mapping[key] for key in keys.tolist()], np.int64)
        return values[np.searchsorted(keys, items.category_ids)]

    splits = {split: StreamedSplit(items.names, per_image(label_of, items), per_image(group_of, items))
              for split, items in listed.items()}
    archives = tuple(raw_dir / name for name in year.image_archives)
    stream = ArchiveStream(
        archives,
        is_image,
        lambda split, name, count: _missing_error(raw_dir, year, split, name, count),
        lambda name: FinebenchError(f"{name} (in {', '.join(year.image_archives)}): {_unlisted_text(year, 'at least 1')}"),
    )
    return splits, stream


# ---- labels -------------------------------------------------------------------------------------


def _unique_names(names: list[str], qualifiers: list[str]) -> list[str]:
    """Names made unique by their qualifier where two classes share one (a genus name in two kingdoms)."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{n} ({q})" if counts[n] > 1 else n for n, q in zip(names, qualifiers)]


def _level_path(entry: Mapping[str, Any], level: str, path: Path, category_id: int) -> tuple[str, ...]:
    keys = LEVELS[: LEVELS.index(level) + 1]
    values = []
    for key in keys:
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            raise FinebenchError(f"{path}: category id {category_id} has no {key!r} (expected {', '.join(LEVELS)})")
        values.append(value)
    return tuple(values)


def _labels(
    taxonomy: Mapping[int, dict[str, Any]], level: str | None, source: Path
) -> tuple[list[str], dict[int, int]]:
    """(class names, category id -> label). Species: category id order. A level: its taxa by their full
    path (so a genus name used in two kingdoms stays two classes), sorted."""
    ids = sorted(taxonomy)
    if level is None:
        names = [str(taxonomy[i].get("name", i)) for i in ids]
        return _unique_names(names, [f"id {i}" for i in ids]), {i: label for label, i in enumerate(ids)}
    path_of = {i: _level_path(taxonomy[i], level, source, i) for i in ids}
    taxa = sorted(set(path_of.values()))
    index = {taxon: label for label, taxon in enumerate(taxa)}
    names = _unique_names([t[-1] for t in taxa], ["/".join(t[:-1]) or "root" for t in taxa])
    return names, {i: index[path_of[i]] for i in ids}


def _grouping(
    taxonomy: Mapping[int, dict[str, Any]], label_of: Mapping[int, int], num_classes: int, source: Path
) -> tuple[Grouping, dict[int, int]]:
    """The supercategory of each category (its ``group``), and per class where the class decides it."""
    supercategory = {}
    for category_id, entry in taxonomy.items():
        value = entry.get("supercategory")
        if not isinstance(value, str) or not value:
            raise FinebenchError(f"{source}: category id {category_id} has no 'supercategory'")
        supercategory[category_id] = value
    names = sorted(set(supercategory.values()))
    group_of = {category_id: names.index(value) for category_id, value in supercategory.items()}
    per_class: list[set[int]] = [set() for _ in range(num_classes)]
    for category_id, label in label_of.items():
        per_class[label].add(group_of[category_id])
    of_class = [next(iter(g)) for g in per_class] if all(len(g) == 1 for g in per_class) else None
    return Grouping("supercategory", names, of_class), group_of


def parse_inat(raw_dir: Path, year: str, level: str | None = None) -> ParsedDataset:
    spec_year = YEARS[year]
    data = {split: coco.load(raw_dir / filename) for split, filename in spec_year.annotations.items()}
    per_split = {split: coco.categories_of(d.data, d.path) for split, d in data.items()}
    taxonomy = _taxonomy(raw_dir, spec_year, per_split)
    if not taxonomy:
        raise FinebenchError(f"{raw_dir / spec_year.annotations['train']}: its categories list is empty")
    # Each file's entries are dropped once its images are listed, so only one split's are held at a time.
    listed = {split: coco.split_images(data.pop(split), spec_year.image_roots, taxonomy) for split in list(data)}
    # The archives themselves (prepare links them when it has them all): read while storing, never extracted.
    stream = all((raw_dir / name).is_file() for name in spec_year.image_archives) and not any(
        (raw_dir / root).exists() for root in spec_year.image_roots
    )
    if not stream:
        _check_archive_matches(raw_dir, spec_year, listed)
    source = raw_dir / (spec_year.taxonomy_file or spec_year.annotations["train"])
    classes, label_of = _labels(taxonomy, level, source)
    grouping, group_of = _grouping(taxonomy, label_of, len(classes), source)
    archives = None
    if stream:
        splits, archives = _streamed(raw_dir, spec_year, listed, label_of, group_of)
    else:
        splits = {
            split: [Example(raw_dir / name, label_of[category_id], group_of[category_id])
                    for name, category_id in zip(items.names, items.category_ids.tolist())]
            for split, items in listed.items()
        }
    info: dict[str, Any] = {
        "year": spec_year.key,
        "annotation_level": level or "species",
        "train_annotations": spec_year.annotations["train"],
        "test_annotations": f"{spec_year.annotations['test']} (the public validation set)",
        "categories": len(taxonomy),
    }
    if spec_year.taxonomy_file:
        info["taxonomy"] = f"{spec_year.taxonomy_file} (the un-obfuscated names released after the competition)"
    return ParsedDataset(classes=classes, splits=splits, info=info, grouping=grouping, stream=archives)


# ---- registered datasets ------------------------------------------------------------------------

_TERMS = ("Research and educational use only; the images may not be redistributed (the terms in "
          "visipedia/inat_comp's README for the year).")

_SPECIES = {
    # year: (species, train, val) from each year's README
    "2017": (5089, 579_184, 95_986),
    "2018": (8142, 437_513, 24_426),
    "2021": (10_000, 2_686_843, 100_000),
    "2021_mini": (10_000, 500_000, 100_000),
}

LEVEL_CLASSES = {
    # Counts of distinct names per level. 2018: the comment in the organisers' baseline loader
    # (macaodha/inat_comp_2018, inat2018_loader.py). 2021: the iNat2021 paper (Van Horn et al., CVPR 2021),
    # not checked against the files here. finebench counts a taxon by its full path, so a name used in
    # two branches is two classes; prepare warns if the data disagree.
    "2018": {"kingdom": 6, "phylum": 25, "class": 57, "order": 273, "family": 1120, "genus": 4412},
    "2021": {"kingdom": 3, "phylum": 13, "class": 51, "order": 273, "family": 1103, "genus": 4884},
}


def _spec(year: str, level: str | None = None) -> DatasetSpec:
    species, train, test = _SPECIES[year]
    base = f"inat{year}"
    name = base if level is None else f"{base}_{level}"
    classes = species if level is None else LEVEL_CLASSES[year.split("_")[0]][level]
    what = "species" if level is None else f"{level} level ({classes} taxa; the images and splits of {base})"
    files = ", ".join(s.filename for s in YEARS[year].sources)
    return DatasetSpec(
        name=name,
        num_classes=classes,
        split_sizes={"train": train, "test": test},
        protocol=f"iNaturalist {year.replace('_', ' ')}: train on {YEARS[year].annotations['train']}, report top-1 "
        f"on {YEARS[year].annotations['test']} (the public validation set; the competition test labels are not "
        f"public) at the {what}. The store's group column holds each image's supercategory for per-group accuracy.",
        terms=_TERMS,
        homepage=f"{HOMEPAGE}/tree/master/{year.split('_')[0]}",
        parse=functools.partial(parse_inat, year=year, level=level),
        sources=YEARS[year].sources,
        store_info={"annotation_level": level or "species"},
        description=f"iNaturalist {year.replace('_', ' ')} competition set, {what}. Files: {files}."
        + ("" if year == "2017" else f" {base} and every {base}_<level> read the same files: prepare the others "
           "with --from <data root>/.downloads/<the first one's name> to skip a second download."),
    )


SPECS = [
    _spec("2017"),
    *(_spec(year, level) for year in ("2018", "2021", "2021_mini") for level in (None, *LEVELS)),
]
