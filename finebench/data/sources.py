"""Where ``prepare``'s files come from: downloaded (or from ``--mirror``) or found in ``--from``, verified, then
extracted or linked into the build's ``raw`` folder, and parsed there.

Image archives a builder can stream (``Source.stream``: iNaturalist's) are not extracted at all, only
linked: the store reads them member by member. When parsing misses a file because its source was not in
``--from``, the user is told which source to get and where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from finebench.data import download
from finebench.data.builders._layout import MissingLayoutPath
from finebench.data.builders.base import DatasetSpec, ParsedDataset, Source
from finebench.errors import FinebenchError


def where_to_get(spec: DatasetSpec, source: Source) -> str:
    if source.url:
        return source.url
    return spec.manual_instructions or spec.homepage


def expected_files_text(spec: DatasetSpec, with_instructions: bool = True) -> str:
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
        f"`finebench prepare {spec.name} --from DIR` with DIR holding: {expected_files_text(spec, False)}"
    )


def _urls(spec: DatasetSpec, source: Source, mirror: str | None) -> list[str]:
    if mirror:
        return [f"{mirror.rstrip('/')}/{source.filename}"]
    urls = [u for u in (source.url, *source.mirrors) if u]
    if not urls:
        raise FinebenchError(
            f"{source.filename} of dataset {spec.name!r} has no download URL: fetch it from "
            f"{where_to_get(spec, source)} and use --from DIR, or try --source hub"
        )
    return urls


def _offline_hint(spec: DatasetSpec, mirror: str | None) -> str:
    """What to do without the network: the files by name, so the user knows what to put where."""
    where = "check --mirror (it needs every file under its own name) or" if mirror else "use --mirror URL, or"
    return (
        f"{where} put the files in a folder and run `finebench prepare {spec.name} --from DIR` "
        f"(files: {expected_files_text(spec)})"
    )


def download_sources(
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


def local_sources(spec: DatasetSpec, from_path: Path) -> list[tuple[Source, Path, dict[str, Any]]]:
    """The spec's source files that ``--from`` holds, verified; absent ones are looked for as their extracted layout."""
    if not from_path.exists():
        raise FinebenchError(f"--from {from_path} does not exist (expected: {expected_files_text(spec)})")
    if from_path.is_file():
        matching = [s for s in spec.sources if s.filename == from_path.name]
        if not matching or len(spec.sources) != 1:
            raise FinebenchError(
                f"--from {from_path}: dataset {spec.name!r} needs a folder holding {expected_files_text(spec)}"
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


def link_rest_of_folder(spec: DatasetSpec, from_path: Path, raw_dir: Path) -> None:
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


def parse_from_folder(
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
            what = f"missing {named[0].filename} for dataset {spec.name!r} (get it from {where_to_get(spec, named[0])})"
        else:
            what = (
                f"missing {shown} for dataset {spec.name!r}, and the folder holds neither it nor the source "
                f"file(s) it comes from ({', '.join(s.filename for s in missing)})"
            )
        raise FinebenchError(f"--from {from_path}: {what}; all files needed: {expected_files_text(spec)}") from error


def unpack(files: list[tuple[Source, Path, dict[str, Any]]], raw_dir: Path, console: Console, spec: DatasetSpec) -> None:
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
