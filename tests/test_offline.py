"""Preparing without a network: fail at once, say what is left on disk, and say what to do instead.

Real sockets only: an unresolvable name (``.invalid`` never resolves, RFC 2606), a closed port on
127.0.0.1 and a local server that drops the connection. The first retry would sleep
``DEFAULT_BACKOFF_S``; it is set far above the time bound, so a retry cannot pass unnoticed.
"""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest

from finebench.data import download
from finebench.data.builders.base import Source
from finebench.data.prepare import prepare_dataset
from finebench.errors import FinebenchError

NO_RETRY_WITHIN_S = 20.0


@pytest.fixture(autouse=True)
def _slow_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "DEFAULT_BACKOFF_S", 2 * NO_RETRY_WITHIN_S)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unresolvable_host_fails_at_once_and_says_to_use_from_or_mirror(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(download.DownloadError) as caught:
        prepare_dataset("cifar10", tmp_path / "data", mirror="http://nonexistent.invalid/", quiet=True)
    assert time.monotonic() - started < NO_RETRY_WITHIN_S
    message = str(caught.value)
    assert "cannot resolve the host name" in message and "nothing was downloaded" in message
    assert "--from DIR" in message and "--mirror" in message and "cifar-10-python.tar.gz" in message
    assert ".part" not in message
    assert not list((tmp_path / "data").rglob("*.part"))


def test_a_refused_connection_is_not_retried_and_claims_no_partial_file(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/file.bin"
    started = time.monotonic()
    with pytest.raises(download.DownloadError, match=r"connection refused.*\(nothing was downloaded\)$"):
        download.download(url, tmp_path / "file.bin", Source("file.bin", md5="0" * 32), quiet=True)
    assert time.monotonic() - started < NO_RETRY_WITHIN_S
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_download_names_the_partial_file_it_really_kept(local_http_server, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 8192
    url = local_http_server.add("big.bin", payload)
    local_http_server.faults.drop_after_bytes["big.bin"] = 300_000
    part = tmp_path / "big.bin.part"
    with pytest.raises(download.DownloadError) as caught:
        download.download(url, tmp_path / "big.bin", Source("big.bin", md5=hashlib.md5(payload).hexdigest()),
                          retries=0, quiet=True)
    assert f"partial file of {part.stat().st_size:,} bytes kept at {part}; rerun to resume" in str(caught.value)
    assert 0 < part.stat().st_size < len(payload)


@pytest.mark.parametrize(("name", "archive"), [("cifar10", "cifar-10-python.tar.gz"),
                                                ("cifar100", "cifar-100-python.tar.gz")])
def test_from_an_empty_folder_names_the_archive_it_expected(tmp_path: Path, name: str, archive: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinebenchError, match=rf"--from .*empty: .*\({archive}\)"):
        prepare_dataset(name, tmp_path / "data", from_path=tmp_path / "empty", quiet=True)
    assert not (tmp_path / "data" / name).exists()
