"""A strict, streaming reader of the POSIX ustar archives that bundles are.

Bundles are plain ustar: 512-byte headers, data padded to 512 bytes, two zero
blocks at the end. This reader accepts that and nothing more: no pax or GNU
extension headers (whose size an attacker chooses and which `tarfile` reads
into memory), and it reports every member's type so that the caller can refuse
links and devices. Memory use is one block plus the caller's chunk size,
whatever the archive holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from edgefleet.errors import BundleTruncatedError, NotABundleError

BLOCK = 512
REGULAR_TYPES = (b"0", b"\0")
_TYPE_NAMES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
}


@dataclass(frozen=True)
class Member:
    path: str
    size: int
    typeflag: bytes
    linkname: str

    @property
    def is_regular(self) -> bool:
        return self.typeflag in REGULAR_TYPES

    @property
    def kind(self) -> str:
        if self.is_regular:
            return "regular file"
        return _TYPE_NAMES.get(self.typeflag, f"member of type {self.typeflag!r}")


def _field(block: bytes, start: int, length: int) -> bytes:
    return block[start : start + length].split(b"\0", 1)[0]


def _octal(block: bytes, start: int, length: int, what: str) -> int:
    raw = _field(block, start, length).strip(b" ")
    try:
        return int(raw, 8) if raw else 0
    except ValueError as exc:
        raise NotABundleError(f"bad {what} field in an archive header") from exc


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotABundleError("a member name is not UTF-8") from exc


def _parse_header(block: bytes) -> Member:
    if block[257:263] != b"ustar\0" or block[263:265] != b"00":
        raise NotABundleError("not a POSIX ustar archive")
    stored = _octal(block, 148, 8, "checksum")
    computed = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored != computed:
        raise NotABundleError("archive header checksum mismatch")
    typeflag = block[156:157]
    if typeflag in (b"x", b"g", b"L", b"K"):
        raise NotABundleError("pax or GNU extended headers are not part of the bundle format")
    name = _text(_field(block, 0, 100))
    prefix = _text(_field(block, 345, 155))
    return Member(
        path=f"{prefix}/{name}" if prefix else name,
        size=_octal(block, 124, 12, "size"),
        typeflag=typeflag,
        linkname=_text(_field(block, 157, 100)),
    )


class TarStream:
    """Iterate an archive's members; each member's data must be read before the next."""

    def __init__(self, source: BinaryIO, chunk_size: int = 1 << 20) -> None:
        self._source = source
        self._chunk_size = chunk_size
        self._remaining = 0
        self._padding = 0
        self.bytes_read = 0

    def _read_exact(self, count: int, what: str) -> bytes:
        data = self._source.read(count)
        self.bytes_read += len(data)
        if len(data) != count:
            raise BundleTruncatedError(f"the bundle ends in the middle of {what}")
        return data

    def members(self) -> Iterator[Member]:
        """Yield each member header in order; stop at the end-of-archive marker.

        Raises:
            NotABundleError: not a strict ustar archive, or data after its end.
            BundleTruncatedError: the archive ends early.
        """
        first = True
        while True:
            self.skip_data()
            block = self._source.read(BLOCK)
            self.bytes_read += len(block)
            if first and not block:
                raise NotABundleError("the file is empty")
            if len(block) != BLOCK:
                if first:
                    raise NotABundleError("the file is too short to be a bundle")
                raise BundleTruncatedError("the bundle ends before its end-of-archive marker")
            if block == bytes(BLOCK):
                self._check_trailer()
                return
            member = _parse_header(block)
            first = False
            self._remaining = member.size
            self._padding = -member.size % BLOCK
            yield member

    def read_chunks(self) -> Iterator[bytes]:
        """Yield the current member's data in chunks of at most `chunk_size` bytes."""
        while self._remaining:
            chunk = self._read_exact(min(self._chunk_size, self._remaining), "a file")
            self._remaining -= len(chunk)
            yield chunk
        if self._padding:
            self._read_exact(self._padding, "a file's padding")
            self._padding = 0

    def skip_data(self) -> None:
        for _ in self.read_chunks():
            pass

    def _check_trailer(self) -> None:
        # The rest of the file must be zero padding: nothing may hide after the end.
        while chunk := self._source.read(self._chunk_size):
            self.bytes_read += len(chunk)
            if chunk.count(0) != len(chunk):
                raise NotABundleError("data after the end of the archive")
