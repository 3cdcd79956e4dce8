"""``finebench prepare``: resolve a dataset's files, verify them, parse them, store them.

Where the files come from, in order of the options:

- ``--source hub``: the spec's Hugging Face Hub copy through ``datasets.load_dataset``; only the
  splits in ``spec.hub_splits`` are read, stored under finebench's names. Without a network (or
  with ``HF_HUB_OFFLINE=1``) this fails within seconds instead of after the library's retries.
- ``--from PATH``: a folder (or single file) the user already has. Source files found there by
  name are verified; archives are extracted, plain files used as they are. A source that is
  absent is expected in its extracted form in the same folder (e.g. ``jpg/`` for Flowers'
  ``102flowers.tgz``); only if parsing then misses a file is the user told which source to get.
- otherwise each ``Source.url`` (or ``<mirror>/<filename>`` with ``--mirror``), downloaded into
  ``<data_root>/.downloads/<name>/`` and kept there, so ``--force`` does not download again.
- ``spec.offline``: nothing to fetch; the builder reads data shipped in an installed package.

A build holds ``<data_root>/.<name>.lock`` (``flock``), so a second prepare of the same dataset
is refused instead of both building and the later one silently winning.

Builders (``finebench/data/builders/<family>.py``) only provide ``SPECS`` with a ``parse``;
everything here is shared. Extraction goes into the build folder and is deleted once the
store is written, so a finished store holds only Arrow files and ``meta.json``. Image archives a
builder can stream (``Source.stream``: iNaturalist's) are not extracted at all: the store reads them
member by member. The build folder is ``<data_root>/<name>.partial`` and is written shard by shard
(``store.py``), so a prepare that was killed continues, run again with the same files and options,
from its last finished shard; a failure of the data itself removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from finebench.console import make_console
from finebench.data import download, store
from finebench.data.builders._layout import MissingLayoutPath
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.data.registry import get_spec
from finebench.errors import FinebenchError

SOURCES = ("official", "hub")


def _where_to_get(spec: DatasetSpec, source: Source) -> str:
    if source.url:
        return source.url
    return spec.manual_instructions or spec.homepage


def _expected_files_text(spec: DatasetSpec, with_instructions: bool = True) -> str:
    """Each file with its URL; files without one share the spec's instructions, said once (not once a file)."""
    parts = [f"{s.filename} from {s.url}" for s in spec.sources if s.url]
    unlinked = [s.filename for s in spec.sources if not s.url]
    if unlinked:
        where = f" (from {spec.manual_instructions or spec.homepage})" if with_instructions else ""
        parts.append(", ".join(unlinked) + where)
    return "; ".join(parts)


def _manual_error(spec: DatasetSpec) -> FinebenchError:
    return FinebenchError(
        f"dataset {spec.name!r} cannot be downloaded automatically ({spec.terms}): "
        f"{spec.manual_instructions or 'see ' + spec.homepage} Then run "
        f"`finebench prepare {spec.name} --from DIR` with DIR holding: {_expected_files_text(spec, False)}"
    )


def _urls(spec: DatasetSpec, source: Source, mirror: str | None) -> list[str]:
    if mirror:
        return [f"{mirror.rstrip('/')}/{source.filename}"]
    urls = [u for u in (source.url, *source.mirrors) if u]
    if not urls:
        raise FinebenchError(
            f"{source.filename} of dataset {spec.name!r} has no download URL: fetch it from "
            f"{_where_to_get(spec, source)} and use --from DIR, or try --source hub"
        )
    return urls


def _offline_hint(spec: DatasetSpec, mirror: str | None) -> str:
    """What to do without the network: the files by name, so the user knows what to put where."""
    where = "check --mirror (it needs every file under its own name) or" if mirror else "use --mirror URL, or"
    return (
        f"{where} put the files in a folder and run `finebench prepare {spec.name} --from DIR` "
        f"(files: {_expected_files_text(spec)})"
    )


def _download_sources(
    spec: DatasetSpec, data_root: Path, mirror: str | None, quiet: bool
) -> list[tuple[Source, Path, dict[str, Any]]]:
    """Download and verify every source before any is extracted, so a bad file stops everything early."""
    if spec.manual and not mirror:
        raise _manual_error(spec)
    cache = data_root / ".downloads" / spec.name
    fetched = []
    for source in spec.sources:
        urls = _urls(spec, source, mirror)
        for index, url in enumerate(urls):
            try:
                digests = download.download(url, cache / source.filename, source, quiet=quiet)
                break
            except FinebenchError as error:
                if index == len(urls) - 1 and isinstance(error, download.DownloadError):
                    raise download.DownloadError(f"{error}; {_offline_hint(spec, mirror)}") from None
                if index == len(urls) - 1 or "checksum mismatch" in str(error):
                    raise
        fetched.append((source, cache / source.filename, {**digests, "url": url}))
    return fetched


