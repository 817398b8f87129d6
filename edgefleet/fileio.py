"""Atomic file writes: a reader sees the old file or the new one, never a part.

Temp file in the same directory, fsync, os.replace, fsync of the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from edgefleet.errors import UsageError

_CHUNK = 1 << 20


def _check_parents(path: Path, what: str) -> None:
    """Missing parents are created when the output is written; an existing one must be a
    directory we can write into."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{what} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot write into {ancestor} (permission denied)")


def check_output_file(path: Path, what: str = "output") -> None:
    """Check, before any work, that a file can be written at `path` (missing parent
    directories are for the caller to create when it writes).

    Raises: UsageError naming `path` when it is a directory or a parent is not one.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(
            f"{what} {path} is a directory: give the file to write, e.g. {path / 'model.efb'}"
        )
    _check_parents(path, what)


def check_output_directory(path: Path, what: str = "output directory") -> None:
    """Check, before any work, that a directory can be made at `path` (missing parents are
    created): it is absent or an empty directory.

    Raises: UsageError naming `path`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file: give a new directory")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{what} {path} exists and is not empty: choose a new output directory")
    _check_parents(path, what)


def file_sha256(path: Path) -> tuple[int, str]:
    """Length and SHA-256 (hex) of the file at `path`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    length = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            length += len(chunk)
    return length, digest.hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Open a temporary file beside `path`; on success it replaces `path` atomically.

    On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically, with permission bits `mode`."""
    with atomic_writer(path, mode) as handle:
        handle.write(data)
