"""WebFG-496 (NUST-Machine-Intelligence-Laboratory/weblyFG-dataset): web-bird, web-car, web-aircraft.

Training images were collected by web search, so their labels are noisy by design; the test images are
the clean test sets of CUB-200-2011, Stanford Cars and FGVC-Aircraft. Each archive unpacks to
``web-<name>/train/<class>/`` and ``web-<name>/val/<class>/``, and the authors' code reads both with
torchvision's ``ImageFolder`` (``main.py``: ``ImageFolder(os.path.join(data_dir, 'train'))`` and
``'val'`` as the test set). So classes are the sorted folder names and images are the files with
``ImageFolder``'s extensions; this reproduces exactly that, and refuses a test folder whose classes differ
from training's (``ImageFolder`` would silently shift the labels).
"""

from __future__ import annotations

import functools
from pathlib import Path

from finebench.data.builders._layout import require_dir
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.errors import FinebenchError

_BUCKET = "https://web-fgvc-496-5089-sh.oss-cn-shanghai.aliyuncs.com/"
HOMEPAGE = "https://github.com/NUST-Machine-Intelligence-Laboratory/weblyFG-dataset"

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""torchvision's ``datasets.folder.IMG_EXTENSIONS``: what ``ImageFolder`` counts as an image (case-insensitive)."""

SPLIT_FOLDERS = {"train": "train", "test": "val"}
"""finebench split -> the folder the authors' code reads it from (their ``val`` is the test set)."""


def _class_folder(folder: Path) -> dict[str, list[Path]]:
    classes = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            classes[entry.name] = sorted(
                p for p in entry.rglob("*") if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)
            )
    return classes


def parse_webfg(raw_dir: Path, root: str) -> ParsedDataset:
    base = require_dir(raw_dir / root, f"from {root}.tar.gz")
    found = {split: _class_folder(require_dir(base / folder, f"from {root}.tar.gz")) for split, folder in SPLIT_FOLDERS.items()}
    classes = list(found["train"])
    if not classes:
        raise FinebenchError(f"{base / 'train'}: no class folders")
    if list(found["test"]) != classes:
        odd = sorted(set(found["test"]) ^ set(classes))
        raise FinebenchError(
            f"{base / 'val'}: its class folders differ from train's ({len(found['test'])} vs {len(classes)}"
            + (f"; {odd[0]!r} is in only one" if odd else "") + "): labels would not line up"
        )
    splits = {}
    for split, per_class in found.items():
        empty = [name for name, files in per_class.items() if not files]
        if empty:
            raise FinebenchError(f"{base / SPLIT_FOLDERS[split] / empty[0]}: no image files (extensions {', '.join(IMG_EXTENSIONS)})")
        splits[split] = [Example(path, label) for label, name in enumerate(classes) for path in per_class[name]]
    return ParsedDataset(
        classes=classes,
        splits=splits,
        info={"train_folder": f"{root}/train (web images, noisy labels)", "test_folder": f"{root}/val (clean test set)",
              "classes_from": "sorted folder names, as torchvision ImageFolder in the authors' main.py"},
    )


def _spec(name: str, root: str, classes: int, train: int, test: int, test_source: str) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        num_classes=classes,
        split_sizes={"train": train, "test": test},
        protocol=f"Train on the web images of {root}/train (labels are noisy: that is the benchmark), report top-1 "
        f"on {root}/val, the clean {test_source} test set. Classes are the sorted folder names (ImageFolder).",
        terms="Research use; web images of unknown copyright, test images under their source dataset's terms.",
        homepage=HOMEPAGE,
        parse=functools.partial(parse_webfg, root=root),
        sources=(Source(f"{root}.tar.gz", url=f"{_BUCKET}{root}.tar.gz"),),  # no digest is published
        description=f"WebFG-496 {root}: {classes} classes of webly supervised training images, tested on the "
        f"{test_source} test set (Sun et al., ICCV 2021).",
    )


# Training counts per subset are the paper's (Sun et al., ICCV 2021, Table 1); the README states only their sum,
# 53,339, which they add up to. Test counts are the source datasets' official test sets. prepare warns on a mismatch.
SPECS = [
    _spec("web_bird", "web-bird", 200, 18_388, 5_794, "CUB-200-2011"),
    _spec("web_car", "web-car", 196, 21_448, 8_041, "Stanford Cars"),
    _spec("web_aircraft", "web-aircraft", 100, 13_503, 3_333, "FGVC-Aircraft"),
]
