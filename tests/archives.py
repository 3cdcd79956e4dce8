"""Miniature copies of official dataset distributions, built for tests.

Every image is a real JPEG filled with one colour that no other image in the same miniature
uses, so a test can read a stored image back, sample its pixels and tell exactly which source
image (and so which label) it came from. Annotation files use the real formats: ``.mat`` files
written by ``scipy.io.savemat`` with the official variable names and cell/struct shapes, and text
files with the official columns. Each builder returns the files under their official names plus
what a correct prepare must produce.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile
import zipfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.io import savemat

Colour = tuple[int, int, int]

_LEVELS = (24, 72, 120, 168, 216)
PALETTE: list[Colour] = [c for c in itertools.product(_LEVELS, repeat=3) if len(set(c)) > 1]
"""Colours at least 48 apart in some channel: far beyond JPEG error on flat blocks."""


@dataclass
class Expected:
    """One example a correct prepare stores: its label, fill colour and (for crops) size."""

    label: int
    colour: Colour
    size: tuple[int, int] | None = None
    body_rows: int | None = None
    """Rows from the top that show the colour (the rest is a banner); ``None``: the whole image."""


@dataclass
class Miniature:
    name: str
    files: dict[str, bytes]
    """Official file name -> content (archives and plain files, as distributed)."""
    classes: list[str]
    splits: dict[str, list[Expected]]
    extra: dict = field(default_factory=dict)

    def md5(self, filename: str) -> str:
        return hashlib.md5(self.files[filename]).hexdigest()


class _Colours:
    """Hands out distinct colours in a fixed order, so miniatures are deterministic."""

    def __init__(self) -> None:
        self._next = iter(PALETTE)

    def __call__(self) -> Colour:
        return next(self._next)


# ---- encoders -------------------------------------------------------------------------------


def jpeg(colour: Colour, size: tuple[int, int] = (24, 16), *, banner: int = 0) -> bytes:
    """A flat JPEG of ``size`` (w, h); ``banner`` adds that many black rows at the bottom."""
    width, height = size
    pixels = np.empty((height + banner, width, 3), dtype=np.uint8)
    pixels[:height] = colour
    pixels[height:] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def two_part_jpeg(left: Colour, right: Colour, size: tuple[int, int] = (32, 16)) -> bytes:
    """Left half one colour, right half another: a photo with two foods."""
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], compression: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def mat_bytes(variables: dict) -> bytes:
    buffer = io.BytesIO()
    savemat(buffer, variables)
    return buffer.getvalue()


def cell_column(values: list[str]) -> np.ndarray:
    """An N x 1 MATLAB cell array of strings (how Stanford Dogs stores file_list)."""
    cells = np.empty((len(values), 1), dtype=object)
    for i, value in enumerate(values):
        cells[i, 0] = value
    return cells


def struct_row(records: list[dict]) -> np.ndarray:
    """A 1 x N MATLAB struct array (how the Stanford Cars and ImageNet devkits store records)."""
    names = list(records[0])
    array = np.empty((1, len(records)), dtype=[(n, object) for n in names])
    for i, record in enumerate(records):
        for n in names:
            array[n][0, i] = record[n]
    return array


def text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# ---- datasets -------------------------------------------------------------------------------


def stanford_dogs() -> Miniature:
    colour = _Colours()
    folders = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
    images, lists, splits = {}, {}, {"train": [], "test": []}
    for split, per_class in (("train", 2), ("test", 1)):
        entries = []
        for label, folder in enumerate(folders):
            for n in range(per_class):
                c = colour()
                relative = f"{folder}/{folder.split('-')[0]}_{split}{n}.jpg"
                images[f"Images/{relative}"] = jpeg(c)
                entries.append((relative, label))
                splits[split].append(Expected(label, c))
        entries.reverse()  # the parser must go by labels, not by list order
        lists[f"{split}_list.mat"] = mat_bytes({
            "file_list": cell_column([r for r, _ in entries]),
            "annotation_list": cell_column([r[:-4] for r, _ in entries]),
            "labels": np.array([[label + 1.0] for _, label in entries]),
        })
    return Miniature(
        "stanford_dogs",
        {"images.tar": tar_bytes(images), "lists.tar": tar_bytes(lists)},
        ["Chihuahua", "Japanese_spaniel", "Maltese_dog"],
        splits,
    )


def _caltech_tables(root: str, records: list[tuple[str, str, int, bool]]) -> dict[str, bytes]:
    """images.txt / image_class_labels.txt / train_test_split.txt for (id, path, class id, is_train)."""
    return {
        f"{root}/images.txt": text([f"{i} {p}" for i, p, _, _ in records]),
        f"{root}/image_class_labels.txt": text([f"{i} {c}" for i, _, c, _ in records]),
        f"{root}/train_test_split.txt": text([f"{i} {int(t)}" for i, _, _, t in records]),
    }


def cub200() -> Miniature:
    colour = _Colours()
    folders = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    members, records, splits = {}, [], {"train": [], "test": []}
    image_id = 0
    for label, folder in enumerate(folders):
        for is_train in (True, False, True):
            image_id += 1
            c = colour()
            path = f"{folder}/{folder.split('.')[1]}_{image_id:04d}_{image_id}.jpg"
            members[f"CUB_200_2011/images/{path}"] = jpeg(c)
            records.append((str(image_id), path, label + 1, is_train))
            splits["train" if is_train else "test"].append(Expected(label, c))
    members.update(_caltech_tables("CUB_200_2011", records))
    members["CUB_200_2011/classes.txt"] = text([f"{i} {f}" for i, f in enumerate(folders, 1)])
    members["CUB_200_2011/bounding_boxes.txt"] = text([f"{r[0]} 1.0 1.0 10.0 10.0" for r in records])
    return Miniature(
        "cub200",
        {"CUB_200_2011.tgz": tar_bytes(members, "gz")},
        ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"],
        splits,
    )


def nabirds() -> Miniature:
    colour = _Colours()
    # classes.txt lists taxonomy nodes too; only leaves with images become classes.
    classes_txt = ["0 Birds", "1 Perching Birds", "22 Chickadees and Titmice",
                   "295 Oak Titmouse", "296 Juniper Titmouse", "400 Empty Leaf Without Images",
                   "817 Tufted Titmouse"]
    leaves = [295, 296, 817]
    members, records, splits = {}, [], {"train": [], "test": []}
    for label, class_id in enumerate(leaves):
        for n, is_train in enumerate((True, False)):
            c = colour()
            uuid = f"{class_id:08x}-{n:04x}-4d0c-bfe1-4cae3c85c829"
            path = f"{class_id:04d}/{uuid.replace('-', '')}.jpg"
            members[f"nabirds/images/{path}"] = jpeg(c)
            records.append((uuid, path, class_id, is_train))
            splits["train" if is_train else "test"].append(Expected(label, c))
    members.update(_caltech_tables("nabirds", records))
    members["nabirds/classes.txt"] = text(classes_txt)
    members["nabirds/hierarchy.txt"] = text(["1 0", "22 1", "295 22", "296 22", "817 22", "400 22"])
    return Miniature(
        "nabirds",
        {"nabirds.tar.gz": tar_bytes(members, "gz")},
        ["Oak Titmouse", "Juniper Titmouse", "Tufted Titmouse"],
        splits,
    )


def stanford_cars() -> Miniature:
    colour = _Colours()
    class_names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    files, splits = {}, {"train": [], "test": []}
    annotations = {}
    for split, per_class in (("train", 2), ("test", 1)):
        members, records = {}, []
        for label in (2, 0, 1):  # annotation order is not class order
            for _ in range(per_class):
                c = colour()
                fname = f"{len(records) + 1:05d}.jpg"
                members[f"cars_{split}/{fname}"] = jpeg(c)
                records.append({"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 20, "bbox_y2": 12,
                                "class": np.uint8(label + 1), "fname": fname})
                splits[split].append(Expected(label, c))
        files[f"cars_{split}.tgz"] = tar_bytes(members, "gz")
        annotations[split] = records
    files["car_devkit.tgz"] = tar_bytes({
        "devkit/cars_meta.mat": mat_bytes({"class_names": np.array([class_names], dtype=object)}),
        "devkit/cars_train_annos.mat": mat_bytes({"annotations": struct_row(annotations["train"])}),
        "devkit/cars_test_annos.mat": mat_bytes({"annotations": struct_row(
            [{k: v for k, v in r.items() if k != "class"} for r in annotations["test"]])}),
        "devkit/README.txt": b"devkit\n",
    }, "gz")
    files["cars_test_annos_withlabels.mat"] = mat_bytes({"annotations": struct_row(annotations["test"])})
    return Miniature("stanford_cars", files, class_names, splits)


def uec_food100() -> Miniature:
    """Three classes; photo 3 holds foods 1 and 2 and sits in both folders with one box each."""
    colour = _Colours()
    names = ["rice", "eels on rice", "pilaf"]
    members = {"UECFOOD100/category.txt": text(["id\tname"] + [f"{i}\t{n}" for i, n in enumerate(names, 1)])}
    boxes: dict[int, list[str]] = {1: [], 2: [], 3: []}
    expected: list[tuple[int, Expected]] = []  # (photo, example)
    single = {1: [1, 2], 2: [4, 5], 3: [6, 7, 8]}
    for class_id, photos in single.items():
        for photo in photos:
            c = colour()
            members[f"UECFOOD100/{class_id}/{photo}.jpg"] = jpeg(c, (32, 32))
            boxes[class_id].append(f"{photo} 0 0 16 16")
            expected.append((photo, Expected(class_id - 1, c, (16, 16))))
    left, right = colour(), colour()
    for class_id, box, c in ((1, "3 0 0 16 16", left), (2, "3 16 0 32 16", right)):
        members[f"UECFOOD100/{class_id}/3.jpg"] = two_part_jpeg(left, right, (32, 16))
        boxes[class_id].append(box)
        expected.append((3, Expected(class_id - 1, c, (16, 16))))
    for class_id, rows in boxes.items():
        members[f"UECFOOD100/{class_id}/bb_info.txt"] = text(["img x1 y1 x2 y2"] + rows)
    members["UECFOOD100/multiple_food.txt"] = text(["img category1 category2", "3 1 2"])
    return Miniature(
        "uec_food100",
        {"dataset100.zip": zip_bytes(members)},
        names,
        {"all": [e for _, e in expected]},
        extra={"photo_of_colour": {e.colour: photo for photo, e in expected}, "photos": 8},
    )


def adience() -> Miniature:
    colour = _Colours()
    header = "user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score"
    members, files, splits = {}, {}, {}
    face_id = 0
    for fold in range(5):
        rows, splits[f"fold{fold}"] = [header], []
        for gender in ("f", "m", "u", ""):
            face_id += 1
            user = f"{fold + 1000}@N0{fold}"
            original = f"{face_id}0537_5d6473f2d1_o.jpg"
            c = colour()
            members[f"aligned/{user}/landmark_aligned_face.{face_id}.{original}"] = jpeg(c)
            rows.append(f"{user}\t{original}\t{face_id}\t(25, 32)\t{gender}\t0\t0\t100\t100\t0\t0\t17")
            if gender:
                if gender != "u":
                    splits[f"fold{fold}"].append(Expected({"f": 0, "m": 1}[gender], c))
        files[f"fold_{fold}_data.txt"] = text(rows)
    files["aligned.tar.gz"] = tar_bytes(members, "gz")
    return Miniature("adience", files, ["female", "male"], splits)


def imagenet() -> Miniature:
    colour = _Colours()
    # In ILSVRC2012_ID order, which is not the sorted-wnid order labels follow (torchvision, timm).
    leaves = [("n03126707", "crane"), ("n01440764", "tench, Tinca tinca"), ("n02012849", "crane")]
    label_of = {wnid: label for label, wnid in enumerate(sorted(w for w, _ in leaves))}
    train_tars, splits = {}, {"train": [], "test": []}
    for wnid, _ in leaves:
        inner = {}
        for n in range(2):
            c = colour()
            inner[f"{wnid}_{n + 1}.JPEG"] = jpeg(c)
            splits["train"].append(Expected(label_of[wnid], c))
        train_tars[f"{wnid}.tar"] = tar_bytes(inner)
    val, truth = {}, []
    for index, ilsvrc_id in enumerate((3, 1, 2, 2, 1, 3), start=1):
        c = colour()
        val[f"ILSVRC2012_val_{index:08d}.JPEG"] = jpeg(c)
        truth.append(str(ilsvrc_id))
        splits["test"].append(Expected(label_of[leaves[ilsvrc_id - 1][0]], c))
    synsets = [
        {"ILSVRC2012_ID": i, "WNID": w, "words": words, "gloss": "g", "num_children": 0,
         "children": np.zeros((1, 0)), "wordnet_height": 0, "num_train_images": 2}
        for i, (w, words) in enumerate(leaves, 1)
    ] + [{"ILSVRC2012_ID": 4, "WNID": "n00001740", "words": "entity", "gloss": "g", "num_children": 3,
          "children": np.array([[1, 2, 3]]), "wordnet_height": 1, "num_train_images": 0}]
    devkit = {
        "ILSVRC2012_devkit_t12/data/meta.mat": mat_bytes({"synsets": struct_row(synsets).T}),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": text(truth),
    }
    return Miniature(
        "imagenet",
        {
            "ILSVRC2012_img_train.tar": tar_bytes(train_tars),
            "ILSVRC2012_img_val.tar": tar_bytes(val),
            "ILSVRC2012_devkit_t12.tar.gz": tar_bytes(devkit, "gz"),
        },
        ["tench, Tinca tinca", "crane (n02012849)", "crane (n03126707)"],
        splits,
    )


def flowers102(flower_names: list[str]) -> Miniature:
    colour = _Colours()
    members, labels, setid = {}, [], {"trnid": [], "valid": [], "tstid": []}
    splits = {"train": [], "val": [], "test": []}
    for image_id, (label, key) in enumerate(
        itertools.product((0, 1, 2), ("trnid", "valid", "tstid", "tstid")), start=1
    ):
        c = colour()
        members[f"jpg/image_{image_id:05d}.jpg"] = jpeg(c)
        labels.append(label + 1)
        setid[key].append(image_id)
        splits[{"trnid": "train", "valid": "val", "tstid": "test"}[key]].append(Expected(label, c))
    return Miniature(
        "flowers102",
        {
            "102flowers.tgz": tar_bytes(members, "gz"),
            "imagelabels.mat": mat_bytes({"labels": np.array([labels], dtype=np.uint8)}),
            "setid.mat": mat_bytes({k: np.array([v], dtype=np.uint16) for k, v in setid.items()}),
        },
        list(flower_names),
        splits,
    )


AIRCRAFT_BODY = (24, 16)
AIRCRAFT_BANNER = 20
AIRCRAFT_FAMILY = {"707-320": "Boeing 707", "737-200": "Boeing 737", "737-300": "Boeing 737", "A300B4": "A300"}
AIRCRAFT_MANUFACTURER = {"Boeing 707": "Boeing", "Boeing 737": "Boeing", "A300": "Airbus"}
AIRCRAFT_SPECS = {
    "fgvc_aircraft": ("variant", False),
    "fgvc_aircraft_cropped": ("variant", True),
    "fgvc_aircraft_family": ("family", False),
    "fgvc_aircraft_manufacturer": ("manufacturer", False),
}
"""Registered name -> (annotation level, banner cropped)."""


def fgvc_aircraft(name: str = "fgvc_aircraft") -> Miniature:
    """The 2013b layout: three-level class lists (families and manufacturers not in variant order, so
    labels must come from each level's own list), per-level split lists, a banner under every photo."""
    level, cropped = AIRCRAFT_SPECS[name]
    colour = _Colours()
    variants = list(AIRCRAFT_FAMILY)
    families = ["A300", "Boeing 707", "Boeing 737"]
    manufacturers = ["Airbus", "Boeing"]
    root = "fgvc-aircraft-2013b/data"
    members = {
        f"{root}/variants.txt": text(variants),
        f"{root}/families.txt": text(families),
        f"{root}/manufacturers.txt": text(manufacturers),
    }
    name_of = {
        "variant": lambda v: v,
        "family": lambda v: AIRCRAFT_FAMILY[v],
        "manufacturer": lambda v: AIRCRAFT_MANUFACTURER[AIRCRAFT_FAMILY[v]],
    }
    classes = {"variant": variants, "family": families, "manufacturer": manufacturers}
    lists: dict[str, dict[str, list[str]]] = {lv: {"train": [], "val": [], "test": []} for lv in name_of}
    boxes: list[str] = []
    splits: dict[str, list[Expected]] = {"train": [], "val": [], "test": []}
    width, height = AIRCRAFT_BODY
    size = AIRCRAFT_BODY if cropped else (width, height + AIRCRAFT_BANNER)
    image_id = 1025794
    for variant in variants:
        for split in ("train", "val", "test", "train"):
            image_id += 1
            c = colour()
            members[f"{root}/images/{image_id:07d}.jpg"] = jpeg(c, AIRCRAFT_BODY, banner=AIRCRAFT_BANNER)
            for lv, lv_name in name_of.items():
                lists[lv][split].append(f"{image_id:07d} {lv_name(variant)}")
            boxes.append(f"{image_id:07d} 2 3 20 12")
            label = classes[level].index(name_of[level](variant))
            splits[split].append(Expected(label, c, size, body_rows=height))
    for lv, per_split in lists.items():
        for split, lines in per_split.items():
            members[f"{root}/images_{lv}_{split}.txt"] = text(lines)
        members[f"{root}/images_{lv}_trainval.txt"] = text(per_split["train"] + per_split["val"])
    members[f"{root}/images_box.txt"] = text(boxes)
    return Miniature(name, {"fgvc-aircraft-2013b.tar.gz": tar_bytes(members, "gz")}, classes[level], splits)


def oxford_pets() -> Miniature:
    colour = _Colours()
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("american_pit_bull_terrier", 2)]
    images, lists, splits = {}, {"trainval": [], "test": []}, {"train": [], "test": []}
    for label, (breed, species) in enumerate(breeds):
        for n, split in enumerate(("trainval", "test", "trainval"), start=1):
            c = colour()
            images[f"images/{breed}_{n}.jpg"] = jpeg(c)
            lists[split].append(f"{breed}_{n} {label + 1} {species} {label + 1}")
            splits["train" if split == "trainval" else "test"].append(Expected(label, c))
    annotations = {
        "annotations/trainval.txt": text(lists["trainval"]),
        "annotations/test.txt": text(lists["test"]),
        "annotations/list.txt": text(["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids"]
                                     + lists["trainval"] + lists["test"]),
    }
    return Miniature(
        "oxford_pets",
        {"images.tar.gz": tar_bytes(images, "gz"), "annotations.tar.gz": tar_bytes(annotations, "gz")},
        [b for b, _ in breeds],
        splits,
    )


