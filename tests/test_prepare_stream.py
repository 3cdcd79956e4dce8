"""``prepare`` at real size: sharded writing with worker processes, streamed image archives, resume.

The stores of the datasets that existed before sharding must hold the same rows (frozen content
digests below, taken with the writer that came before), and a prepare killed mid-way must, run
again, end with the store an uninterrupted one writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import archives
import numpy as np
import pyarrow as pa
import pytest
from test_builders import prepare_via_server
from tiny_data import DATASET, prepare_tiny_bars

from finebench.data import download, encoder, images, registry, shards, staging, store, writer
from finebench.data import prepare as prepare_dataset_module
from finebench.data.builders.base import ParsedDataset
from finebench.data.download import extract_archive
from finebench.data.prepare import prepare_dataset
from finebench.errors import FinebenchError


def content_digest(split_dir: Path) -> str:
    """sha256 over the split's rows (image bytes, image path, label, group) and its features, not
    over how the rows are cut into files: what a run reads, independent of the shard layout."""
    info = json.loads((split_dir / "dataset_info.json").read_text())
    state = json.loads((split_dir / "state.json").read_text())
    digest = hashlib.sha256(json.dumps(info["features"], sort_keys=True).encode())
    for entry in state["_data_files"]:
        with pa.memory_map(str(split_dir / entry["filename"])) as source:
            table = pa.ipc.open_stream(source).read_all()
        for row in table.to_pylist():
            image = row["image"]
            digest.update(len(image["bytes"]).to_bytes(8, "little") + image["bytes"])
            digest.update(repr((image["path"], row["label"], row.get("group"))).encode())
    return digest.hexdigest()


def store_digests(store: Path) -> dict[str, str]:
    meta = json.loads((store / "meta.json").read_text())
    return {split: content_digest(store / split) for split in meta["splits"]}


FROZEN = {
    # taken with the writer before sharding (from_generator + save_to_disk), so the rows must not change
    "bars": {"train": "267ed961faefd7003d3fff1f4935203fdd93c5e56ca041aa946e5aa6924c7080",
             "test": "f2065a389ad73e545cc8fe72bfaa66e2b970a3ff8dff4836d134025313d4c3ab"},
    "inat2018": {"train": "af442e9b3e259405566e1a7038492bed9ef09b504f90b9489b89c0b6dc8a253b",
                 "test": "6a1d70c50094041d23acdbc161e7cf76b12acddf1792f6489e2dbcb59097a4fe"},
}


def _with_checksums(spec_name: str, folder: Path):
    """The registered spec with the digests of the files in ``folder`` (its URLs and parser stay)."""
    spec = registry.get_spec(spec_name)
    sources = tuple(replace(s, md5=hashlib.md5((folder / s.filename).read_bytes()).hexdigest(), sha256=None)
                    for s in spec.sources)
    return registry.override(replace(spec, sources=sources))


def test_stores_of_existing_datasets_keep_their_rows(tmp_path, local_http_server, monkeypatch):
    """Arrays encoded in-process, in worker processes, and iNat streamed from its archives or read from the
    extracted folder: the same rows as the writer before sharding stored."""
    root = prepare_tiny_bars(tmp_path / "bars", 40, 20)
    assert store_digests(root / DATASET) == FROZEN["bars"]
    monkeypatch.setattr(encoder, "POOL_MIN_IMAGES", 1)  # a pool of two worker processes even for 60 images
    monkeypatch.setattr(shards, "SHARD_IMAGES", 7)  # and shards that cut the splits unevenly
    shutil.rmtree(root / DATASET)
    original = prepare_dataset_module.prepare_dataset
    monkeypatch.setattr(prepare_dataset_module, "prepare_dataset", lambda *a, **k: original(*a, **{**k, "workers": 2}))
    monkeypatch.setattr(encoder.Encoder, "__init__", lambda self, workers, max_side, short_side: setattr(
        self, "__dict__", {"workers": workers, "max_side": 10**6, "short_side": None, "_pool": None}))  # "resizing"
    import tiny_data

    monkeypatch.setattr(tiny_data, "prepare_dataset", prepare_dataset_module.prepare_dataset)
    pools = []
    start = encoder.Encoder.start
    monkeypatch.setattr(encoder.Encoder, "start", lambda self: (pools.append(self.workers), start(self))[1])
    prepare_tiny_bars(root, 40, 20)
    assert pools == [2, 2]  # asked for by each split; one pool of two processes, started once, serves both
    assert store_digests(root / DATASET) == FROZEN["bars"]
    assert len(json.loads((root / DATASET / "train" / "state.json").read_text())["_data_files"]) == 6  # ceil(40/7)
    monkeypatch.undo()

    mini = archives.inat("2018")
    streamed = prepare_via_server(mini, local_http_server, tmp_path / "data")
    assert store_digests(streamed) == FROZEN["inat2018"]
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    for name, data in mini.files.items():
        (tmp_path / name).write_bytes(data)
        extract_archive(tmp_path / name, extracted)
    with _with_checksums("inat2018", tmp_path):
        from_folder = prepare_dataset("inat2018", tmp_path / "data2", from_path=extracted, quiet=True)
    assert store_digests(from_folder) == FROZEN["inat2018"]


def test_inat_image_archives_are_streamed_not_extracted(tmp_path, monkeypatch):
    mini = archives.inat("2021_mini")
    folder = tmp_path / "downloads"
    folder.mkdir()
    for name, data in mini.files.items():
        (folder / name).write_bytes(data)
    extracted: list[str] = []
    real = download.extract_archive
    monkeypatch.setattr(download, "extract_archive", lambda path, target: (extracted.append(path.name), real(path, target)))
    with _with_checksums("inat2021_mini", folder):
        prepare_dataset("inat2021_mini", tmp_path / "data", from_path=folder, quiet=True)
    assert sorted(extracted) == ["train_mini.json.tar.gz", "val.json.tar.gz"]


CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from finebench.data import images, shards, staging
shards.SHARD_IMAGES = 2
marker = Path({marker!r})

def stall():
    marker.write_text("stalled")
    time.sleep(600)

if {streamed!r}:
    add = staging.Stage.add
    def slow_add(self, *args):
        add(self, *args)
        if self.staged == 4 and len(self._records) == 1:  # two stage shards finished, the third begun
            stall()
    staging.Stage.add = slow_add
    import test_prepare_stream as t
    with t._with_checksums("inat2021_mini", Path({folder!r})):
        t.prepare_dataset("inat2021_mini", Path({root!r}), from_path=Path({folder!r}), quiet=True, workers=1)
else:
    encode = images.encode_image
    calls = []
    def slow_encode(*args):
        calls.append(1)
        if len(calls) == 5:  # two shards of train finished, the third begun
            stall()
        return encode(*args)
    images.encode_image = slow_encode
    import tiny_data
    tiny_data.prepare_tiny_bars(Path({root!r}), 40, 20)
"""


