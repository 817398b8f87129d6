"""HTTP transport: Range resume, servers that ignore Range or send too much, tampered files.

`FileServer` serves one file over HTTP/1.1 with single-range support and
faults on demand (cut the connection after N bytes, ignore Range, send more
than the file, answer an error status), counting every byte it sends; the
download benchmark uses it too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.errors import DownloadError
from edgefleet.agent.transport import HttpFetcher
from edgefleet.agent.transport.base import bitmap_path, part_path
from edgefleet.agent.transport.bitmap import BlockFile
from edgefleet.errors import FileLengthError, TamperedFileError
from edgefleet.mqtt.directives import BundleRef, Directive, HttpSource, Source
from edgefleet.timefmt import format_time, utcnow
from tests.agent.broker import WAIT

LENGTH = 1_000_003  # not a multiple of the chunk size
CHUNK = 64 * 1024


def make_directive(content: bytes, sources: list[Source], device_id: str = "cam-01") -> Directive:
    now = utcnow()
    return Directive(
        issued=format_time(now),
        expires=format_time(now + dt.timedelta(hours=1)),
        device_id=device_id,
        sequence=7,
        action="install",
        bundle=BundleRef(
            name="demo",
            version="1.2.3",
            sha256=hashlib.sha256(content).hexdigest(),
            length=len(content),
        ),
        sources=sources,
    )


@dataclass
class HttpFaults:
    cut_after: int | None = None  # close the connection after this many body bytes, once
    ignore_range: bool = False  # answer every request 200 with the whole file
    extra: bytes = b""  # sent after the file
    declare_length: bool = True  # send Content-Length (with `extra`, it counts it)
    status: int | None = None  # answer this status with an empty body


class FileServer:
    """Serves one file at `url` over HTTP/1.1 with single-range support, counting bytes sent."""

    def __init__(
        self, path: Path, faults: HttpFaults | None = None, chunk: int = 64 * 1024
    ) -> None:
        self.path = path
        self.faults = faults or HttpFaults()
        self.chunk = chunk
        self.bytes_sent = 0
        self.ranges: list[str | None] = []  # the Range header of each request
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/bundle.efb"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(WAIT)

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        return Handler

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        faults = self.faults
        length = self.path.stat().st_size
        header = handler.headers.get("Range")
        with self._lock:
            self.ranges.append(header)
        if faults.status is not None:
            handler.send_response(faults.status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start = 0
        if header and not faults.ignore_range:
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= length:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{length}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{length - 1}/{length}")
        else:
            handler.send_response(200)
        body_length = length - start + len(faults.extra)
        if faults.declare_length:
            handler.send_header("Content-Length", str(body_length))
        else:
            handler.close_connection = True
        handler.end_headers()
        budget, tail = faults.cut_after, faults.extra
        with self.path.open("rb") as handle:
            handle.seek(start)
            while True:
                data = handle.read(self.chunk)
                if not data:
                    data, tail = tail, b""  # the extra bytes, once, after the file
                if not data:
                    break
                if budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                try:
                    handler.wfile.write(data)
                except OSError:
                    return
                with self._lock:
                    self.bytes_sent += len(data)
                if budget == 0:
                    faults.cut_after = None  # once: the next request is served in full
                    handler.close_connection = True
                    handler.wfile.flush()
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return


@pytest.fixture
def content() -> bytes:
    return os.urandom(LENGTH)


@pytest.fixture
def bundle_path(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "served.efb"
    path.write_bytes(content)
    return path


@pytest.fixture
def server(bundle_path: Path) -> Iterator[FileServer]:
    server = FileServer(bundle_path, chunk=CHUNK)
    yield server
    server.close()


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    return downloads / "bundle"


def fetcher() -> HttpFetcher:
    return HttpFetcher(timeout=5.0, chunk_size=CHUNK)


def test_download_writes_verified_file_and_nothing_else(
    server: FileServer, destination: Path, content: bytes
) -> None:
    http = fetcher()
    assert (
        http.fetch(make_directive(content, [HttpSource(url=server.url)]), destination)
        == destination
    )
    assert destination.read_bytes() == content
    assert sorted(p.name for p in destination.parent.iterdir()) == ["bundle"]
    assert http.last_stats is not None and http.last_stats.bytes_received == LENGTH
    assert server.ranges == [None]


def test_cut_midway_resumes_with_range_and_sends_at_most_a_chunk_again(
    server: FileServer, destination: Path, content: bytes
) -> None:
    server.faults.cut_after = 400_000
    directive = make_directive(content, [HttpSource(url=server.url)])
    with pytest.raises(DownloadError, match="kept for resume"):
        fetcher().fetch(directive, destination)
    kept = part_path(destination).stat().st_size
    assert kept == 400_000 and not destination.exists()

    restarted = fetcher()  # a new agent process knows only the part file
    restarted.fetch(directive, destination)
    assert destination.read_bytes() == content
    assert server.ranges == [None, f"bytes={kept}-"]
    assert restarted.last_stats is not None and restarted.last_stats.resumed_from == kept
    assert server.bytes_sent - LENGTH <= CHUNK


def test_server_ignoring_range_restarts_from_zero(
    server: FileServer, destination: Path, content: bytes
) -> None:
    part_path(destination).write_bytes(content[:300_000])
    server.faults.ignore_range = True
    http = fetcher()
    http.fetch(make_directive(content, [HttpSource(url=server.url)]), destination)
    assert destination.read_bytes() == content
    assert http.last_stats is not None
    assert (http.last_stats.restarts, http.last_stats.bytes_received) == (1, LENGTH)


@pytest.mark.parametrize("declare_length", [True, False], ids=["declared", "close-delimited"])
def test_server_sending_too_many_bytes_is_refused(
    server: FileServer, destination: Path, content: bytes, declare_length: bool
) -> None:
    server.faults.extra = b"X" * 5000
    server.faults.declare_length = declare_length
    with pytest.raises(FileLengthError):
        fetcher().fetch(make_directive(content, [HttpSource(url=server.url)]), destination)
    assert not destination.exists() and not part_path(destination).exists()


def test_range_refused_by_a_shorter_file_starts_over_then_is_refused(
    tmp_path: Path, destination: Path, content: bytes
) -> None:
    short = tmp_path / "short.efb"
    short.write_bytes(content[:100_000])  # a mirror with another, shorter file
    part_path(destination).write_bytes(content[:200_000])
    server = FileServer(short)
    try:
        with pytest.raises(FileLengthError):
            fetcher().fetch(make_directive(content, [HttpSource(url=server.url)]), destination)
    finally:
        server.close()
    assert server.ranges == ["bytes=200000-", None]  # 416, then from zero: wrong length
    assert not destination.exists() and not part_path(destination).exists()


def test_wrong_digest_is_tampered_and_leaves_no_file(
    tmp_path: Path, destination: Path, content: bytes
) -> None:
    other = tmp_path / "other.efb"
    other.write_bytes(os.urandom(LENGTH))  # same length, other bytes
    server = FileServer(other)
    try:
        with pytest.raises(TamperedFileError):
            fetcher().fetch(make_directive(content, [HttpSource(url=server.url)]), destination)
    finally:
        server.close()
    assert list(destination.parent.iterdir()) == []


def test_resumed_part_with_bad_bytes_starts_over_once(
    server: FileServer, destination: Path, content: bytes
) -> None:
    # A power cut can leave a part whose tail never reached the disk.
    part_path(destination).write_bytes(content[:200_000] + bytes(100_000))
    http = fetcher()
    http.fetch(make_directive(content, [HttpSource(url=server.url)]), destination)
    assert destination.read_bytes() == content
    assert http.last_stats is not None and http.last_stats.restarts == 1
    assert server.ranges == ["bytes=300000-", None]


def test_complete_part_is_verified_without_a_request(
    server: FileServer, destination: Path, content: bytes
) -> None:
    part_path(destination).write_bytes(content)
    fetcher().fetch(make_directive(content, [HttpSource(url=server.url)]), destination)
    assert destination.read_bytes() == content and server.ranges == []


def test_destination_already_complete_is_returned_and_leftovers_removed(
    server: FileServer, destination: Path, content: bytes
) -> None:
    destination.write_bytes(content)
    part_path(destination).write_bytes(b"stale")
    fetcher().fetch(make_directive(content, [HttpSource(url=server.url)]), destination)
    assert server.ranges == [] and not part_path(destination).exists()


def test_part_left_by_block_transfer_resumes_from_its_first_gap(
    server: FileServer, destination: Path, content: bytes
) -> None:
    block = 100_000
    directive = make_directive(content, [HttpSource(url=server.url)])
    assert directive.bundle is not None
    blocks = BlockFile(
        part_path(destination),
        bitmap_path(destination),
        directive.bundle.sha256,
        LENGTH,
        block,
        sync_interval=0,
    )
    for index in (0, 1, 2, 5):
        blocks.write_block(index, content[index * block : (index + 1) * block])
    blocks.close()
    fetcher().fetch(directive, destination)
    assert destination.read_bytes() == content
    assert server.ranges == [f"bytes={3 * block}-"]
    assert not bitmap_path(destination).exists()


def test_unreachable_server_is_transient(destination: Path, content: bytes) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/bundle.efb"
    with pytest.raises(DownloadError):
        fetcher().fetch(make_directive(content, [HttpSource(url=url)]), destination)


def test_stalled_server_times_out(destination: Path, content: bytes) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/bundle.efb"
    try:
        with pytest.raises(DownloadError):
            HttpFetcher(timeout=0.5).fetch(
                make_directive(content, [HttpSource(url=url)]), destination
            )
    finally:
        thread.join(5)
        for sock in [*accepted, listener]:
            sock.close()


def test_http_error_status_is_transient(
    server: FileServer, destination: Path, content: bytes
) -> None:
    server.faults.status = 503
    with pytest.raises(DownloadError, match="HTTP 503"):
        fetcher().fetch(make_directive(content, [HttpSource(url=server.url)]), destination)
