"""Diagnostics on request: the agent's recent log lines, and the answer to the server.

`LogRing` is a logging handler the agent runner installs on the root logger
while it runs: it keeps the newest `MAX_LOG_LINES` records of INFO and above
in memory (never on disk), each reduced to its time, level, logger and
message (an exception adds its type and message, never a traceback), cut to
`MAX_LOG_LINE_CHARS`. The agent never logs a secret (keys, tokens, broker
passwords are redacted where URLs are described); as a second wall, the ring
replaces anything shaped like an edgefleet token (`efa_...`, `efe_...`) or a
URL's password before it keeps a line.

`diagnostics_answer` builds the answer to a verified diagnostics directive:
the ring's lines (newest kept, at most `MAX_LOG_BYTES` together) and the
status the runner gathers, within `MAX_DIAGNOSTICS_BYTES` once encoded
(older lines are left out until it fits).
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from edgefleet.agent.heartbeat import memory, temperature_celsius, uptime_seconds
from edgefleet.errors import UsageError
from edgefleet.mqtt.directives import Directive
from edgefleet.mqtt.messages import (
    MAX_DIAGNOSTICS_BYTES,
    MAX_LOG_BYTES,
    MAX_LOG_LINE_CHARS,
    MAX_LOG_LINES,
    DiagnosticsReport,
    LogLevel,
    LogLine,
    encode_message,
)
from edgefleet.timefmt import format_time, utcnow

_TOKEN = re.compile(r"\bef[ae]_[A-Za-z0-9_-]+")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")
# Highest first: a record of a level of its own is named by the standard one below it.
_LEVELS: tuple[tuple[int, LogLevel], ...] = (
    (logging.CRITICAL, "CRITICAL"),
    (logging.ERROR, "ERROR"),
    (logging.WARNING, "WARNING"),
    (logging.INFO, "INFO"),
)


def redact(text: str) -> str:
    """`text` with edgefleet tokens and URL passwords replaced by `***`."""
    return _URL_PASSWORD.sub(r"\1***@", _TOKEN.sub(lambda m: m.group()[:4] + "***", text))


class LogRing(logging.Handler):
    """The newest `capacity` log records of INFO and above, as `LogLine`s."""

    def __init__(self, capacity: int = MAX_LOG_LINES) -> None:
        super().__init__(logging.INFO)
        self._lines: collections.deque[LogLine] = collections.deque(maxlen=capacity)
        self._lines_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                error = record.exc_info[1]
                message += f" ({type(error).__name__}: {error})"
            line = LogLine(
                at=format_time(dt.datetime.fromtimestamp(record.created, dt.timezone.utc)),
                level=next((name for number, name in _LEVELS if record.levelno >= number), "DEBUG"),
                logger=record.name[:128],
                message=redact(message)[:MAX_LOG_LINE_CHARS],
            )
        except Exception:
            self.handleError(record)
            return
        with self._lines_lock:
            self._lines.append(line)

    def lines(self) -> list[LogLine]:
        """The kept lines, oldest first, the newest of them within `MAX_LOG_BYTES` together."""
        with self._lines_lock:
            newest_first = list(reversed(self._lines))
        kept: list[LogLine] = []
        total = 0
        for line in newest_first:
            total += len(line.message.encode("utf-8"))
            if total > MAX_LOG_BYTES:
                break
            kept.append(line)
        return kept[::-1]


def system_figures(state_dir: Path) -> dict[str, Any]:
    """Uptime, memory, the state directory's disk and the temperature, as a heartbeat has them."""
    used, total = memory()
    disk = os.statvfs(state_dir)
    return {
        "uptime_s": uptime_seconds(),
        "memory_used_bytes": used,
        "memory_total_bytes": total,
        "disk_free_bytes": disk.f_bavail * disk.f_frsize,
        "disk_total_bytes": disk.f_blocks * disk.f_frsize,
        "temperature_c": temperature_celsius(),
    }


def diagnostics_answer(
    directive: Directive, lines: list[LogLine], status: dict[str, Any]
) -> DiagnosticsReport:
    """The answer to `directive` (a verified diagnostics directive), within the size bound.

    Raises:
        UsageError: `directive` is not a diagnostics directive.
    """
    if directive.action != "diagnostics" or directive.request_id is None:
        raise UsageError(f"a {directive.action} directive asks for no diagnostics")
    kept = list(lines)
    while True:
        report = DiagnosticsReport(
            device_id=directive.device_id,
            sent_at=format_time(utcnow()),
            request_id=directive.request_id,
            directive_sequence=directive.sequence,
            log_lines=kept,
            status=status,
        )
        if len(encode_message(report)) <= MAX_DIAGNOSTICS_BYTES or not kept:
            return report
        kept = kept[len(kept) // 4 + 1 :]  # leave out the oldest quarter and try again


__all__ = ["LogRing", "diagnostics_answer", "redact", "system_figures"]