def food101() -> Miniature:
    colour = _Colours()
    ids, names = ["apple_pie", "baby_back_ribs", "baklava"], ["Apple pie", "Baby back ribs", "Baklava"]
    members, lists, splits = {}, {"train": [], "test": []}, {"train": [], "test": []}
    for label, class_id in enumerate(ids):
        for n, split in enumerate(("train", "train", "test")):
            c = colour()
            image = f"{class_id}/{1005649 + 10 * label + n}"
            members[f"food-101/images/{image}.jpg"] = jpeg(c)
            lists[split].append(image)
            splits[split].append(Expected(label, c))
    members["food-101/meta/classes.txt"] = text(ids)
    members["food-101/meta/labels.txt"] = text(names)
    for split, lines in lists.items():
        members[f"food-101/meta/{split}.txt"] = text(lines)
    return Miniature("food101", {"food-101.tar.gz": tar_bytes(members, "gz")}, names, splits)


# ---- iNaturalist (visipedia/inat_comp) ---------------------------------------------------------

INAT_TAXA = [
    # (category id, supercategory, kingdom, phylum, class, order, family, genus, species name)
    # "Morus" is a genus of gannets and of mulberries: one name, two taxa at the genus level.
    (3, "Plantae", "Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Ficus", "Ficus carica"),
    (0, "Aves", "Animalia", "Chordata", "Aves", "Passeriformes", "Paridae", "Poecile", "Poecile atricapillus"),
    (2, "Plantae", "Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus", "Morus alba"),
    (1, "Aves", "Animalia", "Chordata", "Aves", "Suliformes", "Sulidae", "Morus", "Morus bassanus"),
]
"""Listed out of id order: labels must follow the category ids, not the order of the file."""

