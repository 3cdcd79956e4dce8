"""``finebench prepare``: resolve a dataset's files, verify them, parse them, store them.

Where the files come from, in order of the options:

- ``--source hub``: the spec's Hugging Face Hub copy through ``datasets.load_dataset``.
- ``--from PATH``: a folder (or single file) the user already has. If it holds any of the spec's
  archives by name, all source files must be there; they are verified and extracted. If it
  holds none, it is taken as an already-extracted official layout and parsed in place.
- otherwise each ``Source.url`` (or ``<mirror>/<filename>`` with ``--mirror``), downloaded into
  ``<data_root>/.downloads/<name>/`` and kept there, so ``--force`` does not download again.
- ``spec.offline``: nothing to fetch; the builder reads data shipped in an installed package.

Builders (``finebench/data/builders/<family>.py``) only provide ``SPECS`` with a ``parse``;
everything here is shared. Extraction goes into the build folder and is deleted once the
store is written, so a finished store holds only Arrow files and ``meta.json``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from finebench.data import download, store
from finebench.data.builders.base import DatasetSpec, Example, ParsedDataset, Source
from finebench.data.registry import get_spec
from finebench.errors import FinebenchError

SOURCES = ("official", "hub")


def _where_to_get(spec: DatasetSpec, source: Source) -> str:
    if source.url:
        return source.url
    return spec.manual_instructions or spec.homepage


def _expected_files_text(spec: DatasetSpec) -> str:
    return "; ".join(f"{s.filename} from {_where_to_get(spec, s)}" for s in spec.sources)


def _manual_error(spec: DatasetSpec) -> FinebenchError:
    return FinebenchError(
        f"dataset {spec.name!r} cannot be downloaded automatically ({spec.terms}): "
        f"{spec.manual_instructions or 'see ' + spec.homepage} then run "
        f"`finebench prepare {spec.name} --from DIR` with DIR holding: {_expected_files_text(spec)}"
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
                if index == len(urls) - 1 or "checksum mismatch" in str(error):
                    raise
        fetched.append((source, cache / source.filename, {**digests, "url": url}))
    return fetched


def _local_sources(spec: DatasetSpec, from_path: Path) -> list[tuple[Source, Path, dict[str, Any]]] | None:
    """The user's copies of the source files, verified; ``None`` when the folder holds none of them."""
    if not from_path.exists():
        raise FinebenchError(f"--from {from_path} does not exist (expected: {_expected_files_text(spec)})")
    if from_path.is_file():
        matching = [s for s in spec.sources if s.filename == from_path.name]
        if not matching or len(spec.sources) != 1:
            raise FinebenchError(
                f"--from {from_path}: dataset {spec.name!r} needs a folder holding {_expected_files_text(spec)}"
            )
        candidates = {matching[0].filename: from_path}
    else:
        candidates = {s.filename: from_path / s.filename for s in spec.sources}
    present = {name: path for name, path in candidates.items() if path.is_file()}
    archives = {s.filename for s in spec.sources if s.extract}
    # Plain files (extract=False) also sit in an extracted layout, so only archives decide the mode.
    if not (present.keys() & archives if archives else present):
        return None
    missing = [s for s in spec.sources if s.filename not in present]
    if missing:
        first = missing[0]
        raise FinebenchError(
            f"--from {from_path}: missing {first.filename} for dataset {spec.name!r} "
            f"(get it from {_where_to_get(spec, first)}; all files needed: {_expected_files_text(spec)})"
        )
    found = []
    for source in spec.sources:
        path = present[source.filename]
        digests = download.check_digests(path, source)
        found.append((source, path, {**digests, "path": str(path.resolve())}))
    return found


def _unpack(files: list[tuple[Source, Path, dict[str, Any]]], raw_dir: Path, console: Console) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    for source, path, _ in files:
        if source.extract:
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


