"""A preallocated part file and the bitmap of the blocks it holds.

On disk, beside the destination:

    <destination>.part     the bundle's full length, blocks written in place
    <destination>.blocks   {"block_size":..,"format":1,"length":..,"sha256":..}\\n<bitmap>

Bit `i` (byte `i // 8`, bit `i % 8`, least significant first) is set when
block `i` is in the part file. Invariants, relied on after a crash:

- a bit is set only after its block was written to the part file, and the
  bitmap is only ever replaced atomically (temporary file, rename);
- a part file *without* a bitmap is a prefix written by the HTTP transport;
  a part file *with* one is addressed by block, and only marked blocks count.
  `open` turns a prefix into marked blocks, `reduce_to_prefix` goes back;
- a bitmap that names another bundle, length or block size, or that does not
  parse, is thrown away with its part: the transfer starts over.

Durability: the bitmap is renamed into place without fsync after every block,
or every few blocks when the bitmap is large (so that rewriting it costs at
most 1/16 of the block bytes written): a killed process loses at most those
blocks, since the kernel keeps what was written. Every `sync_interval` seconds
and on close the part and then the bitmap are fsynced, so a power cut loses at
most that much. A block marked but lost to a power cut is caught by the final
digest, and the fetcher then starts over once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgefleet.agent.errors import DownloadError
from edgefleet.agent.layout import PRIVATE_FILE
from edgefleet.errors import UsageError
from edgefleet.fileio import atomic_write_bytes, fsync_directory
from edgefleet.mqtt.blocks import block_count, block_extent

FORMAT = 1


def _header(sha256: str, length: int, block_size: int) -> bytes:
    fields = {"block_size": block_size, "format": FORMAT, "length": length, "sha256": sha256}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"


def _load_bits(path: Path, header: bytes, count: int) -> bytearray | None:
    """The bitmap at `path` if it belongs to this transfer, else None."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if not raw.startswith(header) or len(raw) != len(header) + (count + 7) // 8:
        return None
    bits = bytearray(raw[len(header) :])
    spare = len(bits) * 8 - count
    if spare and bits[-1] >> (8 - spare):
        return None  # bits beyond the last block: not ours
    return bits


