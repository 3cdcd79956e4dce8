"""prepare_dataset orchestration on a toy two-file dataset: download, --from, no-op, force, interruption."""

from __future__ import annotations

import hashlib
import fcntl
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from finebench.data import download, registry
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.data.prepare import prepare_dataset
from finebench.errors import FinebenchError

CLASSES = ["2", "10", "1"]  # official id order, deliberately not lexicographic
FINEBENCH = [sys.executable, "-m", "finebench"]


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "DEFAULT_BACKOFF_S", 0.01)


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 16, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _toy_files() -> dict[str, bytes]:
    buffer = io.BytesIO()
    lines = []
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for index in range(9):
            data = _png(index * 20)
            info = tarfile.TarInfo(f"toy/images/{index}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            lines.append(f"{index}.png {index % 3} {'test' if index >= 6 else 'train'}")
    return {"toy-images.tar.gz": buffer.getvalue(), "labels.txt": "\n".join(lines).encode()}


def parse_toy(raw_dir: Path) -> ParsedDataset:
    rows = [line.split() for line in (raw_dir / "labels.txt").read_text().splitlines()]
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for name, label, split in rows:
        splits[split].append(Example(raw_dir / "toy" / "images" / name, int(label)))
    return ParsedDataset(classes=list(CLASSES), splits=splits, info={"rows": len(rows)})


def _toy_spec(files: dict[str, bytes], **changes) -> DatasetSpec:
    sources = tuple(
        Source(name, url=f"https://example.invalid/{name}", md5=hashlib.md5(data).hexdigest(), extract=name.endswith(".gz"))
        for name, data in files.items()
    )
    fields = dict(
        name="toy", num_classes=3, split_sizes={"train": 6, "test": 3}, protocol="toy protocol", terms="test data",
        homepage="https://example.invalid/toy", parse=parse_toy, sources=sources,
    )
    return DatasetSpec(**{**fields, **changes})


@pytest.fixture
def toy(local_http_server):
    files = _toy_files()
    for name, data in files.items():
        local_http_server.add(name, data)
    with registry.override(_toy_spec(files)) as spec:
        yield spec, files, local_http_server


def _leftovers(data_root: Path) -> list[str]:
    """What a prepare left in ``data_root`` besides its download cache and per-dataset lock files."""
    kept = [p.name for p in data_root.iterdir() if p.name != ".downloads" and not p.name.endswith(".lock")]
    return sorted(kept) if data_root.exists() else []


def test_prepare_downloads_verifies_and_stores_in_class_id_order(toy, tmp_path: Path) -> None:
    spec, files, server = toy
    store = prepare_dataset("toy", tmp_path, mirror=server.url, quiet=True)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["classes"] == CLASSES and meta["splits"] == {"train": 6, "test": 3}
    assert meta["sources"]["labels.txt"]["md5"] == hashlib.md5(files["labels.txt"]).hexdigest()
    assert meta["origin"] == {"kind": "mirror", "mirror": server.url} and meta["info"] == {"rows": 9}
    train = datasets.load_from_disk(str(store / "train"))
    assert train.features["label"].names == CLASSES and train["label"] == [0, 1, 2, 0, 1, 2]
    assert np.asarray(train[4]["image"])[0, 0].tolist() == [80, 80, 80]
    assert _leftovers(tmp_path) == ["toy"] and not (store / "raw").exists()


def test_corrupt_download_names_file_and_digests_and_stores_nothing(toy, tmp_path: Path) -> None:
    spec, files, server = toy
    server.add("labels.txt", b"tampered")
    with pytest.raises(FinebenchError) as caught:
        prepare_dataset("toy", tmp_path, mirror=server.url, quiet=True)
    message = str(caught.value)
    assert "labels.txt" in message
    assert hashlib.md5(files["labels.txt"]).hexdigest() in message and hashlib.md5(b"tampered").hexdigest() in message
    assert _leftovers(tmp_path) == []


def test_second_prepare_is_a_no_op_and_force_rebuilds(toy, tmp_path: Path) -> None:
    spec, files, server = toy
    store = prepare_dataset("toy", tmp_path, mirror=server.url, quiet=True)
    first = json.loads((store / "meta.json").read_text())
    requests = len(server.faults.requests)
    os.utime(store / "meta.json", (0, 0))

    prepare_dataset("toy", tmp_path, mirror=server.url, quiet=True)
    assert (store / "meta.json").stat().st_mtime == 0 and len(server.faults.requests) == requests

    prepare_dataset("toy", tmp_path, mirror=server.url, force=True, max_side=8, quiet=True)
    rebuilt = json.loads((store / "meta.json").read_text())
    assert rebuilt["resize"] == {"max_side": 8} and first["resize"] is None
    assert len(server.faults.requests) == requests  # verified downloads are reused
    assert _leftovers(tmp_path) == ["toy"]


def _failing_parse(raw_dir: Path) -> ParsedDataset:
    parsed = parse_toy(raw_dir)

    def explode():
        yield from parsed.splits["train"][:3]
        raise FinebenchError("parse failed midway (injected by the test)")

    return ParsedDataset(parsed.classes, {"train": explode(), "test": parsed.splits["test"]})


def test_interrupted_prepare_leaves_no_store(toy, tmp_path: Path) -> None:
    spec, files, server = toy
    with registry.override(_toy_spec(files, parse=_failing_parse)):
        with pytest.raises(FinebenchError, match="midway"):
            prepare_dataset("toy", tmp_path, mirror=server.url, quiet=True)
    assert _leftovers(tmp_path) == []


def test_failed_force_rebuild_keeps_the_old_store(toy, tmp_path: Path) -> None:
    spec, files, server = toy
    store = prepare_dataset("toy", tmp_path, mirror=server.url, quiet=True)
    before = (store / "meta.json").read_text()
    with registry.override(_toy_spec(files, parse=_failing_parse)):
        with pytest.raises(FinebenchError, match="midway"):
            prepare_dataset("toy", tmp_path, mirror=server.url, force=True, quiet=True)
    assert (store / "meta.json").read_text() == before
    assert len(datasets.load_from_disk(str(store / "train"))) == 6
    assert _leftovers(tmp_path) == ["toy"]


def test_from_folder_of_archives_works_offline(tmp_path: Path) -> None:
    files = _toy_files()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with registry.override(_toy_spec(files)):
        store = prepare_dataset("toy", tmp_path / "data", from_path=tmp_path, quiet=True)
    assert json.loads((store / "meta.json").read_text())["origin"]["kind"] == "from"


def test_from_extracted_layout_is_parsed_in_place(tmp_path: Path) -> None:
    files = _toy_files()
    layout = tmp_path / "layout"
    with tarfile.open(fileobj=io.BytesIO(files["toy-images.tar.gz"])) as tar:
        tar.extractall(layout, filter="data")
    (layout / "labels.txt").write_bytes(files["labels.txt"])
    with registry.override(_toy_spec(files)):
        store = prepare_dataset("toy", tmp_path / "data", from_path=layout, quiet=True)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["splits"] == {"train": 6, "test": 3}
    assert meta["origin"]["taken_as_extracted"] == ["toy-images.tar.gz"]
    assert meta["sources"]["labels.txt"]["md5"] == hashlib.md5(files["labels.txt"]).hexdigest()


def test_from_extracted_layout_still_verifies_its_plain_files(tmp_path: Path) -> None:
    files = _toy_files()
    layout = tmp_path / "layout"
    with tarfile.open(fileobj=io.BytesIO(files["toy-images.tar.gz"])) as tar:
        tar.extractall(layout, filter="data")
    (layout / "labels.txt").write_bytes(files["labels.txt"] + b"\n")
    with registry.override(_toy_spec(files)):
        with pytest.raises(FinebenchError, match=r"checksum mismatch for .*labels.txt"):
            prepare_dataset("toy", tmp_path / "data", from_path=layout, quiet=True)


def test_from_with_a_missing_file_names_it_and_where_to_get_it(tmp_path: Path) -> None:
    files = _toy_files()
    (tmp_path / "toy-images.tar.gz").write_bytes(files["toy-images.tar.gz"])
    with registry.override(_toy_spec(files)):
        with pytest.raises(FinebenchError, match=r"missing labels.txt .*https://example.invalid/labels.txt"):
            prepare_dataset("toy", tmp_path / "data", from_path=tmp_path, quiet=True)
    assert not (tmp_path / "data" / "toy").exists()


def test_registration_only_dataset_explains_what_to_fetch(tmp_path: Path) -> None:
    manual = _toy_spec(
        {"toy-images.tar.gz": b"x"}, manual=True, manual_instructions="register at https://example.invalid/register"
    )
    manual = manual.__class__(**{**manual.__dict__, "sources": (Source("toy-images.tar.gz"),)})
    with registry.override(manual):
        with pytest.raises(FinebenchError) as caught:
            prepare_dataset("toy", tmp_path, quiet=True)
    message = str(caught.value)
    assert "register at https://example.invalid/register" in message and "--from DIR" in message
    assert "toy-images.tar.gz" in message


def test_cli_prepares_both_offline_sets_and_lists_them(tmp_path: Path) -> None:
    env = {**os.environ, "FINEBENCH_DATA": str(tmp_path)}
    for name in ("mnist5k", "cluttered_mnist"):
        result = subprocess.run([*FINEBENCH, "prepare", name, "--quiet"], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    rows = json.loads(subprocess.run([*FINEBENCH, "datasets", "--json"], env=env, capture_output=True, text=True, check=True).stdout)
    by_name = {row["name"]: row for row in rows}
    assert {"cifar10", "cifar100", "mnist5k", "cluttered_mnist"} <= set(by_name)
    assert by_name["mnist5k"]["prepared"] and by_name["mnist5k"]["size_bytes"] > 100_000
    assert not by_name["cifar10"]["prepared"]
    meta = json.loads((tmp_path / "cluttered_mnist" / "meta.json").read_text())
    assert meta["splits"] == {"train": 8000, "test": 2000} and meta["image_size"] == [60, 60]
    assert meta["info"]["clutter"]["fragments"] == 8


def test_cli_unknown_dataset_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([*FINEBENCH, "prepare", "nope", "--data-root", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown dataset 'nope'" in result.stderr and "cifar10" in result.stderr


def _hub_stand_in(folder: Path, splits: dict[str, list[int]]) -> Path:
    """A local folder in the layout of a parquet Hub repo: load_dataset reads it through the same code path."""
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "coarse_label": datasets.ClassLabel(names=["animal", "thing"]),
            "fine_label": datasets.ClassLabel(names=CLASSES),
        }
    )
    (folder / "data").mkdir(parents=True)
    for split, values in splits.items():
        rows = {
            "img": [{"bytes": _png(v), "path": None} for v in values],
            "coarse_label": [0] * len(values),
            "fine_label": [i % 3 for i in range(len(values))],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.fixture
def hub_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Like ethz/food101 (the official test set is "validation") plus a corrupted copy like tanganke/stanford_cars."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = _hub_stand_in(tmp_path / "repo", {"train": [10, 20, 30, 40], "validation": [50, 60], "contrast": [70]})
    # An unmapped split must not even be read: make reading it fail.
    (repo / "data" / "contrast-00000-of-00001.parquet").write_bytes(b"not parquet")
    return repo


def test_hub_copy_is_converted_with_the_matching_label_column(hub_repo: Path, tmp_path: Path) -> None:
    spec = _toy_spec(_toy_files(), hub_id=str(hub_repo), hub_splits={"train": "train", "test": "validation"})
    with registry.override(spec):
        store = prepare_dataset("toy", tmp_path / "data", source="hub", quiet=True)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["classes"] == CLASSES and meta["origin"]["kind"] == "hub"
    assert meta["info"]["hub_label_column"] == "fine_label"
    test = datasets.load_from_disk(str(store / "test"))
    assert test["label"] == [0, 1] and np.asarray(test[1]["image"])[0, 0].tolist() == [60, 60, 60]


def test_hub_stores_only_the_mapped_splits_under_our_names(hub_repo: Path, tmp_path: Path) -> None:
    spec = _toy_spec(
        _toy_files(), hub_id=str(hub_repo), hub_splits={"train": "train", "test": "validation"},
        hub_image_column="img", hub_label_column="fine_label",
    )
    with registry.override(spec):
        store = prepare_dataset("toy", tmp_path / "data", source="hub", quiet=True)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["splits"] == {"train": 4, "test": 2}  # no "val", no "contrast"
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == ["test", "train"]
    assert meta["info"]["hub_splits"] == {"train": "train", "test": "validation"}


def test_hub_label_names_must_match_the_class_count(hub_repo: Path, tmp_path: Path) -> None:
    spec = _toy_spec(
        _toy_files(), num_classes=2 + len(CLASSES), hub_id=str(hub_repo), hub_splits={"test": "validation"},
        hub_label_column="fine_label",
    )
    with registry.override(spec), pytest.raises(FinebenchError, match=r"'fine_label' has 3 class names, .* has 5 classes"):
        prepare_dataset("toy", tmp_path / "data", source="hub", quiet=True)
    assert _leftovers(tmp_path / "data") == []


def test_hub_split_missing_from_the_copy_is_named(hub_repo: Path, tmp_path: Path) -> None:
    spec = _toy_spec(_toy_files(), hub_id=str(hub_repo), hub_splits={"train": "train", "test": "test"})
    with registry.override(spec), pytest.raises(FinebenchError, match=r"splits asked for: train, test"):
        prepare_dataset("toy", tmp_path / "data", source="hub", quiet=True)


def _assert_fast_one_line_hub_error(run, reason: str) -> None:
    started = time.monotonic()
    with pytest.raises(FinebenchError) as caught:
        run()
    assert time.monotonic() - started < 5  # datasets' own retries take ~20 s
    message = str(caught.value)
    assert "\n" not in message and reason in message
    assert "'uoft-cs/cifar10' of 'cifar10'" in message and "--from" in message and "--mirror" in message


def test_hub_with_hf_hub_offline_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _assert_fast_one_line_hub_error(lambda: prepare_dataset("cifar10", tmp_path, source="hub", quiet=True), "HF_HUB_OFFLINE")
    assert _leftovers(tmp_path) == []


def test_hub_host_unreachable_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port nobody listens on: connection refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _assert_fast_one_line_hub_error(
        lambda: prepare_dataset("cifar10", tmp_path, source="hub", quiet=True), f"127.0.0.1:{port} is unreachable"
    )


def test_concurrent_prepare_of_the_same_dataset_is_refused(toy, tmp_path: Path) -> None:
    spec, files, server = toy
    lock_path = tmp_path / ".toy.lock"
    with open(lock_path, "w") as held:  # what a running prepare holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FinebenchError, match=r"another prepare of 'toy' is running \(lock file .*\.toy\.lock\)"):
            prepare_dataset("toy", tmp_path, mirror=server.url, quiet=True)
        assert _leftovers(tmp_path) == []
    store = prepare_dataset("toy", tmp_path, mirror=server.url, quiet=True)  # released: builds
    assert (store / "meta.json").is_file()


def test_lock_is_held_by_a_running_prepare_in_another_process(toy, tmp_path: Path) -> None:
    """A real second process: a prepare blocked mid-parse holds the lock against this one."""
    spec, files, server = toy
    started, release = tmp_path / "started", tmp_path / "release"
    script = f"""
import time
from pathlib import Path
from finebench.data import registry
from finebench.data.builders.base import DatasetSpec, ParsedDataset
from finebench.data.prepare import prepare_dataset

def parse(raw_dir):
    Path({str(started)!r}).touch()
    while not Path({str(release)!r}).exists():
        time.sleep(0.05)
    return ParsedDataset(classes=["a", "b", "c"], splits={{"train": []}})

spec = DatasetSpec(name="toy", num_classes=3, split_sizes={{}}, protocol="p", terms="t", homepage="h", parse=parse, offline=True)
with registry.override(spec):
    prepare_dataset("toy", Path({str(tmp_path)!r}), quiet=True)
"""
    other = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert other.poll() is None, other.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(FinebenchError, match="another prepare of 'toy' is running"):
            prepare_dataset("toy", tmp_path, mirror=server.url, quiet=True)
    finally:
        release.touch()
        other.wait(timeout=60)


def test_data_root_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("x")
    with pytest.raises(FinebenchError, match=r"data root .*data is not a writable folder"):
        prepare_dataset("mnist5k", not_a_folder, quiet=True)
