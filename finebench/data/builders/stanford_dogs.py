"""Stanford Dogs: images.tar (Images/<wnid>-<breed>/*.jpg) and lists.tar (train_list.mat,
test_list.mat with a ``file_list`` cell array of relative paths and 1-based ``labels``)."""

from __future__ import annotations

from pathlib import Path

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

NUM_CLASSES = 120
_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"


def parse(raw_dir: Path) -> ParsedDataset:
    images = require_dir(raw_dir / "Images", "from images.tar")
    folder_of_label: dict[int, str] = {}
    splits: dict[str, list[Example]] = {}
    for split in ("train", "test"):
        mat_path = raw_dir / f"{split}_list.mat"
        mat = load_mat(mat_path)
        files = [str(f) for f in as_list(mat_field(mat, "file_list", mat_path))]
        labels = labels_from_one_based(as_list(mat_field(mat, "labels", mat_path)), NUM_CLASSES, mat_path)
        if len(files) != len(labels):
            raise FinebenchError(f"{mat_path}: {len(files)} entries in file_list but {len(labels)} labels")
        examples = []
        for relative, label in zip(files, labels):
            folder = relative.split("/", 1)[0]
            if folder_of_label.setdefault(label, folder) != folder:
                raise FinebenchError(
                    f"{mat_path}: label {label + 1} is given to both {folder_of_label[label]} and {folder}"
                )
            examples.append(Example(require_file(images / relative, f"listed in {mat_path.name}"), label))
        splits[split] = examples
    # Folder names are "<wnid>-<breed>"; the breed part is the class name. Only the labels the
    # lists use can be named, so they must run 1..K without gaps (K = 120 for the real data).
    classes = [folder_of_label[label].split("-", 1)[-1] for label in sorted(folder_of_label)]
    if sorted(folder_of_label) != list(range(len(folder_of_label))):
        raise FinebenchError(
            f"{raw_dir}: train_list.mat/test_list.mat use labels {sorted(folder_of_label)[:5]}...; "
            "expected consecutive ids starting at 1"
        )
    return ParsedDataset(
        classes=classes,
        splits=splits,
        info={"wnids": [folder_of_label[label].split("-", 1)[0] for label in sorted(folder_of_label)]},
    )


SPEC = DatasetSpec(
    name="stanford_dogs",
    num_classes=NUM_CLASSES,
    split_sizes={"train": 12000, "test": 8580},
    protocol="Official train_list.mat / test_list.mat (100 training images per breed); top-1 "
    "accuracy on the test split. Images come from ImageNet: ImageNet-pretrained weights have seen "
    "many of the test images, so note this when comparing.",
    terms="Research use; images are from ImageNet and keep ImageNet's terms.",
    homepage=_URL,
    parse=parse,
    sources=(
        # No digest is published for these archives; the digests seen are recorded in meta.json.
        Source("images.tar", url=_URL + "images.tar"),
        Source("lists.tar", url=_URL + "lists.tar"),
    ),
    description="Stanford Dogs: 20,580 images of 120 dog breeds. Class names are the breed part of "
    "the Images/<wnid>-<breed> folders, ordered by label id. annotation.tar (boxes) is not needed.",
)
