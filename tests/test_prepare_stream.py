"""``prepare`` at real size: sharded writing with worker processes, streamed image archives, resume.

The stores of the datasets that existed before sharding must hold the same rows (frozen content
digests below, taken with the writer that came before), and a prepare killed mid-way must, run
again, end with the store an uninterrupted one writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import archives
import pyarrow as pa
import pytest
from test_builders import prepare_via_server
from tiny_data import DATASET, prepare_tiny_bars


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


def test_print_digests(tmp_path, local_http_server):
    root = prepare_tiny_bars(tmp_path / "bars", 40, 20)
    print("BARS", store_digests(root / DATASET))
    mini = archives.inat("2018")
    store = prepare_via_server(mini, local_http_server, tmp_path / "data")
    print("INAT", store_digests(store))
