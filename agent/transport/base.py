"""What every transport shares: the fetcher interface, its statistics, the final check.

A fetcher writes the bundle file to `destination` only when its length and
SHA-256 are those of the signed directive; until then the bytes live in
`<destination>.part` (and, for block transfer, `<destination>.blocks`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgefleet.errors import TamperedFileError, UsageError
from edgefleet.fileio import file_sha256, fsync_directory
from edgefleet.mqtt.directives import BundleRef, Directive, Source


class Fetcher(Protocol):
    """Fetches the bundle an install directive names. Called by the install state machine."""

    def fetch(self, directive: Directive, destination: Path) -> Path:
        """Write the directive's bundle to `destination` and return it.

        Raises:
            DownloadError: transient: the transfer failed; what arrived is kept
                for the next attempt to resume from.
            TamperedFileError: the complete file's SHA-256 differs from the directive's.
            FileLengthError: the source sent, or announced, another length than
                the directive's.
            CompatibilityError: no source of a transport this fetcher has.
            UsageError: not an install directive.
        """
        ...


class SourceFetcher(Protocol):
    """A fetcher for one kind of source, so `SourcesFetcher` can try sources in order."""

    def fetch_from(self, source: Source, bundle: BundleRef, destination: Path) -> Path: ...


@dataclass
class FetchStats:
    """What one `fetch` call did, for logs, tests and the benchmark."""

    transport: str
    resumed_from: int = 0  # bytes already on disk (and kept) when the transfer started
    bytes_received: int = 0  # bundle bytes that arrived over the network in this call
    restarts: int = 0  # times the part was thrown away and the transfer began again
    requests_sent: int = 0  # block transfer: request messages published
    blocks_received: int = 0  # block transfer: blocks written to the part file
    duplicates: int = 0  # block transfer: blocks that arrived again
    corrupt: int = 0  # block transfer: blocks whose data did not match block_sha256
    malformed: int = 0  # block transfer: data messages that did not parse or fit
    rerequested: int = 0  # block transfer: block indexes asked for again after a timeout


def install_bundle(directive: Directive) -> BundleRef:
    """The bundle of an install directive.

    Raises:
        UsageError: a rollback directive (it names no bundle to fetch).
    """
    if directive.action != "install" or directive.bundle is None:
        raise UsageError(
            f"directive {directive.sequence} is a {directive.action}: nothing to fetch"
        )
    return directive.bundle


def part_path(destination: Path) -> Path:
    return destination.with_name(destination.name + ".part")


def bitmap_path(destination: Path) -> Path:
    return destination.with_name(destination.name + ".blocks")


def sha256_file(path: Path) -> str:
    return file_sha256(path)[1]


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard_partial(destination: Path) -> None:
    """Remove what a transfer left (bitmap first, so a part never outlives a stale bitmap)."""
    bitmap_path(destination).unlink(missing_ok=True)
    part_path(destination).unlink(missing_ok=True)
    fsync_directory(destination.parent)


def is_complete(destination: Path, bundle: BundleRef) -> bool:
    """True when `destination` already holds the bundle (a crash after the final rename)."""
    try:
        if destination.stat().st_size != bundle.length:
            return False
    except FileNotFoundError:
        return False
    return sha256_file(destination) == bundle.sha256


def already_fetched(destination: Path, bundle: BundleRef) -> bool:
    """True, after tidying, when `destination` holds the bundle; a wrong file there is removed."""
    if is_complete(destination, bundle):
        discard_partial(destination)
        return True
    destination.unlink(missing_ok=True)
    return False


def finish(destination: Path, bundle: BundleRef) -> Path:
    """Check the complete part file and move it to `destination` atomically.

    The part and its bitmap are removed when the check fails, so the next
    attempt starts from zero rather than resuming into the same bad bytes.

    Raises:
        TamperedFileError: the part's SHA-256 is not the directive's.
    """
    part = part_path(destination)
    length = part.stat().st_size
    if length != bundle.length:  # the transports never let this happen
        discard_partial(destination)
        raise TamperedFileError(
            f"download holds {length} bytes, the directive says {bundle.length}"
        )
    fsync_file(part)
    actual = sha256_file(part)
    if actual != bundle.sha256:
        discard_partial(destination)
        raise TamperedFileError(
            f"downloaded {bundle.name} {bundle.version} has SHA-256 {actual}, "
            f"the directive says {bundle.sha256}"
        )
    os.replace(part, destination)
    bitmap_path(destination).unlink(missing_ok=True)
    fsync_directory(destination.parent)
    return destination
