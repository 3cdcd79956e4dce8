"""Small readers the builders share, so every official layout is parsed with the same checks.

Each reader fails with a ``FinebenchError`` that names the file and what was expected, because a
half-extracted or wrongly placed ``--from`` folder is the most common way a prepare goes wrong.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image

from finebench.data.builders.base import Example
from finebench.errors import FinebenchError

T = TypeVar("T")


class LazyExamples(Sequence[Example], Generic[T]):
    """A sized, re-iterable split whose examples are made only when read.

    Builders that must re-encode (crops) would otherwise hold every decoded image in memory at
    once; this keeps one image alive at a time while ``len()`` stays available to the store.
    """

    def __init__(self, items: Sequence[T], make: Callable[[T], Example]) -> None:
        self._items = list(items)
        self._make = make

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        return self._make(self._items[index])

    def __iter__(self) -> Iterator[Example]:
        for item in self._items:
            yield self._make(item)


class MissingLayoutPath(FinebenchError):
    """A file or folder the official layout needs is absent.

    ``path`` lets ``prepare --from`` tell which source file the user still has to fetch.
    """

    def __init__(self, path: Path, kind: str, what: str = "") -> None:
        hint = f" ({what})" if what else ""
        super().__init__(f"missing {kind} {path}{hint}: the dataset layout is incomplete")
        self.path = path


def require_file(path: Path, what: str = "") -> Path:
    """``path`` if it is a file, else a user error naming it (and what holds it)."""
    if not path.is_file():
        raise MissingLayoutPath(path, "file", what)
    return path


def require_dir(path: Path, what: str = "") -> Path:
    if not path.is_dir():
        raise MissingLayoutPath(path, "folder", what)
    return path


def read_rows(
    path: Path, *, min_fields: int, header: bool = False, sep: str | None = None, maxsplit: int = -1
) -> list[list[str]]:
    """Non-empty, non-comment lines of a whitespace (or ``sep``) separated text file, split into fields."""
    require_file(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows: list[list[str]] = []
    for number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        if not line.strip() or line.startswith("#"):  # Pets' list.txt opens with # comments
            continue
        fields = line.rstrip("\r\n").split(sep, maxsplit) if sep else line.split(None, maxsplit)
        if len(fields) < min_fields:
            raise FinebenchError(f"{path}, line {number}: expected at least {min_fields} fields, got {line!r}")
        rows.append(fields)
    return rows


def parse_int(value: str, path: Path, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FinebenchError(f"{path}: field {field} must be an integer, got {value!r}") from None


def load_mat(path: Path) -> dict[str, Any]:
    """A MATLAB file as scipy reads it with ``squeeze_me`` (scalars and 1-D cells come out flat)."""
    from scipy.io import loadmat

    require_file(path)
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as error:  # scipy raises several types for a damaged file
        raise FinebenchError(f"{path}: not a readable MATLAB .mat file ({error})") from None


def mat_field(mat: dict[str, Any], key: str, path: Path) -> Any:
    if key not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__"))
        raise FinebenchError(f"{path}: expected variable {key!r}, found {found or 'none'}")
    return mat[key]


def as_list(value: Any) -> list[Any]:
    """A squeezed MATLAB array as a Python list; a 1-element array squeezes to a scalar."""
    return np.atleast_1d(np.asarray(value)).ravel().tolist()


def labels_from_one_based(values: Sequence[int], num_classes: int, path: Path) -> list[int]:
    """0-based labels from the 1-based ids most official files use, range-checked."""
    labels = [int(v) - 1 for v in values]
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise FinebenchError(f"{path}: class id {bad[0] + 1} is outside 1..{num_classes}")
    return labels


CROP_JPEG_QUALITY = 95


def cropped(path: Path, box: tuple[int, int, int, int]) -> bytes:
    """The ``box`` (left, top, right, bottom; clipped to the image) of an image file as JPEG bytes.

    Crops must be re-encoded; JPEG at quality 95 keeps them close to the source and small (a PNG
    of every FGVC-Aircraft photo would be several times the size of the original archive).
    """
    with Image.open(path) as image:
        image.load()
        left, top, right, bottom = box
        right, bottom = min(right, image.width), min(bottom, image.height)
        left, top = max(0, min(left, right - 1)), max(0, min(top, bottom - 1))
        crop = image.convert("RGB").crop((left, top, right, bottom))
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=CROP_JPEG_QUALITY)
    return buffer.getvalue()