INAT_CLASSES = {
    None: ["Poecile atricapillus", "Morus bassanus", "Morus alba", "Ficus carica"],
    "kingdom": ["Animalia", "Plantae"],
    "genus": ["Poecile", "Morus (Animalia/Chordata/Aves/Suliformes/Sulidae)", "Ficus",
              "Morus (Plantae/Tracheophyta/Magnoliopsida/Rosales/Moraceae)"],
}
"""Class names per level, written out by hand: species in category-id order, a level's taxa sorted by
their path from the kingdom down, a name shared by two taxa qualified by its path."""

INAT_LABEL = {
    None: {0: 0, 1: 1, 2: 2, 3: 3},
    "kingdom": {0: 0, 1: 0, 2: 1, 3: 1},
    "genus": {0: 0, 1: 1, 3: 2, 2: 3},
}
"""Category id -> expected label at each level."""

_INAT_LEVELS = ("kingdom", "phylum", "class", "order", "family", "genus")


def _inat_category(row: tuple, year: str, obfuscated: bool = False) -> dict:
    category_id, supercategory, *levels, species = row
    entry: dict = {"id": category_id, "name": species, "supercategory": supercategory}
    if year != "2017":
        entry.update(zip(_INAT_LEVELS, levels))
    if year.startswith("2021"):
        entry["specific_epithet"] = species.split()[1]
        entry["common_name"] = species
        entry["image_dir_name"] = f"{category_id:05d}_" + "_".join([*levels, species.split()[1]])
    if obfuscated:  # 2018's competition files hide every name; categories.json gives them back
        entry = {k: (v if k in ("id", "supercategory") else f"{k}{category_id}x") for k, v in entry.items()}
    return entry


