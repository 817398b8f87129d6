"""Getting the bundle file under downloads/ (the DOWNLOADING state).

Over the network a Fetcher (the transports' `SourcesFetcher`, or
`TransportFetchers` here) tries the directive's sources in their order; all
failing is one transient DownloadError, which the machine retries with
jittered exponential backoff. The destination is `downloads/<sha256>`, the
transports keep `<sha256>.part` and `<sha256>.blocks` beside it to resume.
`LocalFileFetcher` reads a local file: `agent install BUNDLE_FILE` from a USB
stick, or a directive delivered offline with its bundle. Either way the file
is copied under downloads/ first, so the install survives the stick being
pulled and verifies bytes that nobody else can change.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping
from pathlib import Path

from edgefleet.agent.errors import CompatibilityError, DownloadError
from edgefleet.agent.install.interfaces import Fetcher, checks_digest
from edgefleet.agent.layout import PRIVATE_FILE
from edgefleet.backoff import Backoff
from edgefleet.errors import BundleTooLargeError, FileLengthError, TamperedFileError
from edgefleet.fileio import fsync_directory
from edgefleet.mqtt import Directive

_CHUNK = 1 << 20
MAX_DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_BACKOFF = Backoff(initial=2.0, maximum=300.0)


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before download attempt `attempt` + 1 (attempt >= 1 failures so far)."""
    return DOWNLOAD_BACKOFF.delay(attempt - 1, rng)


def copy_bounded(source: Path, destination: Path, max_bytes: int) -> tuple[int, str]:
    """Copy `source` to `destination` atomically, at most `max_bytes`; return length, SHA-256.

    Raises:
        BundleTooLargeError: `source` holds more than `max_bytes`.
        DownloadError: `source` cannot be read or `destination` written (transient).
    """
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.sha256()
    length = 0
    try:
        partial.unlink(missing_ok=True)  # created anew: private whatever an older one was
        with open(source, "rb") as reader, open(partial, "xb", opener=_private) as writer:
            while chunk := reader.read(_CHUNK):
                length += len(chunk)
                if length > max_bytes:
                    raise BundleTooLargeError(
                        f"{source} holds more than {max_bytes} bytes, the size limit"
                    )
                digest.update(chunk)
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(partial, destination)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"cannot copy {source}: {exc.strerror or exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(destination.parent)
    return length, digest.hexdigest()


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, PRIVATE_FILE)


class LocalFileFetcher:
    """A Fetcher that reads the bundle from a local file instead of a transport."""

    checks_digest = True  # `fetch` hashes the file as it copies it

    def __init__(self, source: Path) -> None:
        self.source = Path(source)

    def fetch(self, directive: Directive, destination: Path) -> Path:
        """Copy the file, bounded by the directive's length and checked against its digest.

        Raises:
            FileLengthError, TamperedFileError: the file is not the bundle the directive names.
            BundleTooLargeError: longer than the directive says.
            DownloadError: the file cannot be read.
        """
        bundle = directive.bundle
        if bundle is None:
            raise DownloadError("the directive names no bundle to fetch")
        length, sha256 = copy_bounded(self.source, destination, bundle.length)
        if length != bundle.length:
            destination.unlink(missing_ok=True)
            raise FileLengthError(
                f"{self.source} is {length} bytes, the directive says {bundle.length}"
            )
        if sha256 != bundle.sha256:
            destination.unlink(missing_ok=True)
            raise TamperedFileError(f"{self.source} does not match the directive's SHA-256")
        return destination

    def copy(self, destination: Path, max_bytes: int) -> tuple[int, str]:
        """Copy the file for an install without a directive; return its length and SHA-256."""
        return copy_bounded(self.source, destination, max_bytes)


class TransportFetchers:
    """A Fetcher over one fetcher per transport name ("http", "mqtt-blocks").

    The directive's sources are tried in their order, each with the fetcher
    registered for its transport; the first that delivers wins. (The transports'
    own `SourcesFetcher` does the same and can be passed to the installer as it is.)
    """

    def __init__(self, by_transport: Mapping[str, Fetcher]) -> None:
        self.by_transport = dict(by_transport)
        self.checks_digest = all(map(checks_digest, self.by_transport.values()))

    def fetch(self, directive: Directive, destination: Path) -> Path:
        """Raises:
        CompatibilityError: no source uses a transport this agent has (fatal).
        DownloadError: every usable source failed (transient), naming each failure.
        Any UntrustedInputError a fetcher raises (fatal).
        """
        usable = [s.transport for s in directive.sources if s.transport in self.by_transport]
        if not usable:
            offered = ", ".join(s.transport for s in directive.sources) or "none"
            raise CompatibilityError(
                f"no transport for the directive's sources ({offered}); this agent has "
                f"{', '.join(sorted(self.by_transport)) or 'none'}"
            )
        failures = []
        for transport in dict.fromkeys(usable):
            try:
                return self.by_transport[transport].fetch(directive, destination)
            except DownloadError as exc:
                failures.append(f"{transport}: {exc}")
            except OSError as exc:  # a fetcher's disk error (ENOSPC...) is transient too
                failures.append(f"{transport}: {exc.strerror or exc}")
        raise DownloadError("; ".join(failures))
