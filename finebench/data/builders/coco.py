"""COCO-style annotation files (``images``, ``annotations``, ``categories``) as iNaturalist ships them: each
listed image with its one category, every inconsistency named with the file and the entry.

Memory is the point of the fast path: iNat 2021's train.json lists 2.7 million images with ten fields each,
a few hundred bytes apiece as Python dicts. While ``json`` parses, a hook keeps only the fields used, in
compact arrays (``_Collector``), and the checks run on numpy arrays. Anything the fast path does not
recognise (a malformed entry, a duplicate, an unknown id, an unusual file name) sends the file through the
plain reading and checks, which name the first problem exactly as they always have.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from finebench.data.builders._layout import require_file
from finebench.errors import FinebenchError

_INT64 = (-(2**63), 2**63)


NAMES_BLOCK = 4096
"""Names per block of ``Names``: a block is one ``str``, so none is as large as the whole list."""


class Names(Sequence[str]):
    """Strings kept as blocks of joined text and where each ends in its block: about half the memory of a list
    of ``str`` (a ``str`` object costs 49 bytes before its characters), 130 MB less for iNat 2021's 2.7 million
    file names."""

    def __init__(self, blocks: list[str], ends: array) -> None:
        self.blocks, self.ends = blocks, ends

    def __len__(self) -> int:
        return len(self.ends)

    def __iter__(self) -> Iterator[str]:
        for index in range(len(self.ends)):
            yield self[index]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self.ends)
        block, first = divmod(index, NAMES_BLOCK)
        end = self.ends[index]  # raises IndexError past the end, as a list does
        return self.blocks[block][self.ends[index - 1] if first else 0:end]


class _NamesBuilder:
    """``Names`` appended one at a time, joined a block at a time so no list of every name is held."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.pending: list[str] = []
        self.ends = array("q")
        self.length = 0

    def append(self, name: str) -> None:
        self.pending.append(name)
        self.length += len(name)
        self.ends.append(self.length)
        if len(self.pending) == NAMES_BLOCK:
            self.blocks.append("".join(self.pending))
            self.pending, self.length = [], 0

    def __len__(self) -> int:
        return len(self.ends)

    def finish(self) -> Names:
        if self.pending:
            self.blocks.append("".join(self.pending))
        names = Names(self.blocks, self.ends)
        self.blocks, self.pending = [], []
        return names


@dataclass
class SplitList:
    """A file's images in its order: their ``file_name``\\ s and category ids."""

    names: Sequence[str]
    category_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and _INT64[0] <= value < _INT64[1]


class _Taken:
    """Left in a list where the collector took a well-formed entry (JSON cannot produce it)."""


_IMAGE, _ANNOTATION = _Taken(), _Taken()