def _inat_path(year: str, root: str, row: tuple, stem: str) -> str:
    category_id, supercategory, *_, species = row
    if year == "2017":
        return f"{root}/{supercategory}/{species}/{stem}.jpg"
    if year == "2018":
        return f"{root}/{supercategory}/{category_id}/{stem}.jpg"
    return f"{root}/{_inat_category(row, year)['image_dir_name']}/{stem}.jpg"


INAT_FILES = {
    "2017": {"images": {"train_val_images": "train_val_images.tar.gz"},
             "annotations": {"train": "train2017.json", "test": "val2017.json"}},
    "2018": {"images": {"train_val2018": "train_val2018.tar.gz"},
             "annotations": {"train": "train2018.json", "test": "val2018.json"}},
    "2021": {"images": {"train": "train.tar.gz", "val": "val.tar.gz"},
             "annotations": {"train": "train.json", "test": "val.json"}},
    "2021_mini": {"images": {"train_mini": "train_mini.tar.gz", "val": "val.tar.gz"},
                  "annotations": {"train": "train_mini.json", "test": "val.json"}},
}


def inat(year: str = "2021", level: str | None = None) -> Miniature:
    """A year's layout: image archives by root folder, COCO-style JSONs (2017 zipped together, later years
    one .json.tar.gz each), 2018's obfuscated names with the released categories.json beside them.
    ``extra`` keeps the JSON documents and archive members, for tests that damage them."""
    colour = _Colours()
    files_of = INAT_FILES[year]
    roots = list(files_of["images"])
    train_root, test_root = roots[0], roots[-1]
    images: dict[str, dict[str, bytes]] = {root: {} for root in roots}
    coco = {split: {"info": {"year": int(year[:4])}, "licenses": [], "images": [], "annotations": [],
                    "categories": [_inat_category(r, year, obfuscated=year == "2018") for r in INAT_TAXA]}
            for split in ("train", "test")}
    splits: dict[str, list[Expected]] = {"train": [], "test": []}
    group_of_colour = {}
    image_id = 100
    for row in INAT_TAXA:
        for split in ("train", "test", "train"):
            image_id += 1
            c = colour()
            root = train_root if split == "train" else test_root
            path = _inat_path(year, root, row, f"{image_id:04x}aa")
            images[root][path] = jpeg(c)
            coco[split]["images"].append({"id": image_id, "file_name": path, "width": 24, "height": 16, "license": 1})
            coco[split]["annotations"].append({"id": 5000 + image_id, "image_id": image_id, "category_id": row[0]})
            splits[split].append(Expected(INAT_LABEL[level][row[0]], c))
            group_of_colour[c] = row[1]
    documents = {files_of["annotations"][split]: json_bytes(data) for split, data in coco.items()}
    files = {name: tar_bytes(images[root], "gz") for root, name in files_of["images"].items()}
    if year == "2017":
        files["train_val2017.zip"] = zip_bytes(documents)
    else:
        for name, data in documents.items():
            files[f"{name}.tar.gz"] = tar_bytes({name: data}, "gz")
    if year == "2018":
        released = [_inat_category(r, year) for r in INAT_TAXA]
        files["categories.json.tar.gz"] = tar_bytes({"categories.json": json_bytes(released)}, "gz")
    name = f"inat{year}" + (f"_{level}" if level else "")
    extra = {"group_of_colour": group_of_colour, "groups": ["Aves", "Plantae"], "coco": coco,
             "images": images, "files_of": files_of}
    return Miniature(name, files, INAT_CLASSES[level], splits, extra=extra)