def _local_sources(spec: DatasetSpec, from_path: Path) -> list[tuple[Source, Path, dict[str, Any]]]:
    """The spec's source files that ``--from`` holds, verified; absent ones are looked for as their extracted layout."""
    if not from_path.exists():
        raise FinebenchError(f"--from {from_path} does not exist (expected: {_expected_files_text(spec)})")
    if from_path.is_file():
        matching = [s for s in spec.sources if s.filename == from_path.name]
        if not matching or len(spec.sources) != 1:
            raise FinebenchError(
                f"--from {from_path}: dataset {spec.name!r} needs a folder holding {_expected_files_text(spec)}"
            )
        present = {matching[0].filename: from_path}
    else:
        present = {s.filename: from_path / s.filename for s in spec.sources if (from_path / s.filename).is_file()}
    found = []
    for source in spec.sources:
        if source.filename in present:
            path = present[source.filename]
            digests = download.check_digests(path, source)
            found.append((source, path, {**digests, "path": str(path.resolve())}))
    return found


def _link_rest_of_folder(spec: DatasetSpec, from_path: Path, raw_dir: Path) -> None:
    """Make the parts of ``--from`` that are already extracted visible next to what was just unpacked.

    Symlinks, not copies: an extracted image folder can be as large as the dataset.
    """
    source_names = {s.filename for s in spec.sources}
    for entry in from_path.iterdir():
        target = raw_dir / entry.name
        if entry.name not in source_names and not target.exists() and not target.is_symlink():
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def _missing_path(error: BaseException) -> Path | None:
    if isinstance(error, MissingLayoutPath):
        return error.path
    if isinstance(error, FileNotFoundError) and error.filename:
        return Path(error.filename)
    return None


def _parse_from_folder(
    spec: DatasetSpec, parse_dir: Path, from_path: Path, missing: list[Source]
) -> ParsedDataset:
    """Parse, and when a file is absent because its source was not in ``--from``, say which source to get and where."""
    try:
        return spec.parse(parse_dir)
    except (FinebenchError, FileNotFoundError) as error:
        absent = _missing_path(error)
        if absent is None or not missing:
            raise
        shown = Path(str(absent).replace(str(parse_dir), str(from_path), 1))
        named = [s for s in missing if s.filename == absent.name]
        if named:
            what = f"missing {named[0].filename} for dataset {spec.name!r} (get it from {_where_to_get(spec, named[0])})"
        else:
            what = (
                f"missing {shown} for dataset {spec.name!r}, and the folder holds neither it nor the source "
                f"file(s) it comes from ({', '.join(s.filename for s in missing)})"
            )
        raise FinebenchError(f"--from {from_path}: {what}; all files needed: {_expected_files_text(spec)}") from error


def _unpack(files: list[tuple[Source, Path, dict[str, Any]]], raw_dir: Path, console: Console, spec: DatasetSpec) -> None:
    """Extract what must be extracted; image archives the builder streams (``Source.stream``, all of them
    present) are only linked, so a 224 GB archive is read once, while storing, and never written out."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    present = {source.filename for source, _, _ in files}
    streamed = all(s.filename in present for s in spec.sources if s.stream)
    for source, path, _ in files:
        if source.stream and streamed:
            (raw_dir / source.filename).symlink_to(path.resolve())
        elif source.extract:
            with console.status(f"extracting {path.name}"):
                download.extract_archive(path, raw_dir)
        else:
            download.place_file(path, raw_dir / source.filename)


# ---- Hugging Face Hub -----------------------------------------------------------------------


class _HubSplit:
    """Examples of one Hub split, read lazily as encoded bytes so JPEGs are not re-encoded."""

    def __init__(self, dataset, image_column: str, label_column: str) -> None:
        import datasets

        self.dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Example]:
        for row in self.dataset:
            image = row[self.image_column]
            data = image.get("bytes") or Path(image["path"]).read_bytes()
            yield Example(image=data, label=int(row[self.label_column]))


HUB_PROBE_TIMEOUT_S = 3.0
"""How long the reachability check of the Hub host may take; ``datasets`` itself retries for ~20 s."""


def _hub_error(spec: DatasetSpec, reason: str) -> FinebenchError:
    return FinebenchError(
        f"cannot load the Hub copy {spec.hub_id!r} of {spec.name!r}: {reason} "
        f"(use --source official, with --from DIR for files you have or --mirror URL for a mirror)"
    )


def _hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be reached, found in at most ``HUB_PROBE_TIMEOUT_S``; ``None`` if it may be."""
    import datasets
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if flag in {"1", "ON", "YES", "TRUE"} or datasets.config.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows the way; let the datasets library try it
    endpoint = os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        return f"{host}:{port} is unreachable ({error.strerror or type(error).__name__}; no network?)"
    return None


