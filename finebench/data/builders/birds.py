"""CUB-200-2011 and NABirds: both ship the Caltech-UCSD text layout (images.txt,
image_class_labels.txt, train_test_split.txt, classes.txt), so one reader serves both."""

from __future__ import annotations

from pathlib import Path

from finebench.data.builders._layout import parse_int, read_rows, require_dir, require_file
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.errors import FinebenchError


def _read_id_table(path: Path) -> dict[str, str]:
    """``<image id> <value>`` lines as a dict (ids are numbers in CUB, UUIDs in NABirds)."""
    return {row[0]: row[1] for row in read_rows(path, min_fields=2, maxsplit=1)}


def _parse_caltech_layout(root: Path, class_name: dict[int, str], keep_unused_classes: bool) -> ParsedDataset:
    """Images per split from the four id tables; class ids map to 0-based labels in id order.

    ``keep_unused_classes`` is False for NABirds, whose classes.txt also lists the inner nodes of
    its taxonomy: only the 555 leaf classes that hold images become labels.
    """
    require_dir(root / "images", "image folder")
    paths = _read_id_table(root / "images.txt")
    class_of = _read_id_table(root / "image_class_labels.txt")
    is_training = _read_id_table(root / "train_test_split.txt")
    used_ids = sorted({parse_int(c, root / "image_class_labels.txt", "class id") for c in class_of.values()})
    ids = sorted(class_name) if keep_unused_classes else used_ids
    unknown = [i for i in used_ids if i not in class_name]
    if unknown:
        raise FinebenchError(f"{root / 'image_class_labels.txt'}: class id {unknown[0]} is not in classes.txt")
    label_of = {class_id: label for label, class_id in enumerate(ids)}
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for image_id, relative in paths.items():
        if image_id not in class_of or image_id not in is_training:
            raise FinebenchError(
                f"{root}: image id {image_id} of images.txt is missing from "
                "image_class_labels.txt or train_test_split.txt"
            )
        split = "train" if is_training[image_id].strip() == "1" else "test"
        label = label_of[int(class_of[image_id])]
        splits[split].append(Example(require_file(root / "images" / relative, "listed in images.txt"), label))
    return ParsedDataset(
        classes=[class_name[i] for i in ids],
        splits=splits,
        info={"class_ids": ids, "split_file": "train_test_split.txt"},
    )


def parse_cub200(raw_dir: Path) -> ParsedDataset:
    root = require_dir(raw_dir / "CUB_200_2011", "from CUB_200_2011.tgz")
    names = {
        parse_int(i, root / "classes.txt", "class id"): folder.split(".", 1)[-1]
        for i, folder in read_rows(root / "classes.txt", min_fields=2, maxsplit=1)
    }
    return _parse_caltech_layout(root, names, keep_unused_classes=True)


def parse_nabirds(raw_dir: Path) -> ParsedDataset:
    root = require_dir(raw_dir / "nabirds", "from nabirds.tar.gz")
    names = {
        parse_int(i, root / "classes.txt", "class id"): name.strip()
        for i, name in read_rows(root / "classes.txt", min_fields=2, maxsplit=1)
    }
    return _parse_caltech_layout(root, names, keep_unused_classes=False)


CUB200 = DatasetSpec(
    name="cub200",
    num_classes=200,
    split_sizes={"train": 5994, "test": 5794},
    protocol="Official train_test_split.txt; top-1 accuracy on the test split. No validation split: "
    "carve one from train with a seed if you need model selection. Bounding boxes and parts unused.",
    terms="Research and non-commercial use (Caltech-UCSD Birds-200-2011); images from Flickr.",
    homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
    parse=parse_cub200,
    sources=(
        Source(
            "CUB_200_2011.tgz",
            url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
            md5="97eceeb196236b17998738112f37df78",
        ),
    ),
    hub_id=None,
    description="Caltech-UCSD Birds-200-2011: 11,788 photos of 200 North American bird species. "
    "Class names are classes.txt folder names without their NNN. prefix, in class-id order.",
)

NABIRDS = DatasetSpec(
    name="nabirds",
    num_classes=555,
    split_sizes={"train": 23929, "test": 24633},
    protocol="Official train_test_split.txt; the 555 leaf classes that hold images, remapped to "
    "0..554 in class-id order (classes.txt also lists taxonomy nodes, which are dropped). "
    "Top-1 accuracy on the test split.",
    terms="Registration and acceptance of the Cornell Lab of Ornithology terms; non-commercial research.",
    homepage="https://dl.allaboutbirds.org/nabirds",
    parse=parse_nabirds,
    sources=(Source("nabirds.tar.gz"),),
    manual=True,
    manual_instructions="Register at https://dl.allaboutbirds.org/nabirds, accept the terms, download "
    "nabirds.tar.gz (it unpacks to nabirds/ with images/, images.txt, image_class_labels.txt, "
    "train_test_split.txt, classes.txt) and run: finebench prepare nabirds --from <folder holding nabirds.tar.gz>.",
    description="NABirds v1: 48,562 photos of North American birds, 555 visual categories.",
)

SPECS = [CUB200, NABIRDS]
