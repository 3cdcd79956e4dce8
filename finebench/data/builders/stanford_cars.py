"""Stanford Cars (196 make/model/year classes).

The official ai.stanford.edu URLs have been dead since 2023. Three ways remain, all ending in
the same official layout and the same published MD5s: ``--mirror <base URL>`` pointing at any
server that holds the four files under their official names; ``--from <folder>`` with the four
files (e.g. a Kaggle copy repacked to the official names); or ``--source hub``, an unofficial
Hugging Face Hub copy (spec.hub_id) already split 8,144 / 8,041.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finebench.data.builders._layout import (
    as_list,
    labels_from_one_based,
    load_mat,
    mat_field,
    require_dir,
    require_file,
)
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.errors import FinebenchError

NUM_CLASSES = 196


def _annotations(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """(file name, 0-based label) from a struct array ``annotations`` with ``fname`` and ``class``."""
    annotations = np.atleast_1d(mat_field(load_mat(path), "annotations", path))
    try:
        names = [str(name) for name in as_list(annotations["fname"])]
        classes = [int(value) for value in as_list(annotations["class"])]
    except (KeyError, ValueError, IndexError, TypeError):
        raise FinebenchError(f"{path}: 'annotations' must be a struct array with fields fname and class") from None
    return list(zip(names, labels_from_one_based(classes, num_classes, path)))


def parse(raw_dir: Path) -> ParsedDataset:
    devkit = require_dir(raw_dir / "devkit", "from car_devkit.tgz")
    meta_path = devkit / "cars_meta.mat"
    classes = [str(name) for name in as_list(mat_field(load_mat(meta_path), "class_names", meta_path))]
    layout = {
        "train": (devkit / "cars_train_annos.mat", raw_dir / "cars_train"),
        "test": (raw_dir / "cars_test_annos_withlabels.mat", raw_dir / "cars_test"),
    }
    splits = {}
    for split, (annos_path, image_dir) in layout.items():
        require_dir(image_dir, f"from {image_dir.name}.tgz")
        splits[split] = [
            Example(require_file(image_dir / name, f"listed in {annos_path.name}"), label)
            for name, label in _annotations(annos_path, len(classes))
        ]
    return ParsedDataset(classes=classes, splits=splits, info={"test_labels": "cars_test_annos_withlabels.mat"})


_OFFICIAL = "https://ai.stanford.edu/~jkrause/"

SPEC = DatasetSpec(
    name="stanford_cars",
    num_classes=NUM_CLASSES,
    split_sizes={"train": 8144, "test": 8041},
    protocol="Official split: devkit cars_train_annos.mat for train, cars_test_annos_withlabels.mat "
    "for test; whole images (boxes unused); top-1 accuracy on test.",
    terms="Research use (Stanford); images collected from the web.",
    homepage=_OFFICIAL + "cars/car_dataset.html",
    parse=parse,
    sources=(
        # Official URLs (dead since 2023) and the MD5s torchvision used while they were live.
        Source("car_devkit.tgz", url=_OFFICIAL + "cars/car_devkit.tgz", md5="c3b158d763b6e2245038c8ad08e45376"),
        Source("cars_train.tgz", url=_OFFICIAL + "car196/cars_train.tgz", md5="065e5b463ae28d29e77c1b4b166cfe61"),
        Source("cars_test.tgz", url=_OFFICIAL + "car196/cars_test.tgz", md5="4ce7ebf6a94d07f1952d94dd34c4d501"),
        Source("cars_test_annos_withlabels.mat", url=_OFFICIAL + "car196/cars_test_annos_withlabels.mat",
               md5="b0a2b23655a3edd16d84508592a98d10", extract=False),
    ),
    manual_instructions="The official URLs are dead. Get car_devkit.tgz, cars_train.tgz, cars_test.tgz "
    "and cars_test_annos_withlabels.mat (e.g. from a Kaggle or academic mirror; the MD5s are checked) "
    "and run: finebench prepare stanford_cars --from <folder with the four files>, or serve them and use "
    "--mirror <base URL>. Alternatively --source hub uses the unofficial Hub copy tanganke/stanford_cars.",
    hub_id="tanganke/stanford_cars",
    # The Hub copy adds corrupted copies of the test set (contrast, gaussian_noise, ...) as extra splits.
    hub_splits={"train": "train", "test": "test"},
    hub_image_column="image",
    hub_label_column="label",
    description="Stanford Cars: 16,185 images of 196 car classes (make, model, year); class names "
    "from devkit cars_meta.mat. The hub copy (tanganke/stanford_cars) is unofficial.",
)
