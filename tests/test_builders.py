"""Every fine-grained builder, end to end: miniature archives in the official layout go through the
real prepare (download from a local HTTP server or ``--from``, checksum, extraction, parse,
store), then the store is read back and each image is identified by its pixels."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import archives
import datasets
import numpy as np
import pytest

from finebench.data import registry
from finebench.data.builders.vgg import FLOWER_NAMES
from finebench.data.prepare import prepare_dataset
from finebench.errors import FinebenchError

TOLERANCE = 12
"""Largest per-channel difference accepted between a stored pixel and its source colour (JPEG)."""


def _with_miniature_checksums(mini: archives.Miniature):
    """The registered spec with digests of the miniature files (the real URLs/parse stay)."""
    spec = registry.get_spec(mini.name)
    sources = tuple(replace(s, md5=mini.md5(s.filename), sha256=None) for s in spec.sources)
    return registry.override(replace(spec, sources=sources))


def prepare_via_server(mini: archives.Miniature, server, data_root: Path) -> Path:
    for filename, data in mini.files.items():
        server.add(filename, data)
    with _with_miniature_checksums(mini):
        return prepare_dataset(mini.name, data_root, mirror=server.url, quiet=True)


def write_files(mini: archives.Miniature, folder: Path, skip: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for filename, data in mini.files.items():
        if filename != skip:
            (folder / filename).write_bytes(data)
    return folder


def _identify(image, palette: dict[tuple[int, int, int], archives.Expected]) -> archives.Expected:
    """The expected example whose colour every sampled pixel of ``image`` shows."""
    pixels = np.asarray(image.convert("RGB"), dtype=int)
    height, width, _ = pixels.shape
    for colour, expected in palette.items():
        rows = min(expected.body_rows or height, height)
        samples = [pixels[y, x] for y in (1, rows // 2, rows - 1) for x in (1, width // 2, width - 1)]
        if all(np.abs(sample - colour).max() <= TOLERANCE for sample in samples):
            return expected
    raise AssertionError(f"stored image with pixels {pixels[height // 2, width // 2]} matches no source image")


def read_split(store: Path, split: str, palette: dict) -> list[archives.Expected]:
    """Check every stored example against the source image its pixels identify; return those."""
    dataset = datasets.load_from_disk(str(store / split))
    found = []
    for row in dataset:
        expected = _identify(row["image"], palette)
        assert row["label"] == expected.label, f"{split}: colour {expected.colour} stored with wrong label"
        if expected.size is not None:
            assert row["image"].size == expected.size
        found.append(expected)
    return found


def check_store(store: Path, mini: archives.Miniature) -> dict:
    meta = json.loads((store / "meta.json").read_text())
    assert meta["classes"] == mini.classes
    assert meta["splits"] == {split: len(examples) for split, examples in mini.splits.items()}
    for split, examples in mini.splits.items():
        palette = {e.colour: e for e in examples}
        found = read_split(store, split, palette)
        assert sorted(e.colour for e in found) == sorted(palette), f"{split}: images missing or repeated"
        assert datasets.load_from_disk(str(store / split)).features["label"].names == mini.classes
    return meta


DOWNLOADABLE = {
    "stanford_dogs": archives.stanford_dogs,
    "cub200": archives.cub200,
    "stanford_cars": archives.stanford_cars,
    "flowers102": lambda: archives.flowers102(FLOWER_NAMES),
    **{name: functools.partial(archives.fgvc_aircraft, name) for name in archives.AIRCRAFT_SPECS},
    "oxford_pets": archives.oxford_pets,
    "food101": archives.food101,
}


@pytest.mark.parametrize("name", sorted(DOWNLOADABLE))
def test_prepare_from_mirror_stores_official_splits_labels_and_pixels(name, local_http_server, tmp_path):
    mini = DOWNLOADABLE[name]()
    store = prepare_via_server(mini, local_http_server, tmp_path / "data")
    meta = check_store(store, mini)
    assert set(meta["sources"]) == set(mini.files)
    assert all(meta["sources"][f]["md5"] == mini.md5(f) for f in mini.files)


def test_fgvc_aircraft_keeps_the_banner_by_default_and_fgvc_aircraft_cropped_drops_it(local_http_server, tmp_path):
    """The default is what the peers' official loaders (WS-DAN, CAL) and torchvision feed the network."""
    width, height = archives.AIRCRAFT_BODY
    banner = archives.AIRCRAFT_BANNER
    for name, size, banner_rows in (("fgvc_aircraft", (width, height + banner), banner),
                                    ("fgvc_aircraft_cropped", archives.AIRCRAFT_BODY, 0)):
        store = prepare_via_server(archives.fgvc_aircraft(name), local_http_server, tmp_path / name)
        pixels = np.asarray(datasets.load_from_disk(str(store / "test"))[0]["image"].convert("RGB"), dtype=int)
        assert (pixels.shape[1], pixels.shape[0]) == size
        assert pixels[height:].size == 0 or pixels[height:].max() < 10, "the black banner rows are not the bottom rows"
        assert pixels[:height].min() > 10 and len(pixels) - height == banner_rows
        meta = json.loads((store / "meta.json").read_text())
        assert meta["info"]["banner"] == ("kept" if banner_rows else f"cropped ({archives.AIRCRAFT_BANNER} px)")