def _pick_column(spec: DatasetSpec, features, wanted: str | None, kind: type, what: str) -> str:
    """The named column (checked to be of ``kind``), or the one column of that kind."""
    matching = [name for name, feature in features.items() if isinstance(feature, kind)]
    if what == "label" and wanted is None:
        matching = [name for name in matching if features[name].num_classes == spec.num_classes] or matching
    if wanted is not None:
        if wanted not in matching:
            raise FinebenchError(
                f"Hub copy {spec.hub_id!r} of {spec.name!r}: {what} column {wanted!r} is missing or not a "
                f"{kind.__name__} (columns: {', '.join(features)})"
            )
        return wanted
    if len(matching) != 1:
        raise FinebenchError(
            f"Hub copy {spec.hub_id!r} of {spec.name!r}: expected one {kind.__name__} {what} column, found "
            f"{len(matching)} (columns: {', '.join(features)}); set hub_{what}_column in the spec"
        )
    return matching[0]


def _parse_from_hub(spec: DatasetSpec) -> tuple[ParsedDataset, dict[str, Any]]:
    if not spec.hub_id:
        raise FinebenchError(f"dataset {spec.name!r} has no known Hugging Face Hub copy: use --source official or --from DIR")
    if not spec.hub_splits:
        raise FinebenchError(f"dataset {spec.name!r} has a Hub copy {spec.hub_id!r} but no hub_splits mapping in its spec")
    import datasets

    # A local folder (how tests stand in for a Hub repo) needs no network.
    if not Path(spec.hub_id).exists() and (reason := _hub_unreachable_reason()):
        raise _hub_error(spec, reason)
    ours, theirs = list(spec.hub_splits), list(spec.hub_splits.values())
    try:
        available = datasets.load_dataset_builder(spec.hub_id).config.data_files or {}
        unknown = [name for name in theirs if available and name not in available]
        if unknown:
            raise FinebenchError(
                f"Hub copy {spec.hub_id!r} of {spec.name!r} has no split {unknown[0]!r} (its splits: "
                f"{', '.join(available)}; splits asked for: {', '.join(theirs)})"
            )
        # Only the mapped splits' files, so extra splits (corrupted test copies) are not even downloaded.
        data_files = {name: available[name] for name in theirs} if available else None
        loaded = datasets.load_dataset(spec.hub_id, data_files=data_files, split=theirs)
    except FinebenchError:
        raise
    except Exception as error:  # offline, unknown repo or split, gated repo: all end here with the reason
        detail = str(error).splitlines()[0] if str(error) else ""
        raise _hub_error(spec, f"{type(error).__name__}: {detail} (splits asked for: {', '.join(theirs)})") from error
    features = loaded[0].features
    image_column = _pick_column(spec, features, spec.hub_image_column, datasets.Image, "image")
    label_column = _pick_column(spec, features, spec.hub_label_column, datasets.ClassLabel, "label")
    names = list(features[label_column].names)
    if len(names) != spec.num_classes:
        raise FinebenchError(
            f"Hub copy {spec.hub_id!r}: label column {label_column!r} has {len(names)} class names, "
            f"dataset {spec.name!r} has {spec.num_classes} classes"
        )
    parsed = ParsedDataset(
        classes=names,
        splits={name: _HubSplit(split, image_column, label_column) for name, split in zip(ours, loaded)},
        info={"hub_id": spec.hub_id, "hub_splits": dict(spec.hub_splits), "hub_label_column": label_column},
    )
    return parsed, {"kind": "hub", "hub_id": spec.hub_id}


# ---- orchestration --------------------------------------------------------------------------