def _file_digests(store_path: Path) -> dict[str, str]:
    return {str(p.relative_to(store_path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store_path.rglob("*")) if p.is_file() and p.name != "meta.json"}


@pytest.mark.parametrize("streamed", [True, False], ids=["inat-streamed", "arrays"])
def test_a_prepare_killed_mid_shard_resumes_to_the_same_store_and_holds_the_lock_meanwhile(
    streamed, tmp_path, monkeypatch
):
    monkeypatch.setattr(shards, "SHARD_IMAGES", 2)
    name = "inat2021_mini" if streamed else DATASET
    folder = tmp_path / "downloads"
    folder.mkdir()
    for filename, data in archives.inat("2021_mini").files.items():
        (folder / filename).write_bytes(data)

    def prepare(root: Path) -> Path:
        if streamed:
            with _with_checksums(name, folder):
                return prepare_dataset(name, root, from_path=folder, quiet=True, workers=1)
        return prepare_tiny_bars(root, 40, 20) / name

    reference = prepare(tmp_path / "reference")
    root, marker = tmp_path / "killed", tmp_path / "stalled"
    script = CHILD.format(tests=str(Path(__file__).parent), marker=str(marker), streamed=streamed,
                          folder=str(folder), root=str(root))
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the prepare ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the running prepare holds the dataset's lock: a second one is refused and leaves its build alone
        with pytest.raises(FinebenchError, match=rf"another prepare of '{name}' is running"):
            prepare(root)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not store.is_prepared(root, name)  # killed: nothing that looks complete
    build = root / f"{name}.partial"
    finished = sorted(p.name for p in build.rglob("*") if p.suffix in (".npy", ".arrow"))
    assert finished == (["stage-000000.npy", "stage-000001.npy"] if streamed
                        else ["shard-000000.arrow", "shard-000001.arrow"])
    work: list[int] = []
    if streamed:
        add = staging.Stage.add
        monkeypatch.setattr(staging.Stage, "add", lambda self, *a: (work.append(1), add(self, *a))[1])
    else:
        encode = images.encode_image
        monkeypatch.setattr(images, "encode_image", lambda *a: (work.append(1), encode(*a))[1])
    resumed = prepare(root)
    assert len(work) == (12 if streamed else 60) - 4  # the finished shards were not done again
    assert _file_digests(resumed) == _file_digests(reference)
    assert store_digests(resumed) == store_digests(reference)
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [name]


def test_a_cut_off_gzip_stream_is_named_and_nothing_is_stored(tmp_path):
    """Streamed through a gzip process, an image archive cut mid-stream still stops the prepare."""
    mini = archives.inat("2021_mini")
    folder = tmp_path / "downloads"
    folder.mkdir()
    for name, data in mini.files.items():
        (folder / name).write_bytes(data[: len(data) * 2 // 3] if name == "train_mini.tar.gz" else data)
    with _with_checksums("inat2021_mini", folder), pytest.raises(FinebenchError, match=r"train_mini\.tar\.gz is truncated"):
        prepare_dataset("inat2021_mini", tmp_path / "data", from_path=folder, quiet=True)
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if not p.name.startswith(".")) == []


def test_a_truncated_store_file_is_named_with_the_command_that_rebuilds_it(tmp_path):
    """The loader reads the store with pyarrow alone; a damaged Arrow file is still one clear error."""
    from finebench.data.loader import build_loaders

    root = prepare_tiny_bars(tmp_path, 40, 20)
    data = next((root / DATASET / "train").glob("data-*.arrow"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(FinebenchError, match=rf"train: the prepared store cannot be read .*finebench prepare {DATASET} "
                                             rf"--data-root {tmp_path} --force"):
        build_loaders(DATASET, root, batch_size=8)


def test_images_resized_in_worker_processes_equal_those_resized_in_process(tmp_path, monkeypatch):
    from tiny_data import bar_examples

    monkeypatch.setattr(encoder, "POOL_MIN_IMAGES", 1)
    parsed = ParsedDataset([str(c) for c in range(10)], {"train": bar_examples(30, np.random.default_rng(0))})
    digests = []
    for workers in (1, 2):
        build = tmp_path / f"w{workers}"
        build.mkdir()
        writer.write_store(parsed, build, {"name": "unit"}, quiet=True, short_side=8, workers=workers)
        digests.append(content_digest(build / "train"))
    assert digests[0] == digests[1]
    assert json.loads((build / "meta.json").read_text())["image_stats"]["train"]["max_side"] == 8


def _store_files(store_path: Path) -> dict[str, str]:
    """sha256 of every file of a store; meta.json and state.json without what differs between two prepares
    of archives built anew (their creation time, the version, where and when the archives were made)."""
    files = _file_digests(store_path)
    for path in sorted(store_path.rglob("*.json")):
        data = json.loads(path.read_text())
        if path.name in ("meta.json", "state.json"):
            for volatile in ("created", "finebench_version", "origin", "sources", "_fingerprint"):
                data.pop(volatile, None)
            files[str(path.relative_to(store_path))] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return files


FROZEN_FILES = {
    'inat2018': {
        'test/data-00000-of-00001.arrow': 'c98b40ff9c6bb958c1f025f7125ce4d2a52fbad74c50c8aaf5bf404d531c4ecf',
        'test/dataset_info.json': 'c99d3b639d014a437e14b895cc07996b33aab1ad54e7a442d703e7d8a2867b1c',
        'test/state.json': '829ee0e39d3cd1f678423292028c485696ff168bd07175968fde8b8c0720e73d',
        'train/data-00000-of-00002.arrow': '267cb949b1cfeaf31498ed1d55180ff4dc853e55cfa69963e42627cc3c893f6d',
        'train/data-00001-of-00002.arrow': '3aa6c1fc708ae76a8309f7eb19e76bd287ee5fdc07d50ead8e74a4f7e8d54f08',
        'train/dataset_info.json': 'c99d3b639d014a437e14b895cc07996b33aab1ad54e7a442d703e7d8a2867b1c',
        'train/state.json': '3a84209ce6f4d2fb1958141fca4c29982cbada2b57d4a6ab001b7eeea52296ed',
        'meta.json': 'a06a483193223db4e0ba2accd0e7f4598006c1c496da0d21e34fa55ebd0c8539',
    },
    'inat2021_mini': {
        'test/data-00000-of-00001.arrow': 'c98b40ff9c6bb958c1f025f7125ce4d2a52fbad74c50c8aaf5bf404d531c4ecf',
        'test/dataset_info.json': 'c99d3b639d014a437e14b895cc07996b33aab1ad54e7a442d703e7d8a2867b1c',
        'test/state.json': '829ee0e39d3cd1f678423292028c485696ff168bd07175968fde8b8c0720e73d',
        'train/data-00000-of-00002.arrow': '267cb949b1cfeaf31498ed1d55180ff4dc853e55cfa69963e42627cc3c893f6d',
        'train/data-00001-of-00002.arrow': '3aa6c1fc708ae76a8309f7eb19e76bd287ee5fdc07d50ead8e74a4f7e8d54f08',
        'train/dataset_info.json': 'c99d3b639d014a437e14b895cc07996b33aab1ad54e7a442d703e7d8a2867b1c',
        'train/state.json': '3a84209ce6f4d2fb1958141fca4c29982cbada2b57d4a6ab001b7eeea52296ed',
        'meta.json': 'fa643875dd2b6e47fb5123729509bd5a55138926a0a18bcc6fd76d0e9dcd684b',
    },
    'arrays': {
        'test/data-00000-of-00003.arrow': 'f07b15c865a9e428bb8560ce979ffc2861608f93ce491044f32681b04e09e6f6',
        'test/data-00001-of-00003.arrow': 'e9700bcf3610c8112f0ca7f2511bc5dda0e81eb1f668f36b34c2fae607b2f3ff',
        'test/data-00002-of-00003.arrow': 'a697ded1d00e058a01554cc116a36e8e93353a4b943e38757c222e5e1fc7f94d',
        'test/dataset_info.json': '5b8d7538e28d89f99538b78876f883934f914e5a1ee6b3ee9d18cf04d499983e',
        'test/state.json': 'd36bb4e0d0cf848e50fa3129d25b099155f3f5048fa6c3d27ef9928fbd11d8cf',
        'train/data-00000-of-00006.arrow': '31acf9d9c855069fabbc7c362682ad6504007d29391495847722e5d9cfcc4c4f',
        'train/data-00001-of-00006.arrow': '54da84ec0f8465bd2020484c0cfb60553b3da5bb4bcdc0e2cdbad544c6b977b3',
        'train/data-00002-of-00006.arrow': '506cb2ff792446a3f5291654e71130ea17a04d3bb8be501cad13a50fbc8ebe9c',
        'train/data-00003-of-00006.arrow': 'e22ee0449eb58cb58c35f8cffc5f3ac288505c71395e47297d84e2dffbf142cf',
        'train/data-00004-of-00006.arrow': 'c00a97049f84b21028e0c88303c780abfaf1943949bb494253b6e558f98c5f98',
        'train/data-00005-of-00006.arrow': 'bee4f6259c3955ef15b1e01684fac76ca2f0975e3b4746dcdcf6f7b2ffa7708a',
        'train/dataset_info.json': '5b8d7538e28d89f99538b78876f883934f914e5a1ee6b3ee9d18cf04d499983e',
        'train/state.json': '62c230389921bb31155c7f6c6055238126a7a5dd0709e515ffdd18c4358bc260',
        'meta.json': 'b5021bd152afbe22a12943c9764d028bb0007db44bfb2f37d7854441aea087a3',
    },
}
"""Every file of three stores as the writer before the speed work (issue 31) wrote them, byte for byte: the
faster path must write the same Arrow files (shards cut at 5 / 7 rows, record batches of 2 / 3), not only rows."""


@pytest.mark.parametrize("case", ["inat2018", "inat2021_mini", "arrays"])
def test_stores_are_byte_identical_to_those_written_before_the_speed_work(case, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_IMAGES", 5 if case.startswith("inat") else 7)
    monkeypatch.setattr(shards, "WRITER_BATCH", 2 if case.startswith("inat") else 3)
    if case == "arrays":
        written = prepare_tiny_bars(tmp_path, 40, 20) / DATASET
    else:
        folder = tmp_path / "downloads"
        folder.mkdir()
        for filename, data in archives.inat(case.removeprefix("inat")).files.items():
            (folder / filename).write_bytes(data)
        with _with_checksums(case, folder):
            written = prepare_dataset(case, tmp_path / "data", from_path=folder, quiet=True, workers=1)
    assert _store_files(written) == FROZEN_FILES[case]


def _encoded(image, **save) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def test_the_jpeg_header_walk_gives_pils_size_and_leaves_everything_else_to_pil():
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored size stays the encoded one, as PIL reports it
    jpegs = [
        _encoded(rgb, format="JPEG"),
        _encoded(rgb, format="JPEG", progressive=True, quality=70),
        _encoded(rgb.convert("L"), format="JPEG"),
        _encoded(rgb.convert("CMYK"), format="JPEG"),
        _encoded(rgb, format="JPEG", exif=exif.tobytes(), icc_profile=b"\0" * 3000),
        _encoded(rgb.resize((1, 1)), format="JPEG", optimize=True),
    ]
    for data in jpegs:
        assert images.jpeg_size(data) == Image.open(__import__("io").BytesIO(data)).size
        assert images.image_size(data) == images.jpeg_size(data)
    png = _encoded(rgb, format="PNG")
    assert images.jpeg_size(png) is None and images.image_size(png) == (53, 37)
    cut = jpegs[0][:20]  # the frame header is missing: PIL decides, and refuses
    assert images.jpeg_size(cut) is None
    with pytest.raises(OSError):
        images.image_size(cut)


def test_streaming_a_tar_keeps_no_header_per_member(tmp_path):
    """tarfile keeps every member's header it has read; streaming iNat 2021 would hold 2.7 million of them."""
    import tarfile
    import tracemalloc

    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tar:
        for index in range(4000):
            info = tarfile.TarInfo(f"root/{index:05d}.jpg")
            info.size = 1
            tar.addfile(info, __import__("io").BytesIO(b"x"))
    tracemalloc.start()
    try:
        count = sum(1 for _ in download.stream_tar(archive, lambda name: True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 4000
    assert peak < 500_000  # headers kept: about 4000 x 0.4 KB = 1.6 MB; without, the read buffers only


def test_annotation_files_read_compactly_list_what_the_plain_reading_lists(tmp_path, monkeypatch):
    """The collected arrays and numpy checks give the plain checks' images and categories, and are what a
    well-formed file goes through (the plain reading, a dict per entry, only for a file with a problem)."""
    import json as json_module

    from finebench.data.builders import coco

    roots = ("train",)
    document = {
        "images": [{"id": i, "file_name": f"train/{i % 3}/{i}.jpg", "width": 8, "license": 1} for i in (9, 3, 7, 1)],
        "annotations": [{"id": 50 + i, "image_id": i, "category_id": 10 + (i > 5)} for i in (1, 3, 9, 7, 3)],
        "categories": [{"id": 10, "name": "a"}, {"id": 11, "name": "b"}],
    }
    path = tmp_path / "train.json"
    path.write_text(json_module.dumps(document))
    plain = []
    real = coco._checked_plainly
    monkeypatch.setattr(coco, "_checked_plainly", lambda *a: (plain.append(1), real(*a))[1])
    categories = {10: {}, 11: {}}
    fast = coco.split_images(coco.load(path), roots, categories)
    assert plain == []
    expected = real(json_module.loads(path.read_text()), path, roots, categories)
    assert list(fast.names) == expected.names == ["train/0/9.jpg", "train/0/3.jpg", "train/1/7.jpg", "train/1/1.jpg"]
    assert fast.category_ids.tolist() == expected.category_ids.tolist() == [11, 10, 11, 10]
    document["annotations"].append({"id": 99, "image_id": 9, "category_id": 10})
    path.write_text(json_module.dumps(document))
    with pytest.raises(FinebenchError, match=r"image id 9 \(train/0/9\.jpg\) has two categories, 11 and 10"):
        coco.split_images(coco.load(path), roots, categories)
    assert plain == [1]


@pytest.mark.parametrize("indent", [None, 2])
def test_annotation_files_parsed_a_chunk_at_a_time_equal_a_whole_parse(tmp_path, monkeypatch, indent):
    """Chunks of 7 characters cut every value somewhere (names, numbers, literals): the document is still json's."""
    import json as json_module

    from finebench.data.builders import coco

    monkeypatch.setattr(coco, "READ_CHARS", 7)
    document = {
        "info": {"year": 2021, "nested": [1, 2, {"a": None}]},
        "images": [{"id": 12345678 + i, "file_name": f"train/é \"{i}\".jpg"} for i in range(5)],
        "annotations": [{"id": i, "image_id": 12345678 + i, "category_id": 3} for i in range(5)],
        "categories": [{"id": 3, "name": "n"}], "count": 123456789, "flag": True, "scale": 1.5e10, "empty": [],
    }
    path = tmp_path / "a.json"
    path.write_text(json_module.dumps(document, indent=indent, ensure_ascii=False), encoding="utf-8")
    loaded = coco.load(path)
    assert list(loaded.collected.names.finish()) == [f"train/é \"{i}\".jpg" for i in range(5)]
    assert {k: v for k, v in loaded.data.items() if k not in ("images", "annotations")} == {
        k: v for k, v in document.items() if k not in ("images", "annotations")}
    path.write_text('{"images": [{"id": 1, "file_name": "train/a.jpg"},\n {"id": 2,, "file_name": "x"}]}')
    with pytest.raises(FinebenchError, match=r"a\.json: not valid JSON \(Expecting property name enclosed in "
                                             r"double quotes: line 2 column 11 \(char 61\)"):
        coco.load(path)  # json's own message: the line and column in the file, not a position inside a chunk


def test_file_names_kept_in_blocks_read_back_as_the_list(monkeypatch):
    from finebench.data.builders import coco

    monkeypatch.setattr(coco, "NAMES_BLOCK", 3)  # blocks cut the 11 names unevenly
    names = ["train/a.jpg", "", "val/é/b.jpg", "x", "train/ü ß.jpeg", "a/b", "c", "", "d/e/f.jpg", "g", "h"]
    builder = coco._NamesBuilder()
    for name in names:
        builder.append(name)
    kept = builder.finish()
    assert list(kept) == names and len(kept) == 11
    assert [kept[i] for i in range(-11, 11)] == names + names
    assert kept[2:9] == names[2:9] and kept[::4] == names[::4]
    with pytest.raises(IndexError):
        kept[11]