def json_bytes(data) -> bytes:
    import json

    return json.dumps(data).encode()


# ---- WebFG-496 and Ultra-FGVC ------------------------------------------------------------------

WEBFG_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "010.Red_winged_Blackbird"]


def webfg(name: str = "web_bird") -> Miniature:
    """``web-<x>/train/<class>/`` (web images) and ``web-<x>/val/<class>/`` (the clean test set), with the
    odd files a web crawl leaves: upper-case and PNG extensions count, a text file does not."""
    root = name.replace("_", "-")
    colour = _Colours()
    members, splits = {}, {"train": [], "test": []}
    for label, folder in enumerate(WEBFG_CLASSES):
        for split, count in (("train", 3), ("val", 1)):
            for n in range(count):
                c = colour()
                suffix = (".jpg", ".JPEG", ".png")[n]
                data = jpeg(c) if suffix != ".png" else _png(c)
                members[f"{root}/{split}/{folder}/{split}_{n}{suffix}"] = data
                splits["train" if split == "train" else "test"].append(Expected(label, c))
        members[f"{root}/train/{folder}/urls.txt"] = b"https://example.org/1.jpg\n"
    return Miniature(name, {f"{root}.tar.gz": tar_bytes(members, "gz")}, list(WEBFG_CLASSES), splits)


