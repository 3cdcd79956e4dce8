"""The Oxford VGG fine-grained sets: Flowers-102, FGVC-Aircraft (four registered views of one archive) and
Oxford-IIIT Pets."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from finebench.data.builders._layout import (
    LazyExamples,
    as_list,
    cropped,
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

_VGG = "https://www.robots.ox.ac.uk/~vgg/data/"

# ---- Flowers-102 ---------------------------------------------------------------------------

# The dataset ships only numeric labels. These names are the list the community derived from the
# VGG site (as used in jimgoo/caffe-oxford102), in label order 1..102, spelled exactly as torchvision's
# Flowers102.classes (label 59 keeps its "?": the name the list gives is uncertain), so names match
# across tools.
FLOWER_NAMES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia?", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
]


def parse_flowers102(raw_dir: Path) -> ParsedDataset:
    images = require_dir(raw_dir / "jpg", "from 102flowers.tgz")
    labels_path, setid_path = raw_dir / "imagelabels.mat", raw_dir / "setid.mat"
    labels = labels_from_one_based(
        as_list(mat_field(load_mat(labels_path), "labels", labels_path)), len(FLOWER_NAMES), labels_path
    )
    setid = load_mat(setid_path)
    splits = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        examples = []
        for image_id in as_list(mat_field(setid, key, setid_path)):
            image_id = int(image_id)
            if not 1 <= image_id <= len(labels):
                raise FinebenchError(f"{setid_path}: {key} holds image id {image_id}, outside 1..{len(labels)}")
            path = require_file(images / f"image_{image_id:05d}.jpg", f"listed in setid.mat {key}")
            examples.append(Example(path, labels[image_id - 1]))
        splits[split] = examples
    return ParsedDataset(
        classes=list(FLOWER_NAMES),
        splits=splits,
        info={"class_names_source": "community list (jimgoo/caffe-oxford102); the dataset ships ids only"},
    )


FLOWERS102 = DatasetSpec(
    name="flowers102",
    num_classes=102,
    split_sizes={"train": 1020, "val": 1020, "test": 6149},
    protocol="Official setid.mat splits (trnid/valid/tstid: 10 train and 10 val images per class); "
    "select on val, report top-1 on test (or train on train+val as the paper's baselines do, and say so).",
    terms="Free for research; images collected from the web.",
    homepage=_VGG + "flowers/102/",
    parse=parse_flowers102,
    sources=(
        Source("102flowers.tgz", url=_VGG + "flowers/102/102flowers.tgz", md5="52808999861908f626f3c1f4e79d11fa"),
        Source("imagelabels.mat", url=_VGG + "flowers/102/imagelabels.mat",
               md5="e0620be6f572b9609742df49c70aed4d", extract=False),
        Source("setid.mat", url=_VGG + "flowers/102/setid.mat",
               md5="a5357ecc9cb78c4bef273ce3793fc85c", extract=False),
    ),
    description="Oxford Flowers-102: 8,189 images of 102 flower species common in the UK. The class "
    "names are the widely used community list; the dataset itself ships numeric labels only.",
)

# ---- FGVC-Aircraft -------------------------------------------------------------------------

AIRCRAFT_BANNER_PX = 20
"""Height of the photographer's copyright banner at the bottom of every FGVC-Aircraft image."""

AIRCRAFT_LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
"""Annotation level -> the class list naming its classes in label order (torchvision's ``annotation_level``)."""

_AIRCRAFT_SPLITS = ("train", "val", "test")


def _aircraft_list(data: Path, level: str, split: str, label_of: dict[str, int]) -> list[tuple[str, int]]:
    """(image id, label) from ``images_<level>_<split>.txt``, whose lines are "<id> <class name with spaces>"."""
    list_path = data / f"images_{level}_{split}.txt"
    rows = []
    for image_id, name in read_rows(list_path, min_fields=2, maxsplit=1):
        name = name.strip()
        if name not in label_of:
            raise FinebenchError(
                f"{list_path}: {level} {name!r} of image {image_id} is not in {AIRCRAFT_LEVELS[level]}"
            )
        rows.append((image_id, label_of[name]))
    return rows


