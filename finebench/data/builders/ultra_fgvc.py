"""The ultra-fine-grained leaf sets of Ultra-FGVC (Yu et al., ICCV 2021; XiaohanYu-GU/Ultra-FGVC): Cotton80,
SoyLocal, SoyGene, SoyGlobal and the five SoyAgeing subsets.

The authors distribute them only through a Baidu Pan link (access code in their README), so they are
``--from`` only. Their README documents no layout; the one here is what the public loaders of these sets
read (an ``UltraRoot`` table with ``UltraFineGrainedDataset`` in ultra-fine-grained category-discovery code, and
a Cotton80 loader over a re-hosted ``Cotton80.zip``): each set has ``images/`` and ``anno/train.txt``,
``anno/test.txt`` (and, in the re-hosted Cotton80, ``anno/val.txt``, stored as the val split) with lines
``<path under images/> <class id>``, ids 1-based, in the folder named below (or its last part, where an
archive was unpacked in place). Classes are cultivars identified by number only, so class names are the ids.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from finebench.data.builders._layout import labels_from_one_based, parse_int, read_rows, require_dir, require_file
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.errors import FinebenchError

HOMEPAGE = "https://github.com/XiaohanYu-GU/Ultra-FGVC"
DOWNLOAD = "https://pan.baidu.com/s/1bPJYmFGWJg2eTr5Ipfw6uA (access code ICCV)"


@dataclass(frozen=True)
class Subset:
    name: str
    folder: str
    """Path of the set's root (holding images/ and anno/) inside the unpacked download."""
    classes: int
    train: int
    test: int


SUBSETS = [
    Subset("cotton80", "Cotton80/COTTON", 80, 240, 240),
    Subset("soylocal", "SoyLocal/soybean200", 200, 600, 600),
    Subset("soygene", "SoyGene/soybeangene", 1110, 12_763, 11_493),
    Subset("soyglobal", "SoyGlobal/soybean2000", 1938, 5_814, 5_814),
    *(Subset(f"soyageing_r{r}", f"SoyAgeing/SoyAgeing-R{r}/R{r}", 198, 990, 990) for r in (1, 3, 4, 5, 6)),
]
"""Class counts and split sizes from the paper's Table 1 as quoted by later work (not checked against the files
here); prepare warns if the data disagree."""


def _set_root(raw_dir: Path, subset: Subset) -> Path:
    """The folder holding anno/: the full path (the download unpacked into one folder), or any tail of it
    (an archive unpacked where it lies: Cotton80.zip holds COTTON/ itself)."""
    parts = subset.folder.split("/")
    for start in range(len(parts)):
        candidate = raw_dir.joinpath(*parts[start:])
        if (candidate / "anno").is_dir():
            return candidate
    return require_dir(raw_dir / subset.folder / "anno", f"the {subset.name} lists; or {parts[-1]}/anno directly in DIR")


def parse_ultra_fgvc(raw_dir: Path, subset: Subset) -> ParsedDataset:
    root = _set_root(raw_dir, subset)
    images = require_dir(root / "images", f"{subset.name} images")
    splits = {}
    names = ("train", "val", "test") if (root / "anno" / "val.txt").is_file() else ("train", "test")
    for split in names:
        list_path = require_file(root / "anno" / f"{split}.txt", f"the {subset.name} {split} list")
        rows = read_rows(list_path, min_fields=2)
        ids = [parse_int(row[-1], list_path, "class id") for row in rows]
        labels = labels_from_one_based(ids, subset.classes, list_path)
        examples = []
        for (relative, *_), label in zip(rows, labels):
            path = images / relative
            if not path.is_file():
                raise FinebenchError(f"{list_path}: lists image {relative}, which is not in {images}")
            examples.append(Example(path, label))
        splits[split] = examples
    return ParsedDataset(
        classes=[str(class_id) for class_id in range(1, subset.classes + 1)],
        splits=splits,
        info={"lists": [f"{root.relative_to(raw_dir).as_posix()}/anno/{split}.txt" for split in names],
              "class_names": "the 1-based class ids (cultivars are numbered, not named)"},
    )


def _spec(subset: Subset) -> DatasetSpec:
    archive = f"{subset.folder.split('/')[0]}.zip"
    return DatasetSpec(
        name=subset.name,
        num_classes=subset.classes,
        split_sizes={"train": subset.train, "test": subset.test},
        protocol=f"Official anno/train.txt and anno/test.txt of {subset.folder} (anno/val.txt, where the copy has "
        "one, as the val split); top-1 accuracy on test.",
        terms="Research use; cite Yu et al., ICCV 2021 (Ultra-FGVC README).",
        homepage=HOMEPAGE,
        parse=functools.partial(parse_ultra_fgvc, subset=subset),
        sources=(Source(archive),),
        manual=True,
        manual_instructions=f"Download the set from the Baidu Pan link in the Ultra-FGVC README, {DOWNLOAD}, and "
        f"put in DIR either its unpacked {subset.folder}/ (images/, anno/) or the archive named {archive} (the "
        "share's file names are not documented: unpacking always works).",
        description=f"Ultra-FGVC {subset.name}: {subset.classes} soybean or cotton cultivars told apart by leaf "
        "images alone (ultra-fine-grained).",
    )


SPECS = [_spec(subset) for subset in SUBSETS]
