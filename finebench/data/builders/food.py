"""Food recognition sets: Food-101 (official train/test lists) and UEC-Food100 (bounding-box
crops in seeded, recorded folds)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finebench.data.builders._layout import (
    LazyExamples,
    cropped,
    parse_int,
    read_rows,
    require_dir,
    require_file,
)
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.errors import FinebenchError

# ---- Food-101 ------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    return [row[0].strip() for row in read_rows(path, min_fields=1, maxsplit=0)]


def parse_food101(raw_dir: Path) -> ParsedDataset:
    root = require_dir(raw_dir / "food-101", "from food-101.tar.gz")
    meta, images = require_dir(root / "meta"), require_dir(root / "images")
    class_ids = _read_lines(meta / "classes.txt")
    display_names = _read_lines(meta / "labels.txt")
    if len(display_names) != len(class_ids):
        raise FinebenchError(
            f"{meta / 'labels.txt'}: {len(display_names)} names for {len(class_ids)} classes in classes.txt"
        )
    label_of = {class_id: label for label, class_id in enumerate(class_ids)}
    splits = {}
    for split in ("train", "test"):
        list_path = meta / f"{split}.txt"
        examples = []
        for entry in _read_lines(list_path):  # "<class id>/<image id>", no extension
            class_id = entry.split("/", 1)[0]
            if class_id not in label_of:
                raise FinebenchError(f"{list_path}: class {class_id!r} of {entry!r} is not in classes.txt")
            path = require_file(images / f"{entry}.jpg", f"listed in {split}.txt")
            examples.append(Example(path, label_of[class_id]))
        splits[split] = examples
    return ParsedDataset(classes=display_names, splits=splits, info={"class_ids": class_ids})


FOOD101 = DatasetSpec(
    name="food101",
    num_classes=101,
    split_sizes={"train": 75750, "test": 25250},
    protocol="Official meta/train.txt and meta/test.txt (750 / 250 images per class; training "
    "images deliberately left noisy); top-1 accuracy on test.",
    terms="Research (fair use); images from foodspotting.com belong to their owners.",
    homepage="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
    parse=parse_food101,
    sources=(
        Source("food-101.tar.gz", url="http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
               md5="85eeb15f3717b99a5da872d97d918f87"),
    ),
    hub_id="ethz/food101",
    # The Hub copy calls the official test list (25,250 images) "validation".
    hub_splits={"train": "train", "test": "validation"},
    hub_image_column="image",
    hub_label_column="label",
    description="Food-101: 101,000 images of 101 dishes. Class names are meta/labels.txt display names "
    "(folder ids from classes.txt are kept in meta.json).",
)

# ---- UEC-Food100 ---------------------------------------------------------------------------

UEC_FOLDS = 5
UEC_SEED = 0
Box = tuple[int, int, int, int]
"""left, top, right, bottom in pixels, as bb_info.txt gives them (x1 y1 x2 y2)."""


def _uec_boxes(root: Path, num_classes: int) -> tuple[list[tuple[int, int, Path, Box]], int]:
    """(photo id, label, image path, box) for every usable bb_info.txt row, and how many were empty.

    An empty box cannot be cropped; it is skipped and counted rather than failing the whole
    prepare over one annotation slip.
    """
    boxes, empty = [], 0
    for label in range(num_classes):
        folder = require_dir(root / str(label + 1), f"class folder of category {label + 1}")
        info_path = folder / "bb_info.txt"
        for row in read_rows(info_path, min_fields=5, header=True):
            photo = parse_int(row[0], info_path, "img")
            x1, y1, x2, y2 = (parse_int(v, info_path, name) for v, name in zip(row[1:5], ("x1", "y1", "x2", "y2")))
            if x2 <= x1 or y2 <= y1:
                empty += 1
                continue
            path = require_file(folder / f"{photo}.jpg", "listed in bb_info.txt")
            boxes.append((photo, label, path, (x1, y1, x2, y2)))
    return boxes, empty


def _fold_of_photo(photos: Sequence[int]) -> dict[int, int]:
    """Seeded assignment of photos to folds, so all crops of one photo share a fold (no leakage)."""
    unique = np.array(sorted(set(photos)))
    order = np.random.default_rng(UEC_SEED).permutation(len(unique))
    return {int(unique[position]): rank % UEC_FOLDS for rank, position in enumerate(order)}


def _uec_crop(item: tuple[Path, Box, int]) -> Example:
    path, box, label = item
    return Example(cropped(path, box), label)


def parse_uec_food100(raw_dir: Path) -> ParsedDataset:
    root = require_dir(raw_dir / "UECFOOD100", "from dataset100.zip")
    category_path = root / "category.txt"
    categories = read_rows(category_path, min_fields=2, header=True, maxsplit=1)
    ids = [parse_int(row[0], category_path, "id") for row in categories]
    if ids != list(range(1, len(ids) + 1)):
        raise FinebenchError(f"{category_path}: ids must run 1..{len(ids)} in order")
    classes = [row[1].strip() for row in categories]
    boxes, empty_boxes = _uec_boxes(root, len(classes))
    fold_of = _fold_of_photo([photo for photo, *_ in boxes])
    per_fold: list[list[tuple[Path, Box, int]]] = [[] for _ in range(UEC_FOLDS)]
    for photo, label, path, box in boxes:
        per_fold[fold_of[photo]].append((path, box, label))
    boxes_per_photo = Counter(photo for photo, *_ in boxes)
    return ParsedDataset(
        classes=classes,
        splits={f"fold{k}": LazyExamples(items, _uec_crop) for k, items in enumerate(per_fold)},
        info={
            "protocol": "one example per bounding box (bb_info.txt row), cropped to the box",
            "crop_encoding": "JPEG q95",
            "folds": UEC_FOLDS,
            "fold_seed": UEC_SEED,
            "fold_unit": "photo (all crops of a multi-food photo share a fold)",
            "photos": len(fold_of),
            "multi_food_photos": sum(1 for n in boxes_per_photo.values() if n > 1),
            "boxes": len(boxes),
            "empty_boxes_skipped": empty_boxes,
        },
    )


UEC_FOOD100 = DatasetSpec(
    name="uec_food100",
    num_classes=100,
    split_sizes={},
    protocol="UEC-Food100 ships no split files. finebench follows the dataset's own benchmark "
    "('given the bounding box'): each bb_info.txt row is one example, the photo cropped to that box, "
    "so a multi-food photo (listed in several class folders and in multiple_food.txt) yields one "
    "example per food with its own label. Photos are assigned to 5 folds (fold0..fold4) by a seeded "
    "permutation (seed 0), all crops of one photo in the same fold; report mean top-1 over the 5 "
    "leave-one-fold-out runs. The assignment is recorded in meta.json.",
    terms="Research use only (UEC Food Recognition group); cite Matsuda and Yanai, ICPR 2012.",
    homepage="http://foodcam.mobi/dataset100.html",
    parse=parse_uec_food100,
    folds=UEC_FOLDS,
    sources=(Source("dataset100.zip", url="http://foodcam.mobi/dataset100.zip"),),
    description="UEC-Food100: photos of 100 (mostly Japanese) dishes with a bounding box per food; "
    "about 14,000 boxes. Class names from category.txt.",
)

SPECS = [FOOD101, UEC_FOOD100]
