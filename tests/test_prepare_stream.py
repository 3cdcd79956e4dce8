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

from finebench.data import download, registry, store
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
    monkeypatch.setattr(store, "POOL_MIN_IMAGES", 1)  # a pool of two worker processes even for 60 images
    monkeypatch.setattr(store, "SHARD_IMAGES", 7)  # and shards that cut the splits unevenly
    shutil.rmtree(root / DATASET)
    original = prepare_dataset_module.prepare_dataset
    monkeypatch.setattr(prepare_dataset_module, "prepare_dataset", lambda *a, **k: original(*a, **{**k, "workers": 2}))
    monkeypatch.setattr(store._Encoder, "__init__", lambda self, workers, max_side, short_side: setattr(
        self, "__dict__", {"workers": workers, "max_side": 10**6, "short_side": None, "_pool": None}))  # "resizing"
    import tiny_data

    monkeypatch.setattr(tiny_data, "prepare_dataset", prepare_dataset_module.prepare_dataset)
    pools = []
    start = store._Encoder._start
    monkeypatch.setattr(store._Encoder, "_start", lambda self: (pools.append(self.workers), start(self))[1])
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
from finebench.data import store
store.SHARD_IMAGES = 2
marker = Path({marker!r})

def stall():
    marker.write_text("stalled")
    time.sleep(600)

if {streamed!r}:
    add = store._Stage.add
    def slow_add(self, *args):
        add(self, *args)
        if self.staged == 4 and len(self._records) == 1:  # two stage shards finished, the third begun
            stall()
    store._Stage.add = slow_add
    import test_prepare_stream as t
    with t._with_checksums("inat2021_mini", Path({folder!r})):
        t.prepare_dataset("inat2021_mini", Path({root!r}), from_path=Path({folder!r}), quiet=True, workers=1)
else:
    encode = store.encode_image
    calls = []
    def slow_encode(*args):
        calls.append(1)
        if len(calls) == 5:  # two shards of train finished, the third begun
            stall()
        return encode(*args)
    store.encode_image = slow_encode
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
    monkeypatch.setattr(store, "SHARD_IMAGES", 2)
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
        add = store._Stage.add
        monkeypatch.setattr(store._Stage, "add", lambda self, *a: (work.append(1), add(self, *a))[1])
    else:
        encode = store.encode_image
        monkeypatch.setattr(store, "encode_image", lambda *a: (work.append(1), encode(*a))[1])
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
    from tiny_data import _bars

    monkeypatch.setattr(store, "POOL_MIN_IMAGES", 1)
    parsed = ParsedDataset([str(c) for c in range(10)], {"train": _bars(30, np.random.default_rng(0))})
    digests = []
    for workers in (1, 2):
        build = tmp_path / f"w{workers}"
        build.mkdir()
        store.write_store(parsed, build, {"name": "unit"}, quiet=True, short_side=8, workers=workers)
        digests.append(content_digest(build / "train"))
    assert digests[0] == digests[1]
    assert json.loads((build / "meta.json").read_text())["image_stats"]["train"]["max_side"] == 8
