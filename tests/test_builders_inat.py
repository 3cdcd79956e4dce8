"""iNaturalist 2017/2018/2021: miniature archives in each year's official layout go through the real prepare
(local HTTP mirror or ``--from``), and every way the annotation files and the archive can disagree stops it
with the file and the entry."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import archives
import datasets
import pytest
from test_builders import check_store, prepare_via_server, write_files

from finebench.data import registry
from finebench.data.builders import inat
from finebench.data.download import extract_archive
from finebench.data.prepare import dataset_overview, prepare_dataset
from finebench.errors import FinebenchError

YEARS = ("2017", "2018", "2021", "2021_mini")


def _with_miniature_checksums(mini: archives.Miniature):
    """The registered spec with the miniature files' digests (its URLs and parser stay)."""
    spec = registry.get_spec(mini.name)
    sources = tuple(replace(s, md5=mini.md5(s.filename), sha256=None) for s in spec.sources)
    return registry.override(replace(spec, sources=sources))


def _check_groups(store: Path, mini: archives.Miniature) -> None:
    """Every stored image carries its category's supercategory, in the store's group column."""
    meta = json.loads((store / "meta.json").read_text())
    assert meta["groups"]["kind"] == "supercategory" and meta["groups"]["names"] == mini.extra["groups"]
    for split, expected in mini.splits.items():
        palette = {e.colour: e for e in expected}
        table = datasets.load_from_disk(str(store / split))
        assert table.features["group"].names == mini.extra["groups"]
        for row in table:
            pixel = tuple(int(v) for v in row["image"].convert("RGB").getpixel((12, 8)))
            colour = min(palette, key=lambda c: max(abs(a - b) for a, b in zip(c, pixel)))
            assert mini.extra["groups"][row["group"]] == mini.extra["group_of_colour"][colour]


@pytest.mark.parametrize("year", YEARS)
def test_inat_stores_official_splits_species_labels_pixels_and_supercategory(year, local_http_server, tmp_path):
    mini = archives.inat(year)
    store = prepare_via_server(mini, local_http_server, tmp_path / "data")
    meta = check_store(store, mini)
    _check_groups(store, mini)
    assert set(meta["sources"]) == set(mini.files)
    # the class decides the supercategory at the species level: a report can group a confusion matrix
    assert meta["groups"]["of_class"] == [0, 0, 1, 1]


@pytest.mark.parametrize(("year", "level"), [("2021", "kingdom"), ("2021", "genus"), ("2018", "genus")])
def test_inat_taxonomy_level_variants_relabel_the_same_images(year, level, local_http_server, tmp_path):
    """2018 reads the released categories.json, since its competition files hide every name."""
    mini = archives.inat(year, level)
    store = prepare_via_server(mini, local_http_server, tmp_path / "data")
    meta = check_store(store, mini)
    _check_groups(store, mini)
    assert meta["info"]["annotation_level"] == level


def test_inat_2018_without_categories_json_names_it(tmp_path):
    mini = archives.inat("2018")
    folder = write_files(mini, tmp_path / "downloads", skip="categories.json.tar.gz")
    with _with_miniature_checksums(mini), pytest.raises(FinebenchError, match=r"missing \S*categories\.json for dataset .inat2018.*\(categories\.json\.tar\.gz\)"):
        prepare_dataset("inat2018", tmp_path / "data", from_path=folder, quiet=True)


def test_inat_prepares_from_a_folder_of_the_official_files(tmp_path):
    mini = archives.inat("2021_mini")
    folder = write_files(mini, tmp_path / "downloads")
    with _with_miniature_checksums(mini):
        store = prepare_dataset("inat2021_mini", tmp_path / "data", from_path=folder, quiet=True)
    check_store(store, mini)


def _extracted(mini: archives.Miniature, folder: Path) -> Path:
    """The miniature unpacked by hand: what ``--from`` parses in place, and what the damage tests edit."""
    folder.mkdir(parents=True)
    for name, data in mini.files.items():
        (folder.parent / name).write_bytes(data)
        extract_archive(folder.parent / name, folder)
    return folder


