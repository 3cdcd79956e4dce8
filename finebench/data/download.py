"""Fetch, verify and unpack a dataset's official files without trusting the network or the archive.

Downloads stream to ``<file>.part`` and resume it with an HTTP Range request after a dropped
connection; transient failures (5xx, resets, timeouts) are retried with exponential backoff, while
a host that does not resolve or refuses the connection fails at once (offline, a typo, no server:
waiting does not help);
the file gets its final name only after its digest matched, so a file under its real name is
always a verified one. Extraction checks every member before writing it, so an archive cannot
place anything outside the target folder (absolute paths, ``..``, outward links, devices).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import lzma
import os
import shutil
import socket
import ssl
import stat
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from finebench.data.builders.base import Source
from finebench.errors import FinebenchError

CHUNK_BYTES = 1 << 20
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 1.0
"""First retry delay; doubles each attempt. Tests set it small (module data, not behaviour)."""
TIMEOUT_S = 60.0
_USER_AGENT = "finebench (+https://github.com/finebench)"


class _TransientError(Exception):
    """A failure worth retrying: the server or the connection, not the request, went wrong."""


class DownloadError(FinebenchError):
    """The network would not give the file (unreachable host, HTTP error, retries spent).

    A separate type so ``prepare`` can add what to do instead (``--from``, ``--mirror``), which
    this module does not know; checksum mismatches stay plain ``FinebenchError``.
    """


def _unreachable(reason: object) -> str | None:
    """Why a host cannot be reached at all, or ``None`` for failures that retrying may cure.

    Name resolution (including "temporary failure": offline, that is what it reports), a refused
    connection and no route to the network are answered by the local machine at once.
    """
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror or reason}; no network or no DNS?)"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (no server listening there)"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"{reason.strerror} (no network?)"
    return None


# ---- digests --------------------------------------------------------------------------------


def file_digests(path: Path) -> dict[str, str]:
    """md5 and sha256 of a file in one streaming pass (both are recorded in meta.json)."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            md5.update(chunk)
            sha256.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def check_digests(path: Path, source: Source, *, display_name: str | None = None) -> dict[str, str]:
    """Digests of ``path``; a mismatch with the published ones is a user-facing error."""
    seen = file_digests(path)
    for algorithm in ("md5", "sha256"):
        expected = getattr(source, algorithm)
        if expected is not None and expected.lower() != seen[algorithm]:
            raise FinebenchError(
                f"checksum mismatch for {display_name or path}: expected {algorithm} {expected.lower()}, "
                f"got {seen[algorithm]} (file is corrupt or not the official one)"
            )
    return seen


# ---- download -------------------------------------------------------------------------------


@contextmanager
def _progress(description: str, total: int | None, quiet: bool) -> Iterator:
    """A rich bar with bytes, rate and ETA; yields ``advance(n)`` (a no-op when quiet)."""
    if quiet:
        yield lambda completed, total_=None: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total)

        def update(completed: int, total_: int | None = None) -> None:
            if total_ is not None:
                progress.update(task, total=total_)
            progress.update(task, completed=completed)

        yield update


