"""Shared fixtures: a real HTTP server on 127.0.0.1 that serves official-layout archives built
by the tests, with HTTP Range support and fault injection (a connection that drops mid-file,
transient 503s), so download, resume and retry code runs for real against a socket."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class ServerFaults:
    """Per-filename faults, consumed as requests arrive."""

    drop_after_bytes: dict[str, int] = field(default_factory=dict)
    """Send only this many bytes of the body once, then close the connection."""
    fail_times: dict[str, int] = field(default_factory=dict)
    """Answer 503 this many times before serving."""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    """(path, Range header) of every GET, for assertions on resume behaviour."""


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    root: Path
    faults: ServerFaults

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        if send_body:
            self.faults.requests.append((name, self.headers.get("Range")))
        if self.faults.fail_times.get(name, 0) > 0:
            self.faults.fail_times[name] -= 1
            self.send_error(503, "transient failure (injected)")
            return
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            start = int(range_header[len("bytes="):].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not send_body:
            return
        drop = self.faults.drop_after_bytes.pop(name, None) if send_body else None
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@dataclass
class LocalServer:
    root: Path
    url: str
    faults: ServerFaults

    def add(self, name: str, data: bytes) -> str:
        """Place a file on the server; returns its URL."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return f"{self.url}/{name}"


@pytest.fixture
def local_http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A threaded HTTP server on 127.0.0.1 (ephemeral port) serving a fresh folder."""
    root = tmp_path_factory.mktemp("served")
    faults = ServerFaults()
    handler = type("Handler", (_RangeHandler,), {"root": root, "faults": faults})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LocalServer(root=root, url=f"http://127.0.0.1:{server.server_address[1]}", faults=faults)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback traffic must never be routed to a proxy from the environment."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Tests run on 2 shared cores; oversubscribed intra-op threads only slow them down."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """End-to-end runs on two shared cores: one intra-op thread is several times faster than two
    fighting for them (opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _subprocesses_import_this_tree() -> Iterator[None]:
    """A ``python -m finebench`` (or torchrun) the tests start imports the finebench under test:
    from a git worktree the editable install would otherwise give it another checkout's code."""
    root = str(Path(__file__).resolve().parents[1])
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *([previous] if previous else [])])
    yield
    if previous is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = previous