def _rewrite(folder: Path, name: str, change) -> None:
    path = folder / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _first_train_image(mini: archives.Miniature) -> str:
    return mini.extra["coco"]["train"]["images"][0]["file_name"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder, mini: (folder / _first_train_image(mini)).unlink(),
         r"train_mini\.json: lists image train_mini/.*/0065aa\.jpg, which is not in the image archive"),
        (lambda folder, mini: (folder / "val" / "stray.jpg").write_bytes(archives.jpeg((1, 2, 3))),
         r"val/stray\.jpg: this image is in the archive but in none of train_mini\.json, val\.json"),
        (lambda folder, mini: _rewrite(folder, "val.json",
                                       lambda d: d["annotations"][1].update(category_id=99)),
         (r"val\.json: annotation #1 \(id 5105\) of image 105 \(val/.*\.jpg\) has category_id 99, which is not "
          r"in the taxonomy")),
        (lambda folder, mini: _rewrite(folder, "train_mini.json", lambda d: d["annotations"].pop(0)),
         r"train_mini\.json: image id 101 \(train_mini/.*\) has no annotation"),
        (lambda folder, mini: _rewrite(folder, "val.json", lambda d: d["categories"].pop()),
         r"val\.json: its categories differ from train_mini\.json's \(category id 1 is in only one of them\)"),
        (lambda folder, mini: _rewrite(folder, "val.json", lambda d: d["images"][0].update(
            file_name=d["images"][0]["file_name"].replace("val/", "train_mini/", 1).replace("0066", "0065"))),
         r"val\.json: lists image train_mini/.*/0065aa\.jpg, which train_mini\.json lists too"),
    ],
    ids=["listed-image-missing", "unlisted-image", "category-outside-taxonomy", "image-without-label",
         "categories-disagree", "image-in-both-splits"],
)
def test_inat_annotations_and_archive_that_disagree_are_named_and_nothing_is_stored(damage, message, tmp_path):
    mini = archives.inat("2021_mini")
    folder = _extracted(mini, tmp_path / "extracted")
    damage(folder, mini)
    with pytest.raises(FinebenchError, match=message):
        prepare_dataset("inat2021_mini", tmp_path / "data", from_path=folder, quiet=True)
    assert not (tmp_path / "data" / "inat2021_mini").exists()
    assert not list((tmp_path / "data").glob("inat2021_mini.partial-*"))


def _truncated_tar_gz(members: dict[str, bytes], victim: str) -> bytes:
    """A .tar.gz whose tar stream stops 100 bytes into ``victim``'s data (a cut-off download of the tar)."""
    whole = archives.tar_bytes(members)
    offset = 0
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        for member in tar.getmembers():
            if member.name == victim:
                offset = member.offset_data + 100
    assert offset
    return gzip.compress(whole[:offset])


def test_inat_truncated_tar_member_is_named_and_nothing_is_stored(local_http_server, tmp_path):
    """The publisher's digest would catch a cut download; this is an archive that matches its (absent or
    wrong) digest yet ends inside an image, as a damaged mirror would serve it."""
    mini = archives.inat("2021_mini")
    members = mini.extra["images"]["val"]
    victim = list(members)[1]
    mini.files["val.tar.gz"] = _truncated_tar_gz(members, victim)
    with pytest.raises(FinebenchError, match=rf"val\.tar\.gz is truncated or damaged: member '{victim}'"):
        prepare_via_server(mini, local_http_server, tmp_path / "data")
    assert not (tmp_path / "data" / "inat2021_mini").exists()


def test_inat_tar_that_ends_between_members_is_not_taken_as_complete(local_http_server, tmp_path):
    """Cut exactly at a member boundary, a tar reads as a shorter valid one; only its missing end marker tells."""
    mini = archives.inat("2021_mini")
    members = mini.extra["images"]["val"]
    whole = archives.tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut = tar.getmembers()[2].offset  # just before the third member's header
    mini.files["val.tar.gz"] = gzip.compress(whole[:cut])
    with pytest.raises(FinebenchError, match=rf"val\.tar\.gz is truncated: it ends after member '{list(members)[1]}'"):
        prepare_via_server(mini, local_http_server, tmp_path / "data")
    assert not (tmp_path / "data" / "inat2021_mini").exists()


def test_cli_names_the_json_entry_whose_image_is_missing_in_one_line(tmp_path):
    mini = archives.inat("2021_mini")
    folder = _extracted(mini, tmp_path / "extracted")
    victim = _first_train_image(mini)
    (folder / victim).unlink()
    result = subprocess.run(
        [sys.executable, "-m", "finebench", "prepare", "inat2021_mini", "--from", str(folder),
         "--data-root", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "train_mini.json" in result.stderr and victim in result.stderr and "Traceback" not in result.stderr


def test_inat_specs_list_every_year_and_level_with_the_published_digests(tmp_path):
    names = {row["name"] for row in dataset_overview(tmp_path)}
    expected = {"inat2017", *(f"inat{year}{suffix}" for year in ("2018", "2021", "2021_mini")
                              for suffix in ("", *(f"_{level}" for level in inat.LEVELS)))}
    assert expected <= names
    import torchvision.datasets.inaturalist as tv

    digests = {source.filename: source.md5 for spec in inat.SPECS for source in spec.sources}
    assert digests["train_val_images.tar.gz"] == tv.DATASET_MD5["2017"]
    assert digests["train_val2018.tar.gz"] == tv.DATASET_MD5["2018"]
    assert digests["train.tar.gz"] == tv.DATASET_MD5["2021_train"]
    assert digests["train_mini.tar.gz"] == tv.DATASET_MD5["2021_train_mini"]
    assert digests["val.tar.gz"] == tv.DATASET_MD5["2021_valid"]
    urls = {source.filename: source.url for spec in inat.SPECS for source in spec.sources}
    assert urls["train_val_images.tar.gz"] == tv.DATASET_URLS["2017"]
    assert urls["train.tar.gz"] == tv.DATASET_URLS["2021_train"]
