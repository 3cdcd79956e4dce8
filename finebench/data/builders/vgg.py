"""The Oxford VGG fine-grained sets: Flowers-102, FGVC-Aircraft and Oxford-IIIT Pets."""

from __future__ import annotations

from pathlib import Path

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
"""Every image carries a 20-pixel copyright banner at the bottom; the official protocol drops it."""


def parse_fgvc_aircraft(raw_dir: Path) -> ParsedDataset:
    data = require_dir(raw_dir / "fgvc-aircraft-2013b" / "data", "from fgvc-aircraft-2013b.tar.gz")
    images = require_dir(data / "images")
    classes = [row[0].strip() for row in read_rows(data / "variants.txt", min_fields=1, maxsplit=0)]
    label_of = {name: label for label, name in enumerate(classes)}
    splits = {}
    for split in ("train", "val", "test"):
        list_path = data / f"images_variant_{split}.txt"
        items = []
        for image_id, variant in read_rows(list_path, min_fields=2, maxsplit=1):
            variant = variant.strip()
            if variant not in label_of:
                raise FinebenchError(f"{list_path}: variant {variant!r} is not in variants.txt")
            items.append((require_file(images / f"{image_id}.jpg", f"listed in {list_path.name}"), label_of[variant]))
        splits[split] = LazyExamples(items, _crop_banner)
    return ParsedDataset(
        classes=classes,
        splits=splits,
        info={"annotation_level": "variant", "banner_cropped_px": AIRCRAFT_BANNER_PX, "crop_encoding": "JPEG q95",
              "trainval": "train + val (images_variant_trainval.txt)"},
    )


def _crop_banner(item: tuple[Path, int]) -> Example:
    path, label = item
    with Image.open(path) as image:
        width, height = image.size
    return Example(cropped(path, (0, 0, width, height - AIRCRAFT_BANNER_PX)), label)


FGVC_AIRCRAFT = DatasetSpec(
    name="fgvc_aircraft",
    num_classes=100,
    split_sizes={"train": 3334, "val": 3333, "test": 3333},
    protocol="Variant level (100 classes), official images_variant_{train,val,test}.txt; the 20-pixel "
    "banner at the bottom of each image is cropped away. Select on val; for final numbers train on "
    "trainval (= train + val, 6,667 images) and report top-1 on test (3,333).",
    terms="Non-commercial research only; images courtesy of airliners.net photographers.",
    homepage=_VGG + "fgvc-aircraft/",
    parse=parse_fgvc_aircraft,
    sources=(
        Source("fgvc-aircraft-2013b.tar.gz", url=_VGG + "fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
               md5="d4acdd33327262359767eeaa97a4f732"),
    ),
    description="FGVC-Aircraft 2013b: 10,000 images of aircraft, 100 variants (class names from variants.txt).",
)

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

SPECS = [FLOWERS102, FGVC_AIRCRAFT, OXFORD_PETS]
