"""The interfaces through which the installer meets the parts others build.

Each is a Protocol, so a transport, the MQTT outbox, the predictor's telemetry
or a test simulator satisfies it without importing anything from here. This
module imports no other part of the installer.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edgefleet.mqtt import Directive, StatusReport

if TYPE_CHECKING:
    from edgefleet.agent.versions import InstalledVersion


class Fetcher(Protocol):
    """A transport: delivers the bundle a directive names (built with the transports).

    `fetch` writes the complete bundle file at `destination` (or returns where
    it put it), reading from the directive's sources of the fetcher's transport,
    never more than `directive.bundle.length` bytes, resuming what a previous
    call left in `destination`'s directory (`<sha256>.part`, `<sha256>.blocks`).

    A fetcher that writes `destination` only once the file's length and SHA-256
    are the directive's (the transports do) says so with a class attribute
    `checks_digest = True`, and the installer does not hash what it delivered
    again; from any other fetcher the installer checks the file itself.

    Raises:
        DownloadError: the transport failed; the installer retries with backoff.
        Any UntrustedInputError: the bytes are wrong (fatal, no retry).
    """

    def fetch(self, directive: Directive, destination: Path) -> Path: ...


def checks_digest(fetcher: Fetcher) -> bool:
    """True when `fetcher` checks the length and SHA-256 of what it delivers (see Fetcher)."""
    return getattr(fetcher, "checks_digest", False) is True


class Reporter(Protocol):
    """Where status reports go (the MQTT outbox): one report per install transition.

    Called after the state is persisted and before its handler runs. Reports are
    at-least-once: after a restart the last persisted report is sent again with
    the same `sequence`, so the receiver deduplicates by sequence.
    """

    def report(self, status: StatusReport) -> None: ...


@dataclass(frozen=True)
class HealthSnapshot:
    """What the predictor served between a mark and now."""

    requests: int
    errors: int
    fallbacks: int
    latency_p95_ms: float | None  # None when there were no requests
    sample_ms: float | None = None  # median latency per sample of the answered calls


class HealthProbe(Protocol):
    """The predictor's live counters (built with the inference part).

    `mark()` returns an opaque token; `since(token)` counts what happened after it.
    """

    def mark(self) -> object: ...

    def since(self, mark: object) -> HealthSnapshot: ...


# Called after `current` changed (activation or rollback) so the predictor reloads;
# None when a rollback left nothing installed.
OnActivated = Callable[["InstalledVersion | None"], None]

# Called when the challenger changed (a shadow install, a promotion, a rollback) so
# the predictor runs the new one beside `current` (Predictor.set_challenger); None
# stops it. It may raise: in SHADOWING that fails the shadow install.
OnShadow = Callable[["InstalledVersion | None"], None]

# Called with a verified diagnostics directive, once its sequence is persisted (a replay
# is refused), so the agent answers with its log lines and status.
OnDiagnostics = Callable[[Directive], None]

# Called with a verified benchmark directive, once its sequence is persisted, so the agent
# measures the request's candidates apart from installing and serving (agent/benchmark.py).
OnBenchmark = Callable[[Directive], None]


class Clock(Protocol):
    """Wall time (directive expiry, report times), monotonic time and sleeping."""

    def now(self) -> dt.datetime: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo; None where the kernel does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def is_importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Host:
    """What the compatibility check asks of this machine; tests pass their own answers."""

    free_bytes: Callable[[Path], int] = field(default=disk_free_bytes)
    available_memory: Callable[[], int | None] = field(default=available_memory_bytes)
    has_module: Callable[[str], bool] = field(default=is_importable)
