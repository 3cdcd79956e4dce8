"""The Arrow store: bytes kept as given, resize on request, class order, meta.json written last."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from finebench.data import builds, store, writer
from finebench.data.builders.base import Example, ParsedDataset
from finebench.errors import FinebenchError


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def _write(tmp_path: Path, parsed: ParsedDataset, **kwargs) -> tuple[Path, dict]:
    build = builds.new_build_dir(tmp_path, "unit")
    meta = writer.write_store(parsed, build, {"name": "unit"}, quiet=True, **kwargs)
    return build, meta


def test_jpeg_files_are_stored_byte_for_byte(tmp_path: Path) -> None:
    jpeg = _jpeg(40, 30)
    (tmp_path / "a.jpg").write_bytes(jpeg)
    build, meta = _write(tmp_path, ParsedDataset(["x"], {"train": [Example(tmp_path / "a.jpg", 0), Example(jpeg, 0)]}))
    table = datasets.load_from_disk(str(build / "train")).cast_column("image", datasets.Image(decode=False))
    assert [row["image"]["bytes"] for row in table] == [jpeg, jpeg]
    assert table[0]["image"]["path"] == "a.jpg"
    assert meta["image_size"] == [40, 30] and meta["resize"] is None


def test_max_side_shrinks_the_longest_side_and_keeps_jpeg(tmp_path: Path) -> None:
    parsed = ParsedDataset(["x"], {"train": [Example(_jpeg(200, 100), 0), Example(_jpeg(20, 10), 0)]})
    build, meta = _write(tmp_path, parsed, max_side=50)
    images = [row["image"] for row in datasets.load_from_disk(str(build / "train"))]
    assert [image.size for image in images] == [(50, 25), (20, 10)]
    assert images[0].format == "JPEG"
    assert meta["resize"] == {"max_side": 50} and meta["image_max_side"] == 50


def test_short_side_stores_at_training_scale_never_enlarges_and_is_recorded(tmp_path: Path) -> None:
    parsed = ParsedDataset(["x"], {"train": [Example(_jpeg(300, 200), 0), Example(_jpeg(60, 90), 0), Example(_jpeg(20, 10), 0)]})
    build, meta = _write(tmp_path, parsed, short_side=50)
    images = [row["image"] for row in datasets.load_from_disk(str(build / "train"))]
    assert [image.size for image in images] == [(75, 50), (50, 75), (20, 10)]
    assert images[0].format == "JPEG"
    assert meta["resize"] == {"short_side": 50}


def test_max_side_and_short_side_together_take_the_smaller_scale(tmp_path: Path) -> None:
    parsed = ParsedDataset(["x"], {"train": [Example(_jpeg(400, 100), 0), Example(_jpeg(120, 100), 0)]})
    build, meta = _write(tmp_path, parsed, max_side=200, short_side=50)
    images = [row["image"] for row in datasets.load_from_disk(str(build / "train"))]
    assert [image.size for image in images] == [(200, 50), (60, 50)]
    assert meta["resize"] == {"max_side": 200, "short_side": 50}


def test_prepare_refuses_a_tiny_short_side_before_writing_anything(tmp_path: Path) -> None:
    from finebench.data.prepare import prepare_dataset

    with pytest.raises(FinebenchError, match="--short-side 4 is too small: expected at least 8"):
        prepare_dataset("mnist5k", tmp_path / "data", short_side=4, quiet=True)
    assert not (tmp_path / "data").exists()


def test_arrays_become_png_with_exact_pixels_and_class_order_is_kept(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    classes = ["1", "2", "10"]  # official id order; sorting would give 1, 10, 2
    build, meta = _write(tmp_path, ParsedDataset(classes, {"test": [Example(gray, 2)]}))
    stored = datasets.load_from_disk(str(build / "test"))
    assert stored.features["label"].names == classes and stored[0]["label"] == 2
    assert stored[0]["image"].format == "PNG"
    np.testing.assert_array_equal(np.asarray(stored[0]["image"]), gray)
    saved = json.loads((build / "meta.json").read_text())
    assert saved["classes"] == classes and saved["splits"] == {"test": 1} and saved["finebench_version"]


def test_out_of_range_label_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FinebenchError, match="label 3 outside 0..1"):
        _write(tmp_path, ParsedDataset(["a", "b"], {"train": [Example(np.zeros((4, 4), np.uint8), 3)]}))


def test_a_build_without_meta_is_never_committed(tmp_path: Path) -> None:
    build = builds.new_build_dir(tmp_path, "unit")
    with pytest.raises(RuntimeError, match="no meta.json"):
        builds.commit_build(build, tmp_path / "unit")
    assert not store.is_prepared(tmp_path, "unit")


def test_stale_partials_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / "unit.partial-999999999-deadbeef"
    stale.mkdir(parents=True)
    live = builds.new_build_dir(tmp_path, "unit")
    assert not stale.exists() and live.exists()
    assert builds.new_build_dir(tmp_path, "unit") != live and live.exists()


def test_read_meta_of_unprepared_dataset_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(FinebenchError, match=r"dataset 'unit' is not prepared in .*: run `finebench prepare unit --data-root "):
        store.read_meta(tmp_path, "unit")


def test_a_missing_image_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FinebenchError, match=r"cannot read image .*gone.jpg of split 'train'"):
        _write(tmp_path, ParsedDataset(["x"], {"train": [Example(tmp_path / "gone.jpg", 0)]}))