def _open(url: str, start: int) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if start > 0:
        request.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416:
            return error  # the partial file already holds every byte; caller checks the status
        if error.code >= 500 or error.code == 429:
            raise _TransientError(f"HTTP {error.code} from {url}") from error
        raise DownloadError(f"download of {url} failed: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        if why := _unreachable(reason):
            raise DownloadError(f"cannot reach {url}: {why}") from error
        raise _TransientError(f"cannot reach {url}: {reason}") from error


def _fetch_once(url: str, part: Path, update) -> None:
    """One attempt: append to ``part`` from where it stops; raises _TransientError to retry."""
    start = part.stat().st_size if part.exists() else 0
    response = _open(url, start)
    with response:
        status = getattr(response, "status", None) or response.getcode()
        if status == 416:
            return
        if start > 0 and status != 206:
            start = 0  # the server ignored Range: start over rather than append a second copy
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        received = start
        update(received, total)
        try:
            with open(part, "ab" if start else "wb") as handle:
                while chunk := response.read(CHUNK_BYTES):
                    handle.write(chunk)
                    received += len(chunk)
                    update(received)
                handle.flush()
                os.fsync(handle.fileno())
        except (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError, ssl.SSLError) as error:
            raise _TransientError(f"connection to {url} dropped after {received} bytes: {error}") from error
        except OSError as error:  # the network errors are caught above: this is the disk (full, read-only)
            raise FinebenchError(f"cannot write {part}: {error.strerror or error}") from None
        if total is not None and received < total:
            raise _TransientError(f"connection to {url} closed after {received} of {total} bytes")


def _kept(part: Path) -> str:
    """What is left to resume from, said as it is (the old message claimed a file that did not exist)."""
    size = part.stat().st_size if part.is_file() else 0
    return f"partial file of {size:,} bytes kept at {part}; rerun to resume" if size else "nothing was downloaded"


def download(
    url: str,
    destination: Path,
    source: Source,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float | None = None,
    quiet: bool = False,
) -> dict[str, str]:
    """Download ``url`` to ``destination`` (resuming, retrying), verify it, then rename it into place.

    Returns the digests seen. A file already at ``destination`` is trusted only if it still
    matches the published digests. On a checksum mismatch the bad file is deleted, so the next
    attempt downloads afresh instead of resuming a corrupt prefix.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        try:
            return check_digests(destination, source)
        except FinebenchError:
            destination.unlink()
    part = destination.with_name(destination.name + ".part")
    delay = DEFAULT_BACKOFF_S if backoff_s is None else backoff_s
    with _progress(destination.name, None, quiet) as update:
        for attempt in range(retries + 1):
            try:
                _fetch_once(url, part, update)
                break
            except _TransientError as error:
                if attempt == retries:
                    raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {error} ({_kept(part)})") from error
                time.sleep(delay * (2**attempt))
            except DownloadError as error:
                raise DownloadError(f"{error} ({_kept(part)})") from error
    try:
        digests = check_digests(part, source, display_name=f"{destination.name} (from {url})")
    except FinebenchError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, destination)
    return digests


# ---- safe extraction ------------------------------------------------------------------------


def _unsafe_name_reason(name: str) -> str | None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in path.parts:
        return "contains '..'"
    return None


def _inside(target: Path, candidate: Path) -> bool:
    resolved_target = target.resolve()
    resolved = candidate.resolve()
    return resolved == resolved_target or resolved_target in resolved.parents


def _check_tar_member(archive: Path, member: tarfile.TarInfo, target: Path) -> None:
    def reject(reason: str) -> None:
        raise FinebenchError(f"unsafe archive {archive}: member {member.name!r} {reason}; nothing extracted outside {target}")

    reason = _unsafe_name_reason(member.name)
    if reason:
        reject(reason)
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        reject("is a device or FIFO")
    if member.issym():
        link = Path(member.linkname)
        if link.is_absolute() or not _inside(target, target / Path(member.name).parent / link):
            reject(f"is a symlink pointing outside ({member.linkname!r})")
    if member.islnk():
        if _unsafe_name_reason(member.linkname) or not _inside(target, target / member.linkname):
            reject(f"is a hard link pointing outside ({member.linkname!r})")


def _extract_tar(archive: Path, target: Path) -> None:
    # Streaming mode ("r|*") reads the archive once, so a 140 GB tar is not scanned twice.
    last: str | None = None
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            last = member.name
            _check_tar_member(archive, member, target)
            try:
                tar.extract(member, target, filter="data")
            except tarfile.FilterError as error:
                raise FinebenchError(f"unsafe archive {archive}: member {member.name!r} rejected: {error}") from error
            except (tarfile.ReadError, EOFError, zlib.error, lzma.LZMAError, OSError) as error:
                # The archive ends (or its compression breaks) inside this member's data: name the member, since
                # a prepare that went on would store a dataset missing it and everything after it.
                raise _damaged_member(archive, member, error) from error
        _check_end_marker(archive, tar, last)


def _damaged_member(archive: Path, member: tarfile.TarInfo, error: BaseException) -> FinebenchError:
    return FinebenchError(f"archive {archive} is truncated or damaged: member {member.name!r} "
                          f"({member.size:,} bytes) cannot be read ({error})")


def _check_end_marker(archive: Path, tar: tarfile.TarFile, last: str | None) -> None:
    """tarfile stops quietly when the data ends where a header should be; only a zero block (the
    end-of-archive marker, which it has just read) means every member was seen."""
    if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
        where = f"after member {last!r}" if last else "before its first member"
        raise FinebenchError(f"archive {archive} is truncated: it ends {where} without the end-of-archive marker, "
                             "so the members after that are missing")


def stream_tar(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of every regular file of a tar in archive order, the bytes only where ``wanted(name)``:
    one sequential read, nothing written to disk. ``name`` drops a leading ``./``. Damage is reported as
    ``_extract_tar`` reports it (the member it cuts, or a missing end marker)."""
    last: str | None = None
    with open(archive, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    tool = (shutil.which("pigz") or shutil.which("gzip")) if gzipped else None
    # A gzip process decompresses on another core while this one parses members (Python's zlib would
    # do it in this thread, serially); its exit status still tells a damaged stream.
    process = subprocess.Popen([tool, "-dc", str(archive)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               bufsize=1 << 20) if tool else None
    if process is not None:
        with contextlib.suppress(OSError):  # a 1 MiB pipe: gzip is woken 16x less often (64 KiB is the default)
            fcntl.fcntl(process.stdout.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    try:
        with (tarfile.open(fileobj=process.stdout, mode="r|") if process else tarfile.open(archive, "r|*")) as tar:
            member = None
            try:
                # tar.next(), not iteration: iterating indexes tar.members, which keeps every header read
                # (about 0.4 KB an image, 1 GB for iNat 2021); a stream is read once, so they are dropped.
                for member in iter(tar.next, None):
                    tar.members = []
                    last = member.name
                    if not member.isfile():
                        continue
                    name = member.name.removeprefix("./")
                    data = None
                    if wanted(name):
                        handle = tar.extractfile(member)
                        data = handle.read() if handle is not None else b""
                        if len(data) != member.size:
                            raise EOFError(f"{len(data):,} of {member.size:,} bytes")
                    yield name, data
            except (tarfile.ReadError, EOFError, zlib.error, lzma.LZMAError, OSError) as error:
                if member is None:
                    raise
                raise _damaged_member(archive, member, error) from error
            _check_end_marker(archive, tar, last)
        if process is not None:
            process.stdout.read()  # the zero blocks after the end marker, so gzip can finish
            if process.wait() != 0:
                reason = process.stderr.read().decode(errors="replace").strip().splitlines()
                raise FinebenchError(
                    f"archive {archive} is truncated or damaged: {Path(tool).name} stops after member {last!r} "
                    f"({reason[-1] if reason else 'exit status ' + str(process.returncode)})"
                )
    except (tarfile.TarError, EOFError) as error:
        raise FinebenchError(f"cannot read archive {archive}: {error}") from error
    finally:
        if process is not None:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
            process.stderr.close()


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            reason = _unsafe_name_reason(info.filename)
            mode = info.external_attr >> 16
            if reason is None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
                reason = "is a device or FIFO"
            if reason is None and not _inside(target, target / info.filename):
                reason = "resolves outside the target"
            if reason:
                raise FinebenchError(f"unsafe archive {archive}: member {info.filename!r} {reason}; nothing extracted outside {target}")
            zf.extract(info, target)


def extract_archive(archive: Path, target: Path) -> None:
    """Unpack a tar (any compression) or zip into ``target``, refusing members that would escape it."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, target)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, target)
        else:
            raise FinebenchError(f"{archive} is neither a tar nor a zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        raise FinebenchError(f"cannot read archive {archive}: {error}") from error


def place_file(source_file: Path, target: Path) -> None:
    """Put a non-archive source into raw_dir; a hard link avoids copying large files when possible."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source_file, target)
    except OSError:
        shutil.copy2(source_file, target)