class _Collector:
    """``object_pairs_hook`` that takes well-formed image and annotation entries into arrays."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.image_ids, self.names = array("q"), _NamesBuilder()
        self.annotation_images, self.annotation_categories = array("q"), array("q")

    def __call__(self, pairs: list[tuple[str, Any]]) -> Any:
        entry = dict(pairs)
        if "file_name" in entry:
            if _is_int(entry.get("id")) and isinstance(entry["file_name"], str) and "image_id" not in entry:
                self.image_ids.append(entry["id"])
                self.names.append(entry["file_name"])
                return _IMAGE
        elif "image_id" in entry and _is_int(entry["image_id"]) and _is_int(entry.get("category_id")):
            self.annotation_images.append(entry["image_id"])
            self.annotation_categories.append(entry["category_id"])
            return _ANNOTATION
        return entry


READ_CHARS = 1 << 20
"""Characters of an annotation file held at a time while it is parsed (``_Incremental``)."""
_WHITESPACE = " \t\n\r"
_MAX_VALUE_CHARS = 16 * READ_CHARS
"""A value (an entry, or a member that is not a list) longer than this is read by the whole-file parse."""


class _Incremental:
    """A JSON document whose top level is an object, parsed ``READ_CHARS`` at a time: each member's value, and
    each element of a top-level array, by ``JSONDecoder.raw_decode`` (C), so the whole text (as large as
    the entries it lists) is never held. Raises ``ValueError`` on anything malformed; the caller then parses
    the file whole, for ``json``'s own message with its line and column."""

    def __init__(self, handle, decoder: json.JSONDecoder) -> None:
        self.handle, self.decoder = handle, decoder
        self.text, self.at, self.ended = "", 0, False

    def _more(self) -> bool:
        if self.ended:
            return False
        chunk = self.handle.read(READ_CHARS)
        self.ended = not chunk
        self.text = self.text[self.at:] + chunk
        self.at = 0
        return bool(chunk)

    def _peek(self) -> str:
        while True:
            while self.at < len(self.text) and self.text[self.at] in _WHITESPACE:
                self.at += 1
            if self.at < len(self.text) or not self._more():
                return self.text[self.at:self.at + 1]

    def _expect(self, characters: str) -> str:
        found = self._peek()
        if not found or found not in characters:
            raise ValueError(f"expected one of {characters!r}")
        self.at += 1
        return found

    def _value(self) -> Any:
        self._peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.at)
            except json.JSONDecodeError:
                # Cut off by the chunk's end: read on, unless it is no element's size (then an error).
                if len(self.text) - self.at > _MAX_VALUE_CHARS or not self._more():
                    raise
                continue
            if end == len(self.text) and self.text[self.at] not in '{["' and self._more():
                continue  # a number or literal may go on in the next chunk (objects, lists, strings end by themselves)
            self.at = end
            return value

    def _array(self) -> list[Any]:
        items: list[Any] = []
        self._expect("[")
        if self._peek() == "]":
            self.at += 1
            return items
        while True:
            items.append(self._value())
            if self._expect(",]") == "]":
                return items

    def document(self, hook) -> Any:
        pairs: list[tuple[str, Any]] = []
        self._expect("{")
        if self._peek() != "}":
            while True:
                if self._peek() != '"':
                    raise ValueError("expected a member name")
                key = self._value()
                self._expect(":")
                pairs.append((key, self._array() if self._peek() == "[" else self._value()))
                if self._expect(",}") == "}":
                    break
        else:
            self.at += 1
        if self._peek():
            raise ValueError("extra data after the document")
        return hook(pairs) if hook is not None else dict(pairs)


def _read(path: Path, hook=None) -> dict[str, Any]:
    require_file(path, "an annotation file of the dataset")
    try:
        try:
            with open(path, encoding="utf-8") as handle:
                data = _Incremental(handle, json.JSONDecoder(object_pairs_hook=hook)).document(hook)
        except ValueError:  # json's own message, with line and column (a JSONDecodeError is a ValueError)
            if isinstance(hook, _Collector):
                hook.clear()
            data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=hook)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FinebenchError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise FinebenchError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise FinebenchError(f"{path}: expected a list under {key!r} (COCO-style annotation file)")
    return data


@dataclass
class AnnotationFile:
    """A parsed annotation file: its categories (as dicts) and its images and annotations (collected)."""

    path: Path
    data: dict[str, Any]
    collected: _Collector


def load(path: Path) -> AnnotationFile:
    collector = _Collector()
    return AnnotationFile(path, _read(path, collector), collector)