def _write_bits(path: Path, header: bytes, bits: bytearray, durable: bool) -> None:
    data = header + bytes(bits)
    if durable:
        atomic_write_bytes(path, data, mode=PRIVATE_FILE)
        return
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def recorded_blocks(bitmap: Path, sha256: str, length: int, block_size: int) -> set[int] | None:
    """The blocks a bitmap file marks for this transfer; None when it is absent or not for it."""
    count = block_count(length, block_size)
    bits = _load_bits(bitmap, _header(sha256, length, block_size), count)
    if bits is None:
        return None
    return {i for i in range(count) if bits[i // 8] >> (i % 8) & 1}


def reduce_to_prefix(part: Path, bitmap: Path) -> int:
    """Turn a block-addressed part into the prefix of contiguous blocks; return its length.

    For the HTTP transport, which resumes from the end of a prefix. The bitmap
    is first rewritten to mark only that prefix, then the part is cut, then the
    bitmap removed, so a crash at any step leaves a consistent pair.
    """
    try:
        header_line = bitmap.read_bytes().split(b"\n", 1)[0]
        fields = json.loads(header_line)
        header = _header(fields["sha256"], fields["length"], fields["block_size"])
        length, block_size = int(fields["length"]), int(fields["block_size"])
        count = block_count(length, block_size)
    except (OSError, ValueError, KeyError, TypeError, UsageError):
        bits = None
    else:
        bits = _load_bits(bitmap, header, count)
    if bits is None or not part.exists():
        bitmap.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        fsync_directory(part.parent)
        return 0
    first_missing = next((i for i in range(count) if not bits[i // 8] >> (i % 8) & 1), count)
    prefix = length if first_missing == count else first_missing * block_size
    kept = bytearray((count + 7) // 8)
    for i in range(first_missing):
        kept[i // 8] |= 1 << (i % 8)
    _write_bits(bitmap, header, kept, durable=True)
    os.truncate(part, prefix)
    bitmap.unlink()
    fsync_directory(part.parent)
    return prefix


class BlockFile:
    """The part file of one block transfer, open for writing, with its bitmap."""

    def __init__(
        self,
        part: Path,
        bitmap: Path,
        sha256: str,
        length: int,
        block_size: int,
        *,
        sync_interval: float,
    ) -> None:
        """Open or create the pair; see the module docstring for what is kept.

        Raises:
            DownloadError: the part file cannot be created or preallocated (disk full).
        """
        self.part = part
        self.bitmap = bitmap
        self.length = length
        self.block_size = block_size
        self.count = block_count(length, block_size)
        self._header = _header(sha256, length, block_size)
        self._sync_interval = sync_interval
        try:
            self._bits = self._open_bits()
            self._fd = os.open(part, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        except OSError as exc:
            raise DownloadError(f"cannot prepare {part.name}: {exc.strerror or exc}") from exc
        try:
            self._preallocate()
        except OSError as exc:
            os.close(self._fd)
            raise DownloadError(
                f"cannot reserve {length} bytes for {part.name}: {exc.strerror or exc}"
            ) from exc
        self.present = sum(bin(byte).count("1") for byte in self._bits)
        self.resumed_blocks = self.present
        self.persist_every = max(1, -(-16 * len(self._bits) // block_size))
        self._unrecorded = 0  # blocks written and not yet in the bitmap on disk
        self._last_sync = time.monotonic()

    def _open_bits(self) -> bytearray:
        bits = _load_bits(self.bitmap, self._header, self.count)
        size = self.part.stat().st_size if self.part.exists() else None
        if bits is not None and size is not None and size <= self.length:
            return bits
        if not self.bitmap.exists() and size is not None and size <= self.length:
            # A prefix from the HTTP transport: whole blocks in it count.
            bits = bytearray((self.count + 7) // 8)
            for i in range(self.count):
                offset, block = block_extent(i, self.length, self.block_size)
                if offset + block <= size:
                    bits[i // 8] |= 1 << (i % 8)
            _write_bits(self.bitmap, self._header, bits, durable=True)
            return bits
        # No part, a part too long, or a bitmap of another transfer: start over, bitmap first.
        self.part.unlink(missing_ok=True)
        bits = bytearray((self.count + 7) // 8)
        _write_bits(self.bitmap, self._header, bits, durable=True)
        return bits

    def _preallocate(self) -> None:
        if os.fstat(self._fd).st_size < self.length:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._fd, 0, self.length)
            else:  # pragma: no cover - not Linux
                os.ftruncate(self._fd, self.length)

    def has(self, index: int) -> bool:
        return bool(self._bits[index // 8] >> (index % 8) & 1)

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not self.has(i)]

    @property
    def is_complete(self) -> bool:
        return self.present == self.count

    def write_block(self, index: int, data: bytes) -> None:
        """Write block `index`; it is marked in memory and on disk at the next `persist`.

        Raises:
            DownloadError: the write failed (disk error).
        """
        offset, size = block_extent(index, self.length, self.block_size)
        if len(data) != size:
            raise ValueError(f"block {index} must be {size} bytes, got {len(data)}")
        try:
            os.pwrite(self._fd, data, offset)
        except OSError as exc:
            raise DownloadError(f"cannot write {self.part.name}: {exc.strerror or exc}") from exc
        if not self.has(index):
            self._bits[index // 8] |= 1 << (index % 8)
            self.present += 1
            self._unrecorded += 1

    def persist(self, *, force: bool = False) -> None:
        """Record written blocks in the bitmap when `persist_every` are waiting (or `force`);
        fsync part and bitmap when `sync_interval` has passed."""
        if self._unrecorded and time.monotonic() - self._last_sync >= self._sync_interval:
            self.sync()
        elif self._unrecorded >= self.persist_every or (force and self._unrecorded):
            _write_bits(self.bitmap, self._header, self._bits, durable=False)
            self._unrecorded = 0

    def sync(self) -> None:
        """Make every written block and its bit durable (part first, then bitmap)."""
        os.fsync(self._fd)
        _write_bits(self.bitmap, self._header, self._bits, durable=True)
        self._unrecorded = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            os.close(self._fd)