def _aircraft_extracted(tmp_path: Path) -> Path:
    """The miniature archive unpacked by hand: a folder ``prepare --from`` parses in place."""
    from finebench.data.download import extract_archive

    mini = archives.fgvc_aircraft()
    archive = tmp_path / "fgvc-aircraft-2013b.tar.gz"
    archive.write_bytes(mini.files[archive.name])
    extract_archive(archive, tmp_path / "extracted")
    return tmp_path / "extracted"


def test_fgvc_aircraft_damaged_archive_stores_nothing(local_http_server, tmp_path):
    mini = archives.fgvc_aircraft()
    data = mini.files["fgvc-aircraft-2013b.tar.gz"]
    local_http_server.add("fgvc-aircraft-2013b.tar.gz", data[: len(data) // 2])
    with _with_miniature_checksums(mini), pytest.raises(FinebenchError, match=r"checksum mismatch.*fgvc-aircraft-2013b"):
        prepare_dataset("fgvc_aircraft", tmp_path / "data", mirror=local_http_server.url, quiet=True)
    assert not (tmp_path / "data" / "fgvc_aircraft").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: (data / "images_variant_trainval.txt").write_text("1025795 707-320\n"),
         r"images_variant_trainval\.txt: its 1 lines are not the train and val lists together"),
        (lambda data: (data / "images" / "1025797.jpg").unlink(), r"missing .*images/1025797\.jpg"),
        (lambda data: (data / "images_variant_val.txt").write_text("1025796 707-321\n"),
         r"images_variant_val\.txt: variant '707-321' of image 1025796 is not in variants\.txt"),
    ],
    ids=["trainval-disagrees", "image-missing", "unknown-variant"],
)
def test_fgvc_aircraft_damaged_layout_is_named(damage, message, tmp_path):
    extracted = _aircraft_extracted(tmp_path)
    damage(extracted / "fgvc-aircraft-2013b" / "data")
    with pytest.raises(FinebenchError, match=message):
        prepare_dataset("fgvc_aircraft", tmp_path / "data", from_path=extracted, quiet=True)
    assert not (tmp_path / "data" / "fgvc_aircraft").exists()


