"""HTTP(S) download with Range resume, on the standard library only (nothing to install on devices).

Bytes go to `<destination>.part`, which is always a prefix of the file the
server sent. A later attempt (after a cut connection, a timeout, or an agent
restart) asks for `Range: bytes=<part size>-` and appends only when the server
answers 206 with exactly `Content-Range: bytes <part size>-<length-1>/<length>`;
a 200 means the server ignored the range, so the part is emptied and the body
written from byte zero. The directive's signed length bounds everything: a
declared length other than the expected one is refused before reading, and a
body that goes on past it is cut off and refused (FileLengthError), the part
discarded. When the part is complete it is hashed and renamed atomically.

Proxies are not read from the environment unless asked (`use_environment_proxies`).
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from edgefleet import __version__
from edgefleet.agent.errors import DownloadError
from edgefleet.agent.layout import PRIVATE_FILE
from edgefleet.agent.transport.base import (
    FetchStats,
    already_fetched,
    bitmap_path,
    discard_partial,
    finish,
    part_path,
)
from edgefleet.agent.transport.bitmap import reduce_to_prefix
from edgefleet.agent.transport.sources import SourcesFetcher
from edgefleet.errors import FileLengthError, TamperedFileError, UsageError
from edgefleet.mqtt.directives import BundleRef, Directive, HttpSource, Source

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class HttpFetcher:
    """Fetches bundles from the directive's http(s) sources, resuming with Range."""

    checks_digest = True  # the installer's marker: `finish` checks length and SHA-256

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        chunk_size: int = 64 * 1024,
        sync_bytes: int = 4 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        use_environment_proxies: bool = False,
    ) -> None:
        """
        Args:
            timeout: seconds for connecting and for each read; a stalled server fails the attempt.
            chunk_size: bytes per read and write; at most this much is received again
                after the agent is killed.
            sync_bytes: the part is fsynced after this many bytes (and at the end).
            ssl_context: for https (default: the system's CAs, hostname checked).
        """
        if chunk_size < 1 or timeout <= 0:
            raise UsageError("chunk_size and timeout must be positive")
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.sync_bytes = sync_bytes
        self._ssl_context = ssl_context
        self._use_environment_proxies = use_environment_proxies
        self._built_opener: urllib.request.OpenerDirector | None = None
        self.last_stats: FetchStats | None = None

    @property
    def _opener(self) -> urllib.request.OpenerDirector:
        # Built on first use: loading the system's CA store costs about 1 MiB of
        # memory, which an idle device that never downloads need not pay.
        if self._built_opener is None:
            context = self._ssl_context or ssl.create_default_context()
            handlers: list[urllib.request.BaseHandler] = [
                urllib.request.HTTPSHandler(context=context)
            ]
            if not self._use_environment_proxies:
                handlers.append(urllib.request.ProxyHandler({}))
            self._built_opener = urllib.request.build_opener(*handlers)
        return self._built_opener

    def fetch(self, directive: Directive, destination: Path) -> Path:
        """Fetch from the directive's http sources in turn (see `Fetcher.fetch`,
        `SourcesFetcher` for which error wins when every source fails)."""
        return SourcesFetcher(http=self).fetch(directive, destination)

    def fetch_from(self, source: Source, bundle: BundleRef, destination: Path) -> Path:
        """Fetch `bundle` from one http source into `destination` (see `Fetcher.fetch`)."""
        if not isinstance(source, HttpSource):
            raise UsageError(f"HttpFetcher cannot fetch from a {source.transport} source")
        stats = self.last_stats = FetchStats(transport="http")
        if already_fetched(destination, bundle):
            return destination
        part = part_path(destination)
        if bitmap_path(destination).exists():
            # Left by the block transport: keep the contiguous blocks as a prefix.
            reduce_to_prefix(part, bitmap_path(destination))
        stats.resumed_from = part.stat().st_size if part.exists() else 0
        if stats.resumed_from > bundle.length:
            discard_partial(destination)
            stats.resumed_from = 0
        started_from_zero = stats.resumed_from == 0
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if offset < bundle.length and self._download(
                source.url, destination, offset, bundle, stats
            ):
                started_from_zero = True
            try:
                return finish(destination, bundle)
            except TamperedFileError:
                # Bytes kept from an earlier attempt may be what went wrong (a power
                # cut, another mirror): start over once before calling it tampering.
                if started_from_zero:
                    raise
                started_from_zero = True
                stats.restarts += 1

    def _open(self, url: str, offset: int) -> http.client.HTTPResponse | None:
        """The response to a GET from `offset`; None when the server refuses the range (416)."""
        headers = {"Accept-Encoding": "identity", "User-Agent": f"edgefleet-agent/{__version__}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                return None
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise DownloadError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
        if not isinstance(response, http.client.HTTPResponse):  # pragma: no cover - http(s) only
            response.close()
            raise DownloadError(f"{url}: not an HTTP response")
        return response

    def _download(
        self, url: str, destination: Path, offset: int, bundle: BundleRef, stats: FetchStats
    ) -> bool:
        """Append the rest of the file to the part; True when it was rewritten from byte zero.

        Raises:
            DownloadError: the transfer stopped early (what arrived is kept).
            FileLengthError: the server announced another length, or sent more
                than the directive's (then the part is discarded).
        """
        response = self._open(url, offset)
        if response is None:
            # Our part is at least as long as the server's file: not the same file, or a
            # part from elsewhere. Start over; the length check below decides.
            discard_partial(destination)
            stats.restarts += 1
            offset = 0
            response = self._open(url, offset)
            assert response is not None
        with response:
            if response.status == 206 and offset:
                self._check_content_range(url, response, offset, bundle.length)
            elif response.status == 200:
                if offset:
                    stats.restarts += 1  # the server ignored Range: start over
                offset = 0
            else:
                raise DownloadError(f"{url}: unexpected HTTP {response.status} {response.reason}")
            expected = bundle.length - offset
            declared = response.getheader("Content-Length")
            if declared is not None and (not declared.isdigit() or int(declared) != expected):
                raise FileLengthError(
                    f"{url} announces {declared} bytes from offset {offset}; the directive's "
                    f"length {bundle.length} leaves {expected}"
                )
            if self._stream(url, response, part_path(destination), offset, expected, stats):
                discard_partial(destination)
                raise FileLengthError(
                    f"{url} sent more than the directive's {bundle.length} bytes; refused"
                )
        return offset == 0

    @staticmethod
    def _check_content_range(
        url: str, response: http.client.HTTPResponse, offset: int, length: int
    ) -> None:
        text = response.getheader("Content-Range") or ""
        match = _CONTENT_RANGE.fullmatch(text.strip())
        if match is None:
            raise DownloadError(f"{url}: 206 without a usable Content-Range ({text!r})")
        first, last, total = int(match[1]), int(match[2]), match[3]
        if total != "*" and int(total) != length:
            raise FileLengthError(
                f"{url} serves a file of {total} bytes; the directive says {length}"
            )
        if (first, last) != (offset, length - 1):
            raise DownloadError(f"{url}: asked for bytes {offset}-{length - 1}, got {first}-{last}")

    def _stream(
        self,
        url: str,
        response: http.client.HTTPResponse,
        part: Path,
        offset: int,
        expected: int,
        stats: FetchStats,
    ) -> bool:
        """Write `expected` bytes of the body at `offset`; True when the body goes on past them.

        Raises:
            DownloadError: the body ended early or a read or write failed (the
                bytes written so far are fsynced and kept).
        """
        try:
            handle = part.open("r+b") if offset else _create_private(part)
        except OSError as exc:
            raise DownloadError(f"cannot open {part.name}: {exc.strerror or exc}") from exc
        with handle:
            handle.truncate(offset)
            handle.seek(offset)
            received, unsynced = 0, 0
            try:
                while received < expected:
                    chunk = self._read(url, response, min(self.chunk_size, expected - received))
                    if not chunk:
                        raise DownloadError(
                            f"{url}: connection ended after {offset + received} of "
                            f"{offset + expected} bytes; kept for resume"
                        )
                    try:
                        handle.write(chunk)
                    except OSError as exc:
                        raise DownloadError(
                            f"cannot write {part.name}: {exc.strerror or exc}"
                        ) from exc
                    received += len(chunk)
                    unsynced += len(chunk)
                    stats.bytes_received += len(chunk)
                    if unsynced >= self.sync_bytes:
                        handle.flush()
                        os.fsync(handle.fileno())
                        unsynced = 0
                # http.client stops at a declared Content-Length by itself; this catches
                # a close-delimited or chunked body that goes on.
                return bool(self._read(url, response, 1))
            finally:
                handle.flush()
                os.fsync(handle.fileno())

    @staticmethod
    def _read(url: str, response: http.client.HTTPResponse, size: int) -> bytes:
        try:
            return response.read(size)
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(f"{url}: transfer failed ({exc}); what arrived is kept") from exc


def _create_private(part: Path) -> BinaryIO:
    """A new, empty `part`, mode 0600 (an older one is replaced, whatever its mode)."""
    part.unlink(missing_ok=True)
    return os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb")