def _png(colour: Colour, size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


ULTRA_FOLDERS = {"cotton80": ("COTTON", "Cotton80.zip"), "soyageing_r3": ("SoyAgeing/SoyAgeing-R3/R3", "SoyAgeing.zip")}
"""Set -> (folder inside its archive, archive name). Cotton80.zip holds COTTON/ itself (as re-hosted, with a
val list); the SoyAgeing one is the whole path, as the loaders' root table spells it."""


def ultra_fgvc(name: str = "cotton80", classes: int = 80) -> Miniature:
    """``images/`` plus ``anno/{train,test}.txt`` (``<file> <1-based class id>``; Cotton80 also ``val.txt``) under
    the set's folder; only three of the classes have images, as a subset of the ids (labels must come from the
    ids, not the rows)."""
    colour = _Colours()
    root, archive = ULTRA_FOLDERS[name]
    order = ("train", "test", "val", "train") if name == "cotton80" else ("train", "test", "train")
    lists: dict[str, list[str]] = {split: [] for split in order}
    splits: dict[str, list[Expected]] = {split: [] for split in order}
    members = {}
    for number, (class_id, split) in enumerate(itertools.product((classes, 1, 7), order), 1):
        c = colour()
        fname = f"{class_id}_{number}.jpg"
        members[f"{root}/images/{fname}"] = jpeg(c)
        lists[split].append(f"{fname} {class_id}")
        splits[split].append(Expected(class_id - 1, c))
    for split, lines in lists.items():
        members[f"{root}/anno/{split}.txt"] = text(lines)
    return Miniature(name, {archive: zip_bytes(members)}, [str(i) for i in range(1, classes + 1)], splits,
                     extra={"root": root})