def _resolve_and_parse(
    spec: DatasetSpec,
    build: Path,
    data_root: Path,
    source: str,
    from_path: Path | None,
    mirror: str | None,
    quiet: bool,
) -> tuple[ParsedDataset, dict[str, Any], dict[str, Any]]:
    """(parsed dataset, origin, checksums seen per file)."""
    if source == "hub":
        if from_path is not None or mirror is not None:
            raise FinebenchError("--source hub reads the Hugging Face Hub copy; --from and --mirror apply to --source official")
        parsed, origin = _parse_from_hub(spec)
        return parsed, origin, {}
    if spec.offline:
        if from_path is not None or mirror is not None:
            raise FinebenchError(f"dataset {spec.name!r} is built from an installed package; --from and --mirror do not apply")
        return spec.parse(build / "raw"), {"kind": "package"}, {}
    raw_dir = build / "raw"
    if from_path is not None:
        from_path = Path(from_path)
        files = _local_sources(spec, from_path)
        missing = [s for s in spec.sources if s.filename not in {src.filename for src, _, _ in files}]
        origin = {
            "kind": "from",
            "path": str(from_path.resolve()),
            "taken_as_extracted": [s.filename for s in missing],
        }
        seen = {s.filename: digests for s, _, digests in files}
        if from_path.is_dir() and not any(src.extract for src, _, _ in files):
            # Nothing to unpack: the plain files are verified and the folder is parsed in place.
            return _parse_from_folder(spec, from_path, from_path, missing), origin, seen
        _unpack(files, raw_dir, make_console(stderr=True, quiet=quiet), spec)
        if from_path.is_dir():
            _link_rest_of_folder(spec, from_path, raw_dir)
        return _parse_from_folder(spec, raw_dir, from_path, missing), origin, seen
    files = _download_sources(spec, data_root, mirror, quiet)
    origin = {"kind": "mirror", "mirror": mirror} if mirror else {"kind": "official"}
    _unpack(files, raw_dir, make_console(stderr=True, quiet=quiet), spec)
    seen = {s.filename: digests for s, _, digests in files}
    return spec.parse(raw_dir), origin, seen