@pytest.mark.parametrize("name", sorted(archives.AIRCRAFT_SPECS))
def test_fgvc_aircraft_labels_and_images_agree_with_torchvision(name, local_http_server, tmp_path):
    """torchvision's FGVCAircraft reads the same miniature at the same annotation level: the same classes,
    every image the same label in train, val and test, trainval = our train + val, and (banner kept)
    the same pixels."""
    import torchvision.datasets as tv

    mini = archives.fgvc_aircraft(name)
    level, cropped = archives.AIRCRAFT_SPECS[name]
    store = prepare_via_server(mini, local_http_server, tmp_path / "data")
    reference_root = _aircraft_extracted(tmp_path)
    palette = {e.colour: e for examples in mini.splits.values() for e in examples}
    ours: dict[str, dict] = {}
    for split in ("train", "val", "test"):
        rows = datasets.load_from_disk(str(store / split))
        ours[split] = {_identify(row["image"], palette).colour: (row["label"], row["image"].size) for row in rows}
    ours["trainval"] = {**ours["train"], **ours["val"]}
    for split, found in ours.items():
        reference = tv.FGVCAircraft(str(reference_root), split=split, annotation_level=level)
        assert json.loads((store / "meta.json").read_text())["classes"] == reference.classes
        theirs = {}
        for index in range(len(reference)):
            image, label = reference[index]
            theirs[_identify(image, palette).colour] = (label, image.size)
        assert {c: label for c, (label, _) in found.items()} == {c: label for c, (label, _) in theirs.items()}
        for colour, (_, (width, height)) in theirs.items():
            assert found[colour][1] == ((width, height - archives.AIRCRAFT_BANNER) if cropped else (width, height))
    assert len(ours["trainval"]) == len(ours["train"]) + len(ours["val"])


def test_uec_food100_crops_boxes_into_seeded_photo_folds(local_http_server, tmp_path):
    mini = archives.uec_food100()
    store = prepare_via_server(mini, local_http_server, tmp_path / "data")
    meta = json.loads((store / "meta.json").read_text())
    assert meta["classes"] == mini.classes
    folds = [f"fold{k}" for k in range(5)]
    assert list(meta["splits"]) == folds
    palette = {e.colour: e for e in mini.splits["all"]}
    fold_of_photo: dict[int, set[str]] = {}
    found = []
    for fold in folds:
        for expected in read_split(store, fold, palette):
            found.append(expected)
            fold_of_photo.setdefault(mini.extra["photo_of_colour"][expected.colour], set()).add(fold)
    # Both foods of the two-food photo are kept, each with its own label, in one shared fold.
    assert sorted(e.colour for e in found) == sorted(palette)
    assert all(len(f) == 1 for f in fold_of_photo.values())
    assert meta["info"]["fold_seed"] == 0 and meta["info"]["multi_food_photos"] == 1
    assert meta["info"]["photos"] == mini.extra["photos"]


def test_uec_food100_folds_are_reproducible(local_http_server, tmp_path):
    mini = archives.uec_food100()
    first = prepare_via_server(mini, local_http_server, tmp_path / "a")
    with _with_miniature_checksums(mini):
        second = prepare_dataset(mini.name, tmp_path / "b", mirror=local_http_server.url, quiet=True)
    for fold in range(5):
        a = datasets.load_from_disk(str(first / f"fold{fold}"))["label"]
        b = datasets.load_from_disk(str(second / f"fold{fold}"))["label"]
        assert a == b


MANUAL = {"adience": archives.adience, "imagenet": archives.imagenet, "nabirds": archives.nabirds}


@pytest.mark.parametrize("name", sorted(MANUAL))
def test_manual_dataset_prepares_from_folder(name, tmp_path):
    mini = MANUAL[name]()
    folder = write_files(mini, tmp_path / "downloads")
    with _with_miniature_checksums(mini):
        store = prepare_dataset(name, tmp_path / "data", from_path=folder, quiet=True)
    meta = check_store(store, mini)
    assert meta["origin"]["kind"] == "from"


def test_stanford_cars_prepares_from_a_folder_since_its_urls_are_dead(tmp_path):
    mini = archives.stanford_cars()
    folder = write_files(mini, tmp_path / "cars")
    with _with_miniature_checksums(mini):
        store = prepare_dataset("stanford_cars", tmp_path / "data", from_path=folder, quiet=True)
    check_store(store, mini)


@pytest.mark.parametrize(
    ("name", "missing"),
    [("adience", "fold_3_data.txt"), ("imagenet", "ILSVRC2012_img_val.tar"), ("nabirds", "nabirds.tar.gz")],
)
def test_manual_dataset_names_the_missing_file(name, missing, tmp_path):
    mini = MANUAL[name]()
    folder = write_files(mini, tmp_path / "downloads", skip=missing)
    with _with_miniature_checksums(mini), pytest.raises(FinebenchError, match=missing.replace(".", r"\.")):
        prepare_dataset(name, tmp_path / "data", from_path=folder, quiet=True)
    assert not (tmp_path / "data" / name).exists()


