"""``finebench prepare``: resolve a dataset's files, verify them, parse them, store them.

Where the files come from (``sources.py``; ``hub.py`` for the Hub), in order of the options:

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
(``writer.py``, ``builds.py``), so a prepare that was killed continues, run again with the same files and options,
from its last finished shard; a failure of the data itself removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from finebench.console import make_console
from finebench.data import builds, hub, sources, store
from finebench.data.builders.base import DatasetSpec, ParsedDataset
from finebench.data.encoder import default_workers
from finebench.data.registry import get_spec
from finebench.data.writer import write_store
from finebench.errors import FinebenchError

SOURCES = ("official", "hub")


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
        parsed, origin = hub.parse_from_hub(spec)
        return parsed, origin, {}
    if spec.offline:
        if from_path is not None or mirror is not None:
            raise FinebenchError(f"dataset {spec.name!r} is built from an installed package; --from and --mirror do not apply")
        return spec.parse(build / "raw"), {"kind": "package"}, {}
    raw_dir = build / "raw"
    if from_path is not None:
        from_path = Path(from_path)
        files = sources.local_sources(spec, from_path)
        missing = [s for s in spec.sources if s.filename not in {src.filename for src, _, _ in files}]
        origin = {
            "kind": "from",
            "path": str(from_path.resolve()),
            "taken_as_extracted": [s.filename for s in missing],
        }
        seen = {s.filename: digests for s, _, digests in files}
        if from_path.is_dir() and not any(src.extract for src, _, _ in files):
            # Nothing to unpack: the plain files are verified and the folder is parsed in place.
            return sources.parse_from_folder(spec, from_path, from_path, missing), origin, seen
        sources.unpack(files, raw_dir, make_console(stderr=True, quiet=quiet), spec)
        if from_path.is_dir():
            sources.link_rest_of_folder(spec, from_path, raw_dir)
        return sources.parse_from_folder(spec, raw_dir, from_path, missing), origin, seen
    files = sources.download_sources(spec, data_root, mirror, quiet)
    origin = {"kind": "mirror", "mirror": mirror} if mirror else {"kind": "official"}
    sources.unpack(files, raw_dir, make_console(stderr=True, quiet=quiet), spec)
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
    build = builds.resumable_build_dir(data_root, name)
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
        fingerprint = builds.claim_build(build, key)
        resumed = any(p.name != "raw" and p.name != builds.BUILD_KEY_FILE for p in build.iterdir())
        if resumed:
            console.print(f"resuming the interrupted prepare of {name} in {build}")
        written = write_store(parsed, build, meta, max_side=max_side, quiet=quiet, short_side=short_side,
                                    workers=workers, fingerprint=fingerprint)
        shutil.rmtree(build / "raw", ignore_errors=True)
        (build / builds.BUILD_KEY_FILE).unlink()
        if written["num_classes"] != spec.num_classes:
            console.print(f"[yellow]warning:[/] {name}: {written['num_classes']} classes, the spec says {spec.num_classes}")
        if spec.split_sizes and written["splits"] != dict(spec.split_sizes):
            console.print(
                f"[yellow]warning:[/] {name}: split sizes {written['splits']} differ from the official {dict(spec.split_sizes)}"
            )
        builds.commit_build(build, final)
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
                      workers or default_workers())


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
