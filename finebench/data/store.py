"""The prepared store as its readers see it: where it is, whether it is complete, its meta.json, its splits.

Layout: ``<data_root>/<name>/<split>/`` (``Dataset.save_to_disk``'s) with columns ``image``
(``datasets.Image``, encoded bytes) and ``label`` (``ClassLabel`` in the dataset's official id order), plus
``group`` (``ClassLabel``, e.g. iNat's supercategory) for datasets whose builder gives one, and
``<data_root>/<name>/meta.json``, written last: a store is complete exactly when it exists.
Writing is elsewhere: ``writer.py`` (splits and meta.json), ``shards.py`` (the Arrow files), ``staging.py``
(streamed archives), ``builds.py`` (the build folder and resuming it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finebench.errors import FinebenchError

META_FILE = "meta.json"
GROUP_COLUMN = "group"
"""The optional per-image group column (iNat's supercategory); meta.json ``groups`` names its values."""
STORE_FORMAT = 1
"""Version of this layout and meta.json schema (meta ``version``); bump on incompatible change."""


def store_dir(data_root: Path, name: str) -> Path:
    return Path(data_root) / name


def is_prepared(data_root: Path, name: str) -> bool:
    return (store_dir(data_root, name) / META_FILE).is_file()


def prepare_command(name: str, data_root: Path, *, force: bool = False) -> str:
    """The command that (re)builds a store, with the data root it lives in: a hint that left out
    ``--data-root`` would rebuild the default root's store, not the broken one."""
    return f"finebench prepare {name} --data-root {Path(data_root)}" + (" --force" if force else "")


def read_meta(data_root: Path, name: str) -> dict[str, Any]:
    path = store_dir(data_root, name) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FinebenchError(
            f"dataset {name!r} is not prepared in {Path(data_root)}: run `{prepare_command(name, data_root)}`, "
            "or point --data-root or FINEBENCH_DATA at the folder where you prepared it"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FinebenchError(f"{path} is not valid JSON ({error}): rerun `{prepare_command(name, data_root, force=True)}`") from error


def check_store_info(meta: dict[str, Any], name: str, data_root: Path) -> None:
    """Refuse a store whose ``info`` lacks what its dataset now promises (``DatasetSpec.store_info``)."""
    from finebench.data.registry import get_spec

    try:
        promised = get_spec(name).store_info
    except FinebenchError:  # a store of no registered dataset (the tests' own): nothing promised
        return
    info = meta.get("info") or {}
    for key, expected in promised.items():
        if info.get(key) != expected:
            found = "missing" if key not in info else repr(info[key])
            raise FinebenchError(
                f"{store_dir(data_root, name) / META_FILE}: info {key!r} is {found}, expected {expected!r} "
                f"(prepared by another finebench version): rebuild it with `{prepare_command(name, data_root, force=True)}`"
            )


def meta_digest(data_root: Path, name: str) -> str | None:
    """``sha256:<hex>`` of the store's meta.json, which names one prepared build (its sources'
    checksums, split sizes, creation time): what a run records to say which data it trained on."""
    import hashlib

    path = store_dir(data_root, name) / META_FILE
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def read_split(split_dir: Path):
    """A stored split as one memory-mapped ``pyarrow.Table`` (nothing copied, nothing decoded), read from
    the files its ``state.json`` lists, as ``datasets.load_from_disk`` reads them but without importing
    ``datasets`` (about a second of start-up for every run) or building a ``Dataset`` around it.
    Raises ``OSError``/``ValueError``/``KeyError``/``pyarrow.ArrowException`` on a damaged folder."""
    import pyarrow as pa

    state = json.loads((Path(split_dir) / "state.json").read_text(encoding="utf-8"))
    tables = [pa.ipc.open_stream(pa.memory_map(str(Path(split_dir) / entry["filename"]))).read_all()
              for entry in state["_data_files"]]
    return pa.concat_tables(tables) if len(tables) != 1 else tables[0]


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