def parse_fgvc_aircraft(raw_dir: Path, level: str = "variant", crop_banner: bool = False) -> ParsedDataset:
    """train / val / test at one annotation level; trainval is stored as train + val, checked against its list.

    ``crop_banner`` re-encodes every image without its bottom banner (JPEG q95); otherwise the
    files are stored as they are, banner included, as torchvision and the peers' official loaders
    (WS-DAN, CAL) read them.
    """
    data = require_dir(raw_dir / "fgvc-aircraft-2013b" / "data", "from fgvc-aircraft-2013b.tar.gz")
    images = require_dir(data / "images", "from fgvc-aircraft-2013b.tar.gz")
    classes = [row[0].strip() for row in read_rows(data / AIRCRAFT_LEVELS[level], min_fields=1, maxsplit=0)]
    label_of = {name: label for label, name in enumerate(classes)}
    lists = {split: _aircraft_list(data, level, split, label_of) for split in _AIRCRAFT_SPLITS}
    trainval = _aircraft_list(data, level, "trainval", label_of)
    if sorted(trainval) != sorted(lists["train"] + lists["val"]):
        raise FinebenchError(
            f"{data / f'images_{level}_trainval.txt'}: its {len(trainval)} lines are not the train and val "
            f"lists together ({len(lists['train'])} + {len(lists['val'])}); the archive is damaged or mixed"
        )
    splits: dict[str, Sequence[Example]] = {}
    for split, rows in lists.items():
        listed = f"listed in images_{level}_{split}.txt"
        items = [(require_file(images / f"{image_id}.jpg", listed), label) for image_id, label in rows]
        splits[split] = LazyExamples(items, _without_banner) if crop_banner else [Example(p, y) for p, y in items]
    info: dict[str, Any] = {
        "annotation_level": level,
        "banner": f"cropped ({AIRCRAFT_BANNER_PX} px)" if crop_banner else "kept",
        "trainval": f"train + val (= images_{level}_trainval.txt; use train_split = \"train+val\")",
    }
    if crop_banner:
        info["crop_encoding"] = "JPEG q95"
    return ParsedDataset(classes=classes, splits=splits, info=info)


def _without_banner(item: tuple[Path, int]) -> Example:
    path, label = item
    with Image.open(path) as image:
        width, height = image.size
    return Example(cropped(path, (0, 0, width, height - AIRCRAFT_BANNER_PX)), label)


_AIRCRAFT_ARCHIVE = Source(
    "fgvc-aircraft-2013b.tar.gz",
    url=_VGG + "fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
    # torchvision checks no digest. The dataset page links an MD5 page (archives/fgvc-aircraft-2013b.html,
    # not readable from here); this is the value other loaders of the same URL check (e.g. the R torchvision port).
    md5="d4acdd33327262359767eeaa97a4f732",
)


def _aircraft_spec(name: str, level: str, num_classes: int, crop_banner: bool) -> DatasetSpec:
    """One registered dataset per (level, banner) pair, so a store's name says which images and labels it holds."""
    banner = (
        f"the {AIRCRAFT_BANNER_PX}-pixel copyright banner at the bottom of each image is cropped away (images "
        "re-encoded as JPEG q95)"
        if crop_banner
        else f"images are stored as distributed, {AIRCRAFT_BANNER_PX}-pixel copyright banner included, as the "
        "official WS-DAN and CAL loaders (the only peers' code that reads Aircraft) and torchvision read them "
        "(fgvc_aircraft_cropped drops it)"
    )
    return DatasetSpec(
        name=name,
        num_classes=num_classes,
        split_sizes={"train": 3334, "val": 3333, "test": 3333},
        protocol=f"{level.capitalize()} level ({num_classes} classes), official "
        f"images_{level}_{{train,val,test}}.txt; {banner}. Select on val; for final numbers train on trainval "
        "(train_split = \"train+val\", 6,667 images) and report top-1 on test (3,333).",
        terms="Non-commercial research only; images courtesy of airliners.net photographers.",
        homepage=_VGG + "fgvc-aircraft/",
        parse=functools.partial(parse_fgvc_aircraft, level=level, crop_banner=crop_banner),
        store_info={"annotation_level": level,
                    "banner": f"cropped ({AIRCRAFT_BANNER_PX} px)" if crop_banner else "kept"},
        sources=(_AIRCRAFT_ARCHIVE,),
        description=f"FGVC-Aircraft 2013b: 10,000 images of aircraft, {num_classes} {level} classes (names from "
        f"{AIRCRAFT_LEVELS[level]}), banner {'cropped' if crop_banner else 'kept'}. Every fgvc_aircraft* dataset "
        "reads the same archive: prepare the others with --from <data root>/.downloads/<the first one's name> "
        "to skip a second download.",
    )


