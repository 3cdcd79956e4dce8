"""WebFG-496 (web_bird, web_car, web_aircraft) and the Ultra-FGVC leaf sets: miniature archives in the layout
their authors' loaders read, through the real prepare, and their bad input named in one line."""

from __future__ import annotations

import archives
import pytest
import torchvision
from test_builders import check_store, prepare_via_server, write_files

from finebench.data import registry
from finebench.data.download import extract_archive
from finebench.data.prepare import dataset_overview, prepare_dataset
from finebench.errors import FinebenchError


@pytest.mark.parametrize("name", ["web_bird", "web_car", "web_aircraft"])
def test_webfg_stores_web_train_and_clean_test_as_the_authors_imagefolder_reads_them(name, local_http_server, tmp_path):
    mini = archives.webfg(name)
    store = prepare_via_server(mini, local_http_server, tmp_path / "data")
    check_store(store, mini)
    # the authors' main.py: ImageFolder(<root>/train) and ImageFolder(<root>/val); same classes, same images
    archive = tmp_path / next(iter(mini.files))
    archive.write_bytes(next(iter(mini.files.values())))
    extract_archive(archive, tmp_path / "x")
    root = tmp_path / "x" / name.replace("_", "-")
    for split, folder in (("train", "train"), ("test", "val")):
        reference = torchvision.datasets.ImageFolder(str(root / folder))
        assert reference.classes == mini.classes
        assert len(reference.samples) == len(mini.splits[split])


def test_webfg_test_folder_with_other_classes_is_refused(tmp_path):
    """ImageFolder would number val's classes on their own, shifting every label after the odd one."""
    mini = archives.webfg("web_bird")
    folder = tmp_path / "extracted"
    archive = tmp_path / "web-bird.tar.gz"
    archive.write_bytes(mini.files["web-bird.tar.gz"])
    extract_archive(archive, folder)
    (folder / "web-bird" / "val" / "002.Laysan_Albatross").rename(folder / "web-bird" / "val" / "002.Laysan")
    with pytest.raises(FinebenchError, match=r"web-bird/val: its class folders differ from train's .*'002\.Laysan'"):
        prepare_dataset("web_bird", tmp_path / "data", from_path=folder, quiet=True)
    assert not (tmp_path / "data" / "web_bird").exists()


@pytest.mark.parametrize("name", sorted(archives.ULTRA_FOLDERS))
def test_ultra_fgvc_prepares_from_the_download_with_labels_from_the_ids(name, tmp_path):
    spec = registry.get_spec(name)
    mini = archives.ultra_fgvc(name, spec.num_classes)
    folder = write_files(mini, tmp_path / "downloads")
    store = prepare_dataset(name, tmp_path / "data", from_path=folder, quiet=True)
    check_store(store, mini)


def _ultra_extracted(tmp_path):
    """Cotton80 unpacked into a Cotton80/ folder, as the loaders' root table has it (Cotton80/COTTON/anno)."""
    mini = archives.ultra_fgvc("cotton80", 80)
    folder = tmp_path / "extracted"
    (tmp_path / "Cotton80.zip").write_bytes(mini.files["Cotton80.zip"])
    extract_archive(tmp_path / "Cotton80.zip", folder / "Cotton80")
    return mini, folder, folder / "Cotton80" / "COTTON"


def test_ultra_fgvc_reads_an_unpacked_folder(tmp_path):
    mini, folder, _ = _ultra_extracted(tmp_path)
    store = prepare_dataset("cotton80", tmp_path / "data", from_path=folder, quiet=True)
    meta = check_store(store, mini)
    assert meta["info"]["lists"] == [f"Cotton80/COTTON/anno/{split}.txt" for split in ("train", "val", "test")]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "anno" / "train.txt").write_text("80_1.jpg 81\n"),
         r"COTTON/anno/train\.txt: class id 81 is outside 1\.\.80"),
        (lambda root: (root / "images" / "1_5.jpg").unlink(),
         r"COTTON/anno/train\.txt: lists image 1_5\.jpg, which is not in .*COTTON/images"),
        (lambda root: (root / "anno" / "test.txt").write_text("80_2.jpg one\n"),
         r"COTTON/anno/test\.txt: field class id must be an integer, got 'one'"),
    ],
    ids=["class-id-outside", "listed-image-missing", "class-id-not-a-number"],
)
def test_ultra_fgvc_bad_lists_are_named_and_nothing_is_stored(damage, message, tmp_path):
    _, folder, root = _ultra_extracted(tmp_path)
    damage(root)
    with pytest.raises(FinebenchError, match=message):
        prepare_dataset("cotton80", tmp_path / "data", from_path=folder, quiet=True)
    assert not (tmp_path / "data" / "cotton80").exists()


def test_ultra_fgvc_without_from_says_where_to_get_it(tmp_path):
    with pytest.raises(FinebenchError, match=r"cannot be downloaded automatically.*pan\.baidu\.com.*--from DIR"):
        prepare_dataset("soygene", tmp_path / "data", quiet=True)


def test_datasets_lists_the_webly_and_ultra_fine_grained_sets(tmp_path):
    rows = {row["name"]: row for row in dataset_overview(tmp_path)}
    for name, classes in {"web_bird": 200, "web_car": 196, "web_aircraft": 100, "cotton80": 80, "soylocal": 200,
                          "soygene": 1110, "soyglobal": 1938, "soyageing_r1": 198, "soyageing_r6": 198}.items():
        assert rows[name]["classes"] == classes
    assert rows["cotton80"]["source"] == "registration; --from only"
    assert rows["web_bird"]["source"] == "download"
