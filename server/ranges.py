"""HTTP byte ranges for bundle downloads: parsing one `Range` header, reading the bytes.

Devices resume an interrupted bundle download with `Range: bytes=<offset>-`, so
the server supports exactly what RFC 9110 section 14 defines for a single
range of the `bytes` unit:

    bytes=a-b   bytes a..b inclusive (b past the end is clamped to the end)
    bytes=a-    from a to the end
    bytes=-n    the last n bytes (the whole file when n is larger)

Decisions (RFC 9110 14.2 lets a server choose where it says MAY):
- no header, or a range unit other than `bytes`, means the whole file (a server
  MUST ignore a unit it does not understand);
- a malformed header, more than one range, or a range that starts at or after
  the end (or a zero suffix) raises `RangeNotSatisfiableError`, which the API
  answers with 416 and `Content-Range: bytes */<length>`. Multipart answers
  are not worth their complexity for one-file downloads that resume from an
  offset.

Numbers are ASCII digits only (`int()` alone would also take `+5`, `1_0` and
non-ASCII digits).
"""

from __future__ import annotations

import re
from collections.abc import Generator
from pathlib import Path
from typing import BinaryIO

from edgefleet.server.errors import InvalidRequestError, StorageError

DEFAULT_CHUNK = 64 * 1024

_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
# Longer numbers than this are beyond any file; capped so int() never parses megabytes.
_MAX_DIGITS = 30
_HUGE = 10**_MAX_DIGITS


class RangeNotSatisfiableError(InvalidRequestError):
    """A `Range` header this server cannot satisfy (HTTP 416).

    `length` is the file's length, for `Content-Range: bytes */<length>`.
    """

    def __init__(self, message: str, length: int) -> None:
        super().__init__(message)
        self.length = length


def _number(text: str) -> int | None:
    if not text:
        return None
    return _HUGE if len(text) > _MAX_DIGITS else int(text)


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """The inclusive (start, end) byte positions that `header` asks of a `length`-byte file.

    Returns None when the whole file is to be sent (no header, or another unit).

    Raises:
        RangeNotSatisfiableError: a malformed header, several ranges, or a range
            that selects no byte of the file.
    """
    if length < 0:
        raise ValueError(f"length {length} is negative")
    if header is None or not header.strip():
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep:
        raise RangeNotSatisfiableError(f"Range header {header!r} has no '='", length)
    if unit.strip().lower() != "bytes":
        return None
    # A list may hold empty elements, which a recipient must ignore (RFC 9110 5.6.1).
    ranges = [part.strip() for part in spec.split(",") if part.strip()]
    if len(ranges) != 1:
        raise RangeNotSatisfiableError(
            f"Range header {header!r} must name exactly one byte range", length
        )
    match = _RANGE_SPEC.fullmatch(ranges[0])
    if match is None:
        raise RangeNotSatisfiableError(f"Range header {header!r} is not a byte range", length)
    first = _number(match[1])
    last = _number(match[2])
    if first is None:
        if last is None:
            raise RangeNotSatisfiableError(f"Range header {header!r} gives no position", length)
        # bytes=-n: the last n bytes.
        if last == 0 or length == 0:
            raise RangeNotSatisfiableError(
                f"Range header {header!r} selects no byte of a {length}-byte file", length
            )
        return max(0, length - last), length - 1
    if last is not None and last < first:
        raise RangeNotSatisfiableError(f"Range header {header!r} ends before it starts", length)
    if first >= length:
        raise RangeNotSatisfiableError(
            f"Range header {header!r} starts at or after the end of a {length}-byte file", length
        )
    end = length - 1 if last is None else min(last, length - 1)
    return first, end


def content_range(start: int, end: int, length: int) -> str:
    """The `Content-Range` value of a 206 answer: `bytes start-end/length`."""
    return f"bytes {start}-{end}/{length}"


def unsatisfied_range(length: int) -> str:
    """The `Content-Range` value of a 416 answer: `bytes */length`."""
    return f"bytes */{length}"


def iter_file(
    path: Path, start: int, end: int, chunk: int = DEFAULT_CHUNK
) -> Generator[bytes, None, None]:
    """Bytes `start`..`end` (inclusive) of the file at `path`, in chunks of at most `chunk`.

    The file is opened now, so a missing file fails here rather than in the
    middle of a response; it is closed when the iterator is exhausted or closed.
    `end < start` yields nothing (a zero-length file).

    Raises:
        StorageError: the file cannot be opened (here), or it ends before `end`
            (while iterating: the body is then cut short, which a client notices
            by the length it was promised).
    """
    if start < 0 or chunk < 1:
        raise ValueError(f"start {start} and chunk {chunk} must be >= 0 and >= 1")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by _read_range
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    return _read_range(handle, path, start, end, chunk)


def _read_range(
    handle: BinaryIO, path: Path, start: int, end: int, chunk: int
) -> Generator[bytes, None, None]:
    with handle:
        remaining = end - start + 1
        try:
            handle.seek(start)
            while remaining > 0:
                data = handle.read(min(chunk, remaining))
                if not data:
                    raise StorageError(
                        f"{path} ended {remaining} bytes before byte {end}: it was truncated"
                    )
                remaining -= len(data)
                yield data
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc


__all__ = [
    "DEFAULT_CHUNK",
    "RangeNotSatisfiableError",
    "content_range",
    "iter_file",
    "parse_range",
    "unsatisfied_range",
]
