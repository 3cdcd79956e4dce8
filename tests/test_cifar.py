"""CIFAR-10/100 end to end: miniature official-layout archives served over HTTP, prepared, read back."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest

from finebench.data import registry
from finebench.data.builders import cifar
from finebench.data.builders.base import DatasetSpec, Source
from finebench.data.prepare import prepare_dataset
from finebench.errors import FinebenchError

PER_CLASS = 2


def _pickle_bytes(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)  # the official files are protocol-2 pickles


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _batch(rng, labels: list[int], label_key: bytes) -> tuple[dict, np.ndarray]:
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return {b"batch_label": b"mini", label_key: labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}, data


def make_cifar10_archive(seed: int = 0) -> tuple[bytes, dict[str, tuple[np.ndarray, list[int]]]]:
    """A cifar-10-python.tar.gz with the official layout; returns (bytes, split -> (rows, labels))."""
    rng = np.random.default_rng(seed)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    truth: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        _add(tar, "cifar-10-batches-py/batches.meta", _pickle_bytes({b"label_names": names, b"num_vis": 3072}))
        for file_name, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]:
            labels = [int(x) for x in rng.permutation(np.repeat(np.arange(10), PER_CLASS // 2 + 1))]
            batch, data = _batch(rng, labels, b"labels")
            _add(tar, f"cifar-10-batches-py/{file_name}", _pickle_bytes(batch))
            truth[split][0].append(data)
            truth[split][1].extend(labels)
    return buffer.getvalue(), {k: (np.concatenate(v[0]), v[1]) for k, v in truth.items()}


def make_cifar100_archive(seed: int = 1) -> tuple[bytes, dict[str, tuple[np.ndarray, list[int]]]]:
    rng = np.random.default_rng(seed)
    fine = [f"class_{i:03d}".encode() for i in range(100)]
    coarse = [f"super_{i:02d}".encode() for i in range(20)]
    truth = {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        _add(tar, "cifar-100-python/meta", _pickle_bytes({b"fine_label_names": fine, b"coarse_label_names": coarse}))
        for split, per_class in (("train", PER_CLASS), ("test", 1)):
            labels = [int(x) for x in rng.permutation(np.repeat(np.arange(100), per_class))]
            batch, data = _batch(rng, labels, b"fine_labels")
            batch[b"coarse_labels"] = [label // 5 for label in labels]
            _add(tar, f"cifar-100-python/{split}", _pickle_bytes(batch))
            truth[split] = (data, labels)
    return buffer.getvalue(), truth


def _serve(server, name: str, archive: bytes) -> DatasetSpec:
    spec = registry.get_spec(name)
    source = spec.sources[0]
    server.add(source.filename, archive)
    return dataclasses.replace(spec, sources=(dataclasses.replace(source, md5=hashlib.md5(archive).hexdigest()),))


@pytest.mark.parametrize("name, make", [("cifar10", make_cifar10_archive), ("cifar100", make_cifar100_archive)])
def test_prepare_from_served_archive_keeps_pixels_labels_and_class_order(local_http_server, tmp_path: Path, name, make) -> None:
    archive, truth = make()
    with registry.override(_serve(local_http_server, name, archive)):
        store = prepare_dataset(name, tmp_path, mirror=local_http_server.url, quiet=True)

    meta = __import__("json").loads((store / "meta.json").read_text())
    expected_classes = ["airplane", "automobile", "bird"] if name == "cifar10" else ["class_000", "class_001", "class_002"]
    assert meta["classes"][:3] == expected_classes and len(meta["classes"]) == (10 if name == "cifar10" else 100)
    assert meta["splits"] == {split: len(labels) for split, (_, labels) in truth.items()}
    assert meta["sources"][registry.get_spec(name).sources[0].filename]["md5"] == hashlib.md5(archive).hexdigest()
    assert meta["image_size"] == [32, 32]
    for split, (rows, labels) in truth.items():
        stored = datasets.load_from_disk(str(store / split))
        assert stored.features["label"].names == meta["classes"]
        assert stored["label"] == labels
        for index in (0, len(labels) // 2, len(labels) - 1):
            pixels = np.asarray(stored[index]["image"])
            assert pixels.shape == (32, 32, 3)
            np.testing.assert_array_equal(pixels, rows[index].reshape(3, 32, 32).transpose(1, 2, 0))


def test_restricted_unpickler_refuses_code_and_does_not_run_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": [0]}, protocol=2))
    with pytest.raises(FinebenchError, match=r"refusing to unpickle .*data_batch_1.*(__builtin__|builtins)\.exec"):
        cifar.load_batch(tmp_path / "data_batch_1")
    assert not marker.exists()


def _python2_batch(dtype_state: bytes = b"NNN", data: bytes = bytes(range(256)) * 12) -> bytes:
    """A batch as Python 2's cPickle wrote the official files: str (not unicode) everywhere."""

    def short(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text

    return (
        b"\x80\x02}(" + short(b"data")
        + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
        + b"(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + short(b"|") + dtype_state + b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89T" + len(data).to_bytes(4, "little") + data + b"tb"
        + short(b"labels") + b"]K\x03a" + b"u."
    )


def test_python2_batches_as_officially_published_are_read(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(_python2_batch())
    batch = cifar.load_batch(tmp_path / "data_batch_1")
    np.testing.assert_array_equal(batch[b"data"], np.frombuffer(bytes(range(256)) * 12, np.uint8).reshape(1, 3072))
    assert batch[b"labels"] == [3]


@pytest.mark.parametrize(
    ("dtype_state", "data"),
    [(b"NN0", bytes(3072)), (b"NNN", bytes(3071)), (b"NNN", b"")],
    ids=["malformed-dtype-state", "short-array-data", "empty-array-data"],
)
def test_malformed_numpy_state_is_refused_without_crashing(tmp_path: Path, dtype_state: bytes, data: bytes) -> None:
    """numpy's dtype.__setstate__ segfaults on the first state: it must never reach numpy."""
    (tmp_path / "data_batch_1").write_bytes(_python2_batch(dtype_state, data))
    with pytest.raises(FinebenchError, match=r"data_batch_1"):
        cifar.load_batch(tmp_path / "data_batch_1")


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": np.array([1, "x"], dtype=object)}, protocol=2))
    with pytest.raises(FinebenchError, match=r"refusing to unpickle .*data_batch_1.*not plain numeric"):
        cifar.load_batch(tmp_path / "data_batch_1")


def test_malicious_batch_inside_an_archive_stops_prepare(local_http_server, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        _add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(Exploit(), protocol=2))
    with registry.override(_serve(local_http_server, "cifar10", buffer.getvalue())):
        with pytest.raises(FinebenchError, match=r"refusing to unpickle .*batches.meta"):
            prepare_dataset("cifar10", tmp_path / "data", mirror=local_http_server.url, quiet=True)
    assert not marker.exists()
    assert not (tmp_path / "data" / "cifar10").exists()


def test_cifar_specs_carry_the_official_checksums() -> None:
    md5s = {spec.name: spec.sources[0].md5 for spec in cifar.SPECS}
    assert md5s == {"cifar10": "c58f30108f718f92721af3b95e74349a", "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}
    assert all(isinstance(s, Source) and s.url.startswith("https://www.cs.toronto.edu/") for spec in cifar.SPECS for s in spec.sources)