def _parse_from_hub(spec: DatasetSpec) -> tuple[ParsedDataset, dict[str, Any]]:
    if not spec.hub_id:
        raise FinebenchError(f"dataset {spec.name!r} has no known Hugging Face Hub copy: use --source official or --from DIR")
    import datasets

    try:
        splits = datasets.load_dataset(spec.hub_id)
    except Exception as error:  # offline, unknown repo, gated repo: all end here with the reason
        raise FinebenchError(
            f"cannot load the Hub copy {spec.hub_id!r} of {spec.name!r}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''} (no network? use --source official or --from DIR)"
        ) from error
    features = next(iter(splits.values())).features
    image_columns = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    label_columns = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    label_columns.sort(key=lambda c: (features[c].num_classes != spec.num_classes, c != "label"))
    if not image_columns or not label_columns:
        raise FinebenchError(
            f"Hub copy {spec.hub_id!r} has no Image and ClassLabel columns (columns: {', '.join(features)})"
        )
    label_column = label_columns[0]
    parsed = ParsedDataset(
        classes=list(features[label_column].names),
        splits={
            ("val" if name == "validation" else name): _HubSplit(split, image_columns[0], label_column)
            for name, split in splits.items()
        },
        info={"hub_id": spec.hub_id, "hub_label_column": label_column},
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
        files = _local_sources(spec, Path(from_path))
        if files is None:
            # No archives by name: the folder should be the official layout, already extracted.
            try:
                parsed = spec.parse(Path(from_path))
            except (OSError, KeyError, ValueError, IndexError) as error:
                raise FinebenchError(
                    f"--from {from_path} holds none of the files of {spec.name!r} ({_expected_files_text(spec)}) "
                    f"and is not its extracted layout: {error}"
                ) from error
            return parsed, {"kind": "from", "path": str(Path(from_path).resolve()), "extracted": True}, {}
        origin = {"kind": "from", "path": str(Path(from_path).resolve())}
    else:
        files = _download_sources(spec, data_root, mirror, quiet)
        origin = {"kind": "mirror", "mirror": mirror} if mirror else {"kind": "official"}
    _unpack(files, raw_dir, Console(stderr=True, quiet=quiet))
    seen = {s.filename: digests for s, _, digests in files}
    return spec.parse(raw_dir), origin, seen


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
) -> Path:
    """Build ``<data_root>/<name>/`` and return it; a no-op when it is already complete (unless ``force``).

    ``mirror`` replaces each source's URL by ``<mirror>/<filename>`` (institutional mirrors, and
    how tests point this at a local server); checksums still apply.
    """
    spec = get_spec(name)
    if source not in SOURCES:
        raise FinebenchError(f"--source {source!r} is not valid: expected one of {', '.join(SOURCES)}")
    if max_side is not None and max_side < 8:
        raise FinebenchError(f"--max-side {max_side} is too small: expected at least 8 pixels")
    data_root = Path(data_root)
    console = Console(stderr=True, quiet=quiet)
    final = store.store_dir(data_root, name)
    if store.is_prepared(data_root, name) and not force:
        console.print(f"{name} is already prepared in {final} (use --force to rebuild)")
        return final
    if final.exists() and not force and not store.is_prepared(data_root, name):
        raise FinebenchError(
            f"{final} exists but has no {store.META_FILE}, so it is not a finished finebench store: remove it or use --force"
        )
    build = store.new_build_dir(data_root, name)
    try:
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
        written = store.write_store(parsed, build, meta, max_side=max_side, quiet=quiet)
        shutil.rmtree(build / "raw", ignore_errors=True)
        if written["num_classes"] != spec.num_classes:
            console.print(f"[yellow]warning:[/] {name}: {written['num_classes']} classes, the spec says {spec.num_classes}")
        if spec.split_sizes and written["splits"] != dict(spec.split_sizes):
            console.print(
                f"[yellow]warning:[/] {name}: split sizes {written['splits']} differ from the official {dict(spec.split_sizes)}"
            )
        store.commit_build(build, final)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    console.print(f"prepared {name} in {final}: " + ", ".join(f"{k} {v}" for k, v in written["splits"].items()))
    return final


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
