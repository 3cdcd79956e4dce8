"""CIFAR-10 and CIFAR-100 from the official python-pickle archives.

The batches are pickles, and unpickling runs whatever callables the file names; so they are
read with an unpickler that resolves only the numpy internals an ndarray needs. Anything else
(``os.system`` in a crafted ``__reduce__``, say) is refused before it can be called.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from finebench.data.builders._layout import require_file
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.errors import FinebenchError

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
}


class _RestrictedUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD step can be checked
    """Resolves only what an ndarray needs, and checks every BUILD state before numpy sees it.

    Allow-listing globals is not enough: numpy's own ``dtype.__setstate__`` crashes the process
    on some malformed states, so a crafted batch could kill the interpreter. A dtype state must
    equal the one the dtype already has; an array state must be a plain, self-consistent one.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def _refuse(self, what: str) -> FinebenchError:
        return FinebenchError(f"refusing to unpickle {self.path}: {what}, which a CIFAR batch never holds")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise self._refuse(f"it references {module}.{name}")
        return super().find_class(module, name)

    def load_build(self) -> None:
        state = self.stack[-1]
        target = self.stack[-2]
        if isinstance(target, np.dtype):
            # Python 2 pickles (the official batches) spell the byte order as bytes
            as_text = tuple(x.decode("latin1") if isinstance(x, bytes) else x for x in state) \
                if type(state) is tuple else state
            if as_text != target.__reduce__()[2]:
                raise self._refuse(f"a dtype state {state!r:.80} unlike that of {target}")
            self.stack.pop()  # the dtype already has exactly this state
            return
        if isinstance(target, np.ndarray):
            if not (
                type(state) is tuple and len(state) == 5 and isinstance(state[1], tuple)
                and all(type(n) is int and n >= 0 for n in state[1])
                and isinstance(state[2], np.dtype) and not state[2].hasobject
                and isinstance(state[4], bytes)
                and len(state[4]) == int(np.prod(state[1], dtype=np.int64)) * state[2].itemsize
            ):
                raise self._refuse(f"an array state {state!r:.80} that is not plain numeric data")
        else:
            raise self._refuse(f"a {type(target).__name__} with a state")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def load_batch(path: Path) -> dict[bytes, Any]:
    """One CIFAR batch (a dict with bytes keys) read without executing untrusted code."""
    require_file(path, "a CIFAR batch of the official archive")
    with open(path, "rb") as handle:
        try:
            batch = _RestrictedUnpickler(handle, path).load()
        except FinebenchError:
            raise
        except Exception as error:  # a damaged pickle fails in many ways (struct, memo, numpy errors)
            raise FinebenchError(f"cannot read CIFAR batch {path}: {error}") from error
    if not isinstance(batch, dict):
        raise FinebenchError(f"CIFAR batch {path} holds a {type(batch).__name__}, expected a dict")
    return batch


class _Batches:
    """Examples of several batch files, read one file at a time so only one is in memory."""

    def __init__(self, files: list[Path], label_key: bytes) -> None:
        self.files = files
        self.label_key = label_key

    def __iter__(self) -> Iterator[Example]:
        for path in self.files:
            batch = load_batch(path)
            try:
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                labels = batch[self.label_key]
            except KeyError as error:
                raise FinebenchError(f"CIFAR batch {path} has no {error.args[0]!r} entry") from error
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise FinebenchError(f"CIFAR batch {path}: data shape {data.shape} and {len(labels)} labels, expected N x 3072 and N labels")
            # Rows are the R, G and B planes of a 32x32 image, each row-major.
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for image, label in zip(images, labels):
                yield Example(image=np.ascontiguousarray(image), label=int(label))


def _names(meta_path: Path, key: bytes) -> list[str]:
    meta = load_batch(meta_path)
    if key not in meta:
        raise FinebenchError(f"{meta_path} has no {key.decode()!r} entry")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def parse_cifar10(raw_dir: Path) -> ParsedDataset:
    root = raw_dir / "cifar-10-batches-py"
    return ParsedDataset(
        classes=_names(root / "batches.meta", b"label_names"),
        splits={
            "train": _Batches([root / f"data_batch_{i}" for i in range(1, 6)], b"labels"),
            "test": _Batches([root / "test_batch"], b"labels"),
        },
    )


def parse_cifar100(raw_dir: Path) -> ParsedDataset:
    root = raw_dir / "cifar-100-python"
    return ParsedDataset(
        classes=_names(root / "meta", b"fine_label_names"),
        splits={"train": _Batches([root / "train"], b"fine_labels"), "test": _Batches([root / "test"], b"fine_labels")},
        info={"coarse_classes": _names(root / "meta", b"coarse_label_names"), "labels": "fine"},
    )


_PROTOCOL = "top-1 accuracy on the official 10,000-image test split; no validation split"

def _cifar_spec(classes: int, parse: Callable[[Path], ParsedDataset], md5: str, protocol: str,
                label_column: str, description: str) -> DatasetSpec:
    """CIFAR-10 and CIFAR-100 share their host, layout and Hub copy's columns; they differ in these."""
    archive = f"cifar-{classes}-python.tar.gz"
    return DatasetSpec(
        name=f"cifar{classes}",
        num_classes=classes,
        split_sizes={"train": 50000, "test": 10000},
        protocol=protocol,
        terms="free",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        parse=parse,
        sources=(Source(archive, url=f"https://www.cs.toronto.edu/~kriz/{archive}", md5=md5),),
        hub_id=f"uoft-cs/cifar{classes}",
        hub_splits={"train": "train", "test": "test"},
        hub_image_column="img",
        hub_label_column=label_column,
        input_size=32,
        description=description,
    )


SPECS = [
    _cifar_spec(10, parse_cifar10, "c58f30108f718f92721af3b95e74349a", _PROTOCOL, "label",
                "CIFAR-10: 32x32 colour images, 10 classes"),
    _cifar_spec(100, parse_cifar100, "eb9058c3a382ffc7106e4002c42a8d85", _PROTOCOL + "; fine (100-class) labels",
                "fine_label", "CIFAR-100: 32x32 colour images, 100 fine classes (20 coarse)"),
]