def field(entry: Any, key: str, path: Path, what: str, index: int, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(entry, dict) or not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
        shown = json.dumps(entry)[:120] if isinstance(entry, (dict, list)) else repr(entry)
        raise FinebenchError(f"{path}: {what} #{index} has no valid {key!r} ({shown})")
    return entry[key]


def categories_of(data: dict[str, Any], path: Path) -> dict[int, dict[str, Any]]:
    """category id -> its entry; ids must be unique."""
    found: dict[int, dict[str, Any]] = {}
    for index, entry in enumerate(data["categories"]):
        category_id = field(entry, "id", path, "category", index, int)
        if category_id in found:
            raise FinebenchError(f"{path}: category id {category_id} is listed twice")
        found[category_id] = entry
    return found


def _checked_plainly(data: dict[str, Any], path: Path, roots: tuple[str, ...], categories: Mapping[int, Any]) -> SplitList:
    """Every entry checked one by one; the first inconsistency raised with its file, entry and ids."""
    file_of: dict[int, str] = {}
    for index, entry in enumerate(data["images"]):
        image_id = field(entry, "id", path, "image", index, int)
        file_name = field(entry, "file_name", path, "image", index, str)
        parts = PurePosixPath(file_name).parts
        if image_id in file_of:
            raise FinebenchError(f"{path}: image id {image_id} is listed twice")
        if len(parts) < 2 or parts[0] not in roots or ".." in parts or file_name.startswith("/"):
            raise FinebenchError(
                f"{path}: image id {image_id} has file_name {file_name!r}, expected a path under "
                f"{' or '.join(r + '/' for r in roots)}"
            )
        file_of[image_id] = file_name
    category_of: dict[int, int] = {}
    for index, entry in enumerate(data["annotations"]):
        image_id = field(entry, "image_id", path, "annotation", index, int)
        category_id = field(entry, "category_id", path, "annotation", index, int)
        where = f"annotation #{index} (id {entry.get('id')}) of image {image_id}"
        if image_id not in file_of:
            raise FinebenchError(f"{path}: {where} refers to no listed image")
        if category_id not in categories:
            raise FinebenchError(
                f"{path}: {where} ({file_of[image_id]}) has category_id {category_id}, which is not in the "
                f"taxonomy ({len(categories)} categories, ids {min(categories)}..{max(categories)})"
            )
        if category_of.setdefault(image_id, category_id) != category_id:
            raise FinebenchError(
                f"{path}: image id {image_id} ({file_of[image_id]}) has two categories, "
                f"{category_of[image_id]} and {category_id}"
            )
    unlabelled = [image_id for image_id in file_of if image_id not in category_of]
    if unlabelled:
        raise FinebenchError(
            f"{path}: image id {unlabelled[0]} ({file_of[unlabelled[0]]}) has no annotation "
            f"({len(unlabelled)} images without one)"
        )
    return SplitList(list(file_of.values()), np.asarray([category_of[i] for i in file_of], np.int64))


def _plain_name(name: str, roots: tuple[str, ...]) -> bool:
    """A ``file_name`` the plain check accepts as it is, told without building a path."""
    segments = name.split("/")
    return (len(segments) >= 2 and segments[0] in roots and "" not in segments and "." not in segments
            and ".." not in segments)


def _checked_fast(loaded: AnnotationFile, roots: tuple[str, ...], categories: Mapping[int, Any]) -> SplitList | None:
    """The same checks on the collected arrays; ``None`` at the first doubt (the plain check then decides)."""
    collected, data = loaded.collected, loaded.data
    names = collected.names.finish()
    if len(data["images"]) != len(names) or len(data["annotations"]) != len(collected.annotation_images):
        return None
    if any(entry is not _IMAGE for entry in data["images"]) or any(e is not _ANNOTATION for e in data["annotations"]):
        return None
    data["images"] = data["annotations"] = None  # placeholders only, checked; the plain check reads the file anew
    if not all(_plain_name(name, roots) for name in names):
        return None
    ids = np.frombuffer(collected.image_ids, np.int64) if names else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    if len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any():
        return None
    images = np.frombuffer(collected.annotation_images, np.int64) if len(collected.annotation_images) else np.zeros(0, np.int64)
    labels = (np.frombuffer(collected.annotation_categories, np.int64) if len(collected.annotation_categories)
              else np.zeros(0, np.int64))
    if not len(ordered):
        return SplitList(names, np.zeros(0, np.int64)) if not len(images) else None
    position = np.minimum(np.searchsorted(ordered, images), len(ordered) - 1)
    if not (ordered[position] == images).all():
        return None
    known = np.fromiter(categories, np.int64, len(categories))
    if not np.isin(labels, known).all():
        return None
    count = len(ordered)
    del ordered, ids  # the arrays of a million-image file are 8 MB each: no more alive at once than needed
    category = np.zeros(count, np.int64)
    labelled = np.zeros(count, bool)
    category[position] = labels
    labelled[position] = True
    if not labelled.all() or not (category[position] == labels).all():
        return None
    del position, labelled
    in_file_order = np.empty_like(category)
    in_file_order[order] = category
    return SplitList(names, in_file_order)


def split_images(loaded: AnnotationFile, roots: tuple[str, ...], categories: Mapping[int, Any]) -> SplitList:
    """Each image with its one category, in the file's image order; every inconsistency is named."""
    listed = _checked_fast(loaded, roots, categories)
    if listed is None:
        listed = _checked_plainly(_read(loaded.path), loaded.path, roots, categories)
    return listed