@pytest.mark.parametrize("name", sorted(MANUAL))
def test_manual_dataset_without_from_explains_where_to_get_it(name, tmp_path):
    spec = registry.get_spec(name)
    with pytest.raises(FinebenchError) as error:
        prepare_dataset(name, tmp_path / "data", quiet=True)
    for source in spec.sources:
        assert source.filename in str(error.value)


def test_extracted_layout_with_a_listed_image_missing_names_that_image(tmp_path):
    mini = archives.cub200()
    raw = tmp_path / "extracted"
    raw.mkdir()
    (tmp_path / "CUB_200_2011.tgz").write_bytes(mini.files["CUB_200_2011.tgz"])
    from finebench.data.download import extract_archive

    extract_archive(tmp_path / "CUB_200_2011.tgz", raw)
    victim = next((raw / "CUB_200_2011" / "images").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(FinebenchError, match=victim.name):
        prepare_dataset("cub200", tmp_path / "data", from_path=raw, quiet=True)


def test_specs_state_sources_protocol_and_terms():
    names = ["stanford_dogs", "cub200", "stanford_cars", "uec_food100", "adience", "imagenet",
             "flowers102", *archives.AIRCRAFT_SPECS, "oxford_pets", "food101", "nabirds"]
    for name in names:
        spec = registry.get_spec(name)
        assert spec.sources and spec.protocol and spec.terms and spec.homepage
        if spec.manual:
            assert all(s.url is None for s in spec.sources)
            assert all(s.filename in spec.manual_instructions for s in spec.sources if s.extract)
        else:
            assert all(s.url for s in spec.sources)
    expected_classes = {"stanford_dogs": 120, "cub200": 200, "stanford_cars": 196, "uec_food100": 100,
                        "adience": 2, "imagenet": 1000, "flowers102": 102, "fgvc_aircraft": 100,
                        "fgvc_aircraft_cropped": 100, "fgvc_aircraft_family": 70, "fgvc_aircraft_manufacturer": 30,
                        "oxford_pets": 37, "food101": 101, "nabirds": 555}
    assert {name: registry.get_spec(name).num_classes for name in names} == expected_classes
    assert len(FLOWER_NAMES) == 102 == len(set(FLOWER_NAMES))


def test_imagenet_reads_an_already_extracted_train_folder(tmp_path):
    """``--from`` a copy whose per-class tars were already unpacked to train/<wnid>/."""
    mini = archives.imagenet()
    raw = tmp_path / "imagenet"
    raw.mkdir()
    from finebench.data.download import extract_archive

    for filename, data in mini.files.items():
        (tmp_path / filename).write_bytes(data)
        extract_archive(tmp_path / filename, raw / "val" if "val" in filename else raw)
    for inner in raw.glob("n*.tar"):
        extract_archive(inner, raw / "train" / inner.stem)
        inner.unlink()
    store = prepare_dataset("imagenet", tmp_path / "data", from_path=raw, quiet=True)
    check_store(store, mini)


def test_published_checksums_agree_with_torchvision():
    import torchvision.datasets as tv
    from torchvision.datasets import imagenet as tv_imagenet

    def md5(name: str, filename: str) -> str | None:
        return next(s.md5 for s in registry.get_spec(name).sources if s.filename == filename)

    for filename, digest in tv.Flowers102._file_dict.values():
        assert md5("flowers102", filename) == digest
    for url, digest in tv.OxfordIIITPet._RESOURCES:
        assert md5("oxford_pets", url.rsplit("/", 1)[1]) == digest
    assert md5("food101", "food-101.tar.gz") == tv.Food101._MD5
    for filename, digest in tv_imagenet.ARCHIVE_META.values():
        assert md5("imagenet", filename) == digest
    assert next(s.url for s in registry.get_spec("fgvc_aircraft").sources) == tv.FGVCAircraft._URL


def _finebench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finebench", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_prepares_adience_from_a_folder(tmp_path):
    """The real spec (no published digests for Adience), through the command line."""
    mini = archives.adience()
    folder = write_files(mini, tmp_path / "downloads")
    result = _finebench("prepare", "adience", "--from", str(folder), "--data-root", str(tmp_path / "data"), "--quiet")
    assert result.returncode == 0, result.stderr
    check_store(tmp_path / "data" / "adience", mini)


def test_cli_names_the_missing_adience_file_in_one_line(tmp_path):
    mini = archives.adience()
    folder = write_files(mini, tmp_path / "downloads", skip="fold_3_data.txt")
    result = _finebench("prepare", "adience", "--from", str(folder), "--data-root", str(tmp_path / "data"))
    assert result.returncode == 2
    assert "fold_3_data.txt" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _extract_into(mini: archives.Miniature, archive: str, folder: Path) -> None:
    from finebench.data.download import extract_archive

    (folder.parent / archive).write_bytes(mini.files[archive])
    extract_archive(folder.parent / archive, folder)


def test_flowers102_extracted_layout_with_its_mat_files_is_verified_and_prepared(tmp_path):
    """An extracted 102flowers.tgz (jpg/) next to the plain imagelabels.mat and setid.mat, as unpacked by hand."""
    mini = DOWNLOADABLE["flowers102"]()
    folder = write_files(mini, tmp_path / "flowers", skip="102flowers.tgz")
    _extract_into(mini, "102flowers.tgz", folder)
    with _with_miniature_checksums(mini):
        store = prepare_dataset("flowers102", tmp_path / "data", from_path=folder, quiet=True)
    meta = check_store(store, mini)
    assert meta["origin"]["taken_as_extracted"] == ["102flowers.tgz"]
    assert {name: meta["sources"][name]["md5"] for name in meta["sources"]} == {
        name: mini.md5(name) for name in ("imagelabels.mat", "setid.mat")
    }


def test_flowers102_extracted_layout_without_setid_names_it_and_its_url(tmp_path):
    mini = DOWNLOADABLE["flowers102"]()
    folder = write_files(mini, tmp_path / "flowers", skip="102flowers.tgz")
    (folder / "setid.mat").unlink()
    _extract_into(mini, "102flowers.tgz", folder)
    with _with_miniature_checksums(mini), pytest.raises(
        FinebenchError, match=r"missing setid\.mat for dataset 'flowers102' \(get it from https://www\.robots\.ox\.ac\.uk/.*setid\.mat\)"
    ):
        prepare_dataset("flowers102", tmp_path / "data", from_path=folder, quiet=True)


def test_stanford_cars_mixes_archives_with_an_already_extracted_test_folder(tmp_path):
    mini = archives.stanford_cars()
    folder = write_files(mini, tmp_path / "cars", skip="cars_test.tgz")
    _extract_into(mini, "cars_test.tgz", folder)
    with _with_miniature_checksums(mini):
        store = prepare_dataset("stanford_cars", tmp_path / "data", from_path=folder, quiet=True)
    meta = check_store(store, mini)
    assert meta["origin"]["taken_as_extracted"] == ["cars_test.tgz"]
    assert folder.joinpath("cars_test").is_dir()  # the user's folder is read, never moved or deleted


def test_adience_extracted_faces_with_fold_files_are_prepared(tmp_path):
    mini = archives.adience()
    folder = write_files(mini, tmp_path / "adience", skip="aligned.tar.gz")
    _extract_into(mini, "aligned.tar.gz", folder)
    store = prepare_dataset("adience", tmp_path / "data", from_path=folder, quiet=True)
    check_store(store, mini)


def test_missing_extracted_part_names_the_archive_it_comes_from(tmp_path):
    mini = archives.stanford_cars()
    folder = write_files(mini, tmp_path / "cars", skip="cars_test.tgz")
    with _with_miniature_checksums(mini), pytest.raises(FinebenchError, match=r"missing .*cars_test .*cars_test\.tgz from"):
        prepare_dataset("stanford_cars", tmp_path / "data", from_path=folder, quiet=True)


def test_every_hub_copy_maps_exactly_the_official_splits():
    """Hub copies name splits their own way; only the mapped ones may be stored."""
    with_hub = [spec for spec in registry.all_specs() if spec.hub_id]
    assert {spec.name for spec in with_hub} >= {"food101", "stanford_cars", "cifar10", "cifar100"}
    for spec in with_hub:
        assert set(spec.hub_splits) == set(spec.split_sizes), spec.name
    assert registry.get_spec("food101").hub_splits == {"train": "train", "test": "validation"}
    assert registry.get_spec("stanford_cars").hub_splits == {"train": "train", "test": "test"}


def test_imagenet_labels_and_names_agree_with_torchvision_s_own_parser(tmp_path, monkeypatch):
    """torchvision's ImageNet (what timm and pretrained heads follow) reads the same miniature archives:
    every image gets the same label here and there, in sorted-wnid order, not the devkit's ILSVRC2012_ID order."""
    import torchvision.datasets as tv
    from PIL import Image
    from torchvision.datasets import imagenet as tv_imagenet

    mini = archives.imagenet()
    with _with_miniature_checksums(mini):
        store = prepare_dataset("imagenet", tmp_path / "data", from_path=write_files(mini, tmp_path / "ours"), quiet=True)
    for key, (filename, _) in list(tv_imagenet.ARCHIVE_META.items()):  # torchvision checks the real archives' md5
        monkeypatch.setitem(tv_imagenet.ARCHIVE_META, key, (filename, mini.md5(filename)))
    tv_root = write_files(mini, tmp_path / "torchvision")
    for split, tv_split in (("train", "train"), ("test", "val")):
        reference = tv.ImageNet(str(tv_root), split=tv_split)
        palette = {e.colour: e for e in mini.splits[split]}
        theirs = {_identify(Image.open(path), palette).colour: label for path, label in reference.samples}
        ours = {e.colour: e.label for e in read_split(store, split, palette)}
        assert ours == theirs and len(ours) == len(palette)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["info"]["wnids"] == reference.wnids
    names = [name.removesuffix(f" ({wnid})") for name, wnid in zip(meta["classes"], reference.wnids)]
    assert names == [", ".join(words) for words in reference.classes]


def test_flowers102_class_names_are_torchvision_s(local_http_server, tmp_path):
    import torchvision.datasets as tv

    store = prepare_via_server(archives.flowers102(FLOWER_NAMES), local_http_server, tmp_path / "data")
    assert json.loads((store / "meta.json").read_text())["classes"] == tv.Flowers102.classes


def test_peers_fgvc_aircraft_recipe_trains_on_trainval_and_tests_on_test(local_http_server, tmp_path):
    """The recipe's train_split "train+val" is the benchmark's trainval on a prepared store."""
    from finebench.data.loader import build_loaders
    from finebench.recipe import load_recipe

    dataset = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "peers_fgvc_aircraft.toml").recipe.dataset
    mini = archives.fgvc_aircraft(dataset.name)
    prepare_via_server(mini, local_http_server, tmp_path / "data")
    loaders = build_loaders(dataset.name, tmp_path / "data", batch_size=2, input_size=16,
                            augmentation=dataset.augmentation, train_split=dataset.train_split,
                            test_split=dataset.test_split, decode="workers")
    train_labels = sorted(int(y) for _, labels in loaders.train for y in labels)
    test_labels = sorted(int(y) for _, labels in loaders.test for y in labels)
    assert train_labels == sorted(e.label for split in ("train", "val") for e in mini.splits[split])
    assert test_labels == sorted(e.label for e in mini.splits["test"])


def test_a_store_prepared_under_the_old_banner_rule_is_refused_with_the_rebuild_command(local_http_server, tmp_path):
    """fgvc_aircraft once cropped the banner; a store prepared then (its meta has no 'banner') must
    not be trained on as if it held the images as distributed."""
    from finebench.data.loader import build_loaders
    from finebench.errors import FinebenchError

    store = prepare_via_server(archives.fgvc_aircraft(), local_http_server, tmp_path / "data")
    meta = json.loads((store / "meta.json").read_text())
    del meta["info"]["banner"]
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FinebenchError, match=rf"info 'banner' is missing, expected 'kept'.*finebench prepare "
                                             rf"fgvc_aircraft --data-root {tmp_path / 'data'} --force"):
        build_loaders("fgvc_aircraft", tmp_path / "data", batch_size=2, input_size=16, decode="workers")
