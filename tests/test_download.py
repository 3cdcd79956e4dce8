"""Download (resume, retry, checksum) against a real local HTTP server, and safe extraction."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from finebench.data import download
from finebench.data.builders.base import Source
from finebench.errors import FinebenchError

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)  # several chunks, so a drop lands mid-file


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "DEFAULT_BACKOFF_S", 0.01)


def _source(name: str, data: bytes) -> Source:
    return Source(name, md5=hashlib.md5(data).hexdigest())


def test_interrupted_download_resumes_with_range(local_http_server, tmp_path: Path) -> None:
    url = local_http_server.add("big.bin", PAYLOAD)
    local_http_server.faults.drop_after_bytes["big.bin"] = 1_000_000
    target = tmp_path / "big.bin"

    digests = download.download(url, target, _source("big.bin", PAYLOAD), quiet=False)  # with the progress bar

    assert target.read_bytes() == PAYLOAD
    assert digests["md5"] == hashlib.md5(PAYLOAD).hexdigest()
    ranges = [r for name, r in local_http_server.faults.requests if name == "big.bin"]
    assert ranges[0] is None
    assert len(ranges) == 2 and ranges[1].startswith("bytes=") and int(ranges[1][6:].split("-")[0]) > 0
    assert not (tmp_path / "big.bin.part").exists()


def test_transient_503s_are_retried(local_http_server, tmp_path: Path) -> None:
    url = local_http_server.add("flaky.bin", b"hello" * 100)
    local_http_server.faults.fail_times["flaky.bin"] = 2

    download.download(url, tmp_path / "flaky.bin", _source("flaky.bin", b"hello" * 100), quiet=True)

    assert (tmp_path / "flaky.bin").read_bytes() == b"hello" * 100
    assert len(local_http_server.faults.requests) == 3


def test_persistent_503_gives_up_with_clear_error(local_http_server, tmp_path: Path) -> None:
    url = local_http_server.add("down.bin", b"x")
    local_http_server.faults.fail_times["down.bin"] = 10
    with pytest.raises(FinebenchError, match=r"down.bin failed after 3 attempts.*503"):
        download.download(url, tmp_path / "down.bin", _source("down.bin", b"x"), retries=2, quiet=True)


def test_disk_write_failure_is_a_user_error_not_a_retry(local_http_server, tmp_path: Path) -> None:
    """A file-size limit makes write() fail with EFBIG, as a full disk fails with ENOSPC."""
    import resource
    import signal

    url = local_http_server.add("big.bin", b"x" * 4096)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
    try:
        with pytest.raises(FinebenchError, match=r"cannot write .*big.bin.part"):
            download.download(url, tmp_path / "big.bin", _source("big.bin", b"x" * 4096), retries=3, quiet=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert len(local_http_server.faults.requests) == 1


def test_checksum_mismatch_names_file_and_both_digests(local_http_server, tmp_path: Path) -> None:
    url = local_http_server.add("data.bin", b"corrupted bytes")
    wrong = "0" * 32
    with pytest.raises(FinebenchError) as caught:
        download.download(url, tmp_path / "data.bin", Source("data.bin", md5=wrong), quiet=True)
    message = str(caught.value)
    assert "data.bin" in message and wrong in message and hashlib.md5(b"corrupted bytes").hexdigest() in message
    assert list(tmp_path.iterdir()) == []  # neither the final file nor a partial to resume from


def test_existing_verified_file_is_not_downloaded_again(local_http_server, tmp_path: Path) -> None:
    url = local_http_server.add("a.bin", b"abc")
    download.download(url, tmp_path / "a.bin", _source("a.bin", b"abc"), quiet=True)
    download.download(url, tmp_path / "a.bin", _source("a.bin", b"abc"), quiet=True)
    assert len(local_http_server.faults.requests) == 1


# ---- extraction -----------------------------------------------------------------------------


def _tar(path: Path, members: list[tarfile.TarInfo], payload: bytes = b"evil") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if member.isreg():
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
            else:
                tar.addfile(member)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([_member("ok.txt"), _member("../escaped.txt")], "contains '..'"),
        ([_member("/tmp/absolute-finebench.txt")], "absolute path"),
        ([_member("link", tarfile.SYMTYPE, "../../outside"), _member("link/escaped.txt")], "symlink pointing outside"),
        ([_member("hard", tarfile.LNKTYPE, "../outside")], "hard link pointing outside"),
        ([_member("dev", tarfile.CHRTYPE)], "device"),
    ],
    ids=["dotdot", "absolute", "outward-symlink", "outward-hardlink", "device"],
)
def test_unsafe_tar_members_are_rejected(tmp_path: Path, members, reason: str) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", members)
    target = tmp_path / "deep" / "target"
    with pytest.raises(FinebenchError, match=reason) as caught:
        download.extract_archive(archive, target)
    assert "bad.tar.gz" in str(caught.value)
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/absolute-finebench.txt").exists()
    assert not (target / "link").is_symlink()


def test_inward_symlink_is_allowed(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ok.tar", [_member("dir/file.txt"), _member("dir/alias", tarfile.SYMTYPE, "file.txt")])
    download.extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out" / "dir" / "alias").read_bytes() == b"evil"


def test_zip_with_dotdot_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", "fine")
        zf.writestr("../escaped.txt", "evil")
    target = tmp_path / "target"
    with pytest.raises(FinebenchError, match=r"bad.zip.*'\.\./escaped.txt'.*'\.\.'"):
        download.extract_archive(archive, target)
    assert not (tmp_path / "escaped.txt").exists()


def test_zip_and_tar_extract_normally(tmp_path: Path) -> None:
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/b.txt", "content")
    download.extract_archive(archive, tmp_path / "z")
    assert (tmp_path / "z" / "a" / "b.txt").read_text() == "content"


def test_not_an_archive_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "plain.bin").write_bytes(b"not an archive")
    with pytest.raises(FinebenchError, match="plain.bin is neither a tar nor a zip"):
        download.extract_archive(tmp_path / "plain.bin", tmp_path / "out")


def test_complete_partial_file_is_verified_and_kept(local_http_server, tmp_path: Path) -> None:
    url = local_http_server.add("done.bin", b"0123456789")
    (tmp_path / "done.bin.part").write_bytes(b"0123456789")  # e.g. interrupted between download and rename
    download.download(url, tmp_path / "done.bin", _source("done.bin", b"0123456789"), quiet=True)
    assert (tmp_path / "done.bin").read_bytes() == b"0123456789"
    assert local_http_server.faults.requests == [("done.bin", "bytes=10-")]