FGVC_AIRCRAFT = _aircraft_spec("fgvc_aircraft", "variant", 100, crop_banner=False)
FGVC_AIRCRAFT_CROPPED = _aircraft_spec("fgvc_aircraft_cropped", "variant", 100, crop_banner=True)
FGVC_AIRCRAFT_FAMILY = _aircraft_spec("fgvc_aircraft_family", "family", 70, crop_banner=False)
FGVC_AIRCRAFT_MANUFACTURER = _aircraft_spec("fgvc_aircraft_manufacturer", "manufacturer", 30, crop_banner=False)

# ---- Oxford-IIIT Pets ----------------------------------------------------------------------


def parse_oxford_pets(raw_dir: Path) -> ParsedDataset:
    images = require_dir(raw_dir / "images", "from images.tar.gz")
    annotations = require_dir(raw_dir / "annotations", "from annotations.tar.gz")
    breed_of_label: dict[int, str] = {}
    splits = {}
    for split, list_name in (("train", "trainval.txt"), ("test", "test.txt")):
        list_path = annotations / list_name
        examples = []
        for name, class_id, *_ in read_rows(list_path, min_fields=4):
            label = parse_int(class_id, list_path, "class id") - 1
            # File names are "<breed>_<n>"; cat breeds are capitalised, dog breeds lower case.
            breed = name.rsplit("_", 1)[0]
            if breed_of_label.setdefault(label, breed) != breed:
                raise FinebenchError(
                    f"{list_path}: class id {label + 1} is given to {breed_of_label[label]} and {breed}"
                )
            examples.append(Example(require_file(images / f"{name}.jpg", f"listed in {list_name}"), label))
        splits[split] = examples
    if sorted(breed_of_label) != list(range(len(breed_of_label))):
        raise FinebenchError(
            f"{annotations}: class ids must run 1..K without gaps, got {sorted(breed_of_label)[:5]}..."
        )
    return ParsedDataset(
        classes=[breed_of_label[label] for label in sorted(breed_of_label)],
        splits=splits,
        info={"train_list": "annotations/trainval.txt", "test_list": "annotations/test.txt"},
    )


OXFORD_PETS = DatasetSpec(
    name="oxford_pets",
    num_classes=37,
    split_sizes={"train": 3680, "test": 3669},
    protocol="Official annotations/trainval.txt (stored as the train split) and test.txt; 37 breeds; "
    "top-1 accuracy on test.",
    terms="Creative Commons Attribution-ShareAlike 4.0.",
    homepage=_VGG + "pets/",
    parse=parse_oxford_pets,
    sources=(
        Source("images.tar.gz", url=_VGG + "pets/data/images.tar.gz", md5="5c4f3ee8e5d25df40f4fd59a7f44e54c"),
        Source("annotations.tar.gz", url=_VGG + "pets/data/annotations.tar.gz",
               md5="95a8c909bbe2e81eed6a22bccdf3f68f"),
    ),
    description="Oxford-IIIT Pet: 7,349 images of 37 cat and dog breeds. Class names are the image "
    "file-name prefixes (cat breeds capitalised, dog breeds lower case), in class-id order.",
)

SPECS = [
    FLOWERS102, FGVC_AIRCRAFT, FGVC_AIRCRAFT_CROPPED, FGVC_AIRCRAFT_FAMILY, FGVC_AIRCRAFT_MANUFACTURER, OXFORD_PETS,
]