@contextlib.contextmanager
def _exclusive_prepare(data_root: Path, name: str, wait: bool = False) -> Iterator[None]:
    """Refuse a second prepare of the same dataset while one runs, instead of both building and the later winning.

    ``flock`` is released by the kernel when the process dies, so a crashed prepare never leaves a stale lock;
    the lock file itself stays (deleting it would let two processes lock different files).
    """
    lock_path = data_root / f".{name}.lock"
    try:
        data_root.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")  # noqa: SIM115 - closed by the with below
    except OSError as error:
        raise FinebenchError(
            f"data root {data_root} is not a writable folder ({error.strerror or error}): "
            "set --data-root or FINEBENCH_DATA to one"
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait:
                make_console(stderr=True).print(f"waiting for another prepare of {name!r} (lock {lock_path})", highlight=False)
                fcntl.flock(handle, fcntl.LOCK_EX)
            else:
                raise FinebenchError(
                    f"another prepare of {name!r} is running (lock file {lock_path}): wait for it to finish"
                ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(
    spec: DatasetSpec,
    data_root: Path,
    source: str,
    from_path: Path | None,
    mirror: str | None,
    force: bool,
    max_side: int | None,
    quiet: bool,
    console: Console,
    short_side: int | None = None,
    workers: int = 1,
) -> Path:
    name = spec.name
    final = store.store_dir(data_root, name)
    if store.is_prepared(data_root, name) and not force:  # another prepare finished while we waited for the lock
        console.print(f"{name} is already prepared in {final} (use --force to rebuild)")
        return final
    if final.exists() and not force and not store.is_prepared(data_root, name):
        raise FinebenchError(
            f"{final} exists but has no {store.META_FILE}, so it is not a finished finebench store: remove it or use --force"
        )
    build = store.resumable_build_dir(data_root, name)
    try:
        shutil.rmtree(build / "raw", ignore_errors=True)  # extracted anew: cheap next to the images
        parsed, origin, seen = _resolve_and_parse(spec, build, data_root, source, from_path, mirror, quiet)
        meta = {
            "name": spec.name,
            "description": spec.description,
            "protocol": spec.protocol,
            "terms": spec.terms,
            "homepage": spec.homepage,
            "origin": origin,
            "sources": seen,
            "expected_split_sizes": dict(spec.split_sizes),
        }
        # What the shards depend on: a build of other files or options is started over, never continued.
        key = {"name": name, "origin": origin, "sources": {f: {k: v for k, v in d.items() if k in ("md5", "sha256")}
                                                           for f, d in seen.items()},
               "max_side": max_side, "short_side": short_side}
        fingerprint = store.claim_build(build, key)
        resumed = any(p.name != "raw" and p.name != store.BUILD_KEY_FILE for p in build.iterdir())
        if resumed:
            console.print(f"resuming the interrupted prepare of {name} in {build}")
        written = store.write_store(parsed, build, meta, max_side=max_side, quiet=quiet, short_side=short_side,
                                    workers=workers, fingerprint=fingerprint)
        shutil.rmtree(build / "raw", ignore_errors=True)
        (build / store.BUILD_KEY_FILE).unlink()
        if written["num_classes"] != spec.num_classes:
            console.print(f"[yellow]warning:[/] {name}: {written['num_classes']} classes, the spec says {spec.num_classes}")
        if spec.split_sizes and written["splits"] != dict(spec.split_sizes):
            console.print(
                f"[yellow]warning:[/] {name}: split sizes {written['splits']} differ from the official {dict(spec.split_sizes)}"
            )
        store.commit_build(build, final)
    except Exception:
        # Bad data or options: nothing of it is worth keeping. An interrupt (Ctrl-C, or a kill, which runs
        # no handler at all) keeps the finished shards for the next prepare to continue from.
        shutil.rmtree(build, ignore_errors=True)
        raise
    console.print(f"prepared {name} in {final}: " + ", ".join(f"{k} {v}" for k, v in written["splits"].items()))
    return final


def prepare_dataset(
    name: str,
    data_root: Path,
    *,
    source: str = "official",
    from_path: Path | None = None,
    mirror: str | None = None,
    force: bool = False,
    max_side: int | None = None,
    quiet: bool = False,
    wait: bool = False,
    short_side: int | None = None,
    workers: int | None = None,
) -> Path:
    """Build ``<data_root>/<name>/`` and return it; a no-op when it is already complete (unless ``force``).

    ``max_side`` / ``short_side`` shrink images whose longest / shortest side is larger (recorded
    in meta.json ``resize``); ``short_side=256`` stores the 224 recipes' photos at training scale.

    ``mirror`` replaces each source's URL by ``<mirror>/<filename>`` (institutional mirrors, and
    how tests point this at a local server); checksums still apply. ``wait``: when another process
    is preparing the same dataset, wait for it (and use its store) instead of refusing. ``workers``
    processes do the per-image work (None: one per core; 1: in this process). A prepare that was
    interrupted continues from its last finished shard when run again with the same files and options.
    """
    spec = get_spec(name)
    if source not in SOURCES:
        raise FinebenchError(f"--source {source!r} is not valid: expected one of {', '.join(SOURCES)}")
    if max_side is not None and max_side < 8:
        raise FinebenchError(f"--max-side {max_side} is too small: expected at least 8 pixels")
    if short_side is not None and short_side < 8:
        raise FinebenchError(f"--short-side {short_side} is too small: expected at least 8 pixels")
    if workers is not None and workers < 1:
        raise FinebenchError(f"--workers {workers} is not valid: expected at least 1")
    data_root = Path(data_root)
    console = make_console(stderr=True, quiet=quiet)
    if store.is_prepared(data_root, name) and not force:  # no lock needed, so a read-only data root works
        console.print(f"{name} is already prepared in {store.store_dir(data_root, name)} (use --force to rebuild)")
        return store.store_dir(data_root, name)
    with _exclusive_prepare(data_root, name, wait):
        return _build(spec, data_root, source, from_path, mirror, force, max_side, quiet, console, short_side,
                      workers or store.default_workers())


def dataset_overview(data_root: Path) -> list[dict[str, Any]]:
    """One row per registered dataset, with whether (and how big) it is prepared under ``data_root``."""
    from finebench.data.registry import all_specs

    rows = []
    for spec in all_specs():
        prepared = store.is_prepared(Path(data_root), spec.name)
        if spec.offline:
            origin = "installed package (offline)"
        elif spec.manual:
            origin = "registration; --from only"
        else:
            origin = "download" + (" or hub" if spec.hub_id else "")
        rows.append(
            {
                "name": spec.name,
                "classes": spec.num_classes,
                "splits": dict(spec.split_sizes),
                "protocol": spec.protocol,
                "terms": spec.terms,
                "source": origin,
                "hub_id": spec.hub_id,
                "homepage": spec.homepage,
                "prepared": prepared,
                "size_bytes": store.disk_size(store.store_dir(Path(data_root), spec.name)) if prepared else None,
                "path": str(store.store_dir(Path(data_root), spec.name)) if prepared else None,
            }
        )
    return rows
