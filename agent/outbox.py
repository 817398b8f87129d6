"""Store-and-forward: status reports, telemetry windows and diagnostics answers wait on disk
until the broker has them.

    outbox/
      000000000001.status.msg       one message per file, numbered in the order put
      000000000002.telemetry.msg    (payload bytes exactly as published)
      dropped.count                 telemetry windows dropped at the bound, not yet reported

Invariants:
- a message is on disk (temporary file, fsync, rename, directory fsync) before
  `put` returns, and it leaves only by `remove`, which the link calls after the
  broker's PUBACK: nothing is lost to a crash or an outage, at the price of a
  duplicate when the crash falls between PUBACK and removal (QoS 1 is
  at-least-once anyway; status reports carry a sequence for the server to dedupe);
- messages are handed out oldest first, and a restart reloads them in that order;
- the total payload bytes stay under `max_bytes` by dropping the oldest
  telemetry windows not already handed to the broker; each drop is counted,
  and the count (persisted) goes out with the next telemetry window as
  `dropped_windows` (`take_dropped_count`); dropping a window that carried
  such a count adds it back, so no drop goes unreported. Status reports and
  diagnostics answers are never dropped: they alone may take the outbox over
  its bound (there is one per install transition or operator's request, so few).

Heartbeats do not come here: the next one supersedes them (see `AgentLink.publish`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from edgefleet.errors import UsageError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.mqtt.topics import TopicKind

_TAGS = {
    TopicKind.STATUS: "status",
    TopicKind.TELEMETRY: "telemetry",
    TopicKind.DIAGNOSTICS: "diagnostics",
}
_KINDS = {tag: kind for kind, tag in _TAGS.items()}
_NAME = re.compile(r"^(\d{12})\.(status|telemetry|diagnostics)\.msg$")
_DROPPED = "dropped.count"


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    kind: TopicKind
    size: int
    path: Path

    def read(self) -> bytes:
        """The payload. Raises: OSError when the file went away (removed meanwhile)."""
        return self.path.read_bytes()


class Outbox:
    """A bounded, ordered, crash-safe queue of outgoing messages in one directory.

    Thread-safe: the agent's producers `put`, the link's network thread takes and removes.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        """Open the queue at `directory` (created if missing), reloading what is there."""
        if max_bytes < 1:
            raise UsageError("max_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: dict[int, OutboxEntry] = {}  # insertion order is seq order
        self._in_flight: set[int] = set()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        found: list[OutboxEntry] = []
        for path in self.directory.iterdir():
            match = _NAME.fullmatch(path.name)
            if match:
                found.append(
                    OutboxEntry(int(match[1]), _KINDS[match[2]], path.stat().st_size, path)
                )
            elif path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write that a crash cut short
        for entry in sorted(found, key=lambda e: e.seq):
            self._entries[entry.seq] = entry
        self._next_seq = max(self._entries, default=0) + 1
        self._size = sum(entry.size for entry in found)
        try:
            self._dropped = int((self.directory / _DROPPED).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            self._dropped = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._size

    @property
    def dropped_count(self) -> int:
        """Telemetry windows dropped and not yet taken for a report."""
        with self._lock:
            return self._dropped

    def entries(self) -> list[OutboxEntry]:
        """Every queued message, oldest first."""
        with self._lock:
            return list(self._entries.values())

    def put(self, kind: TopicKind, payload: bytes) -> int | None:
        """Queue `payload`; return its number, or None when a telemetry window had no room.

        Raises:
            UsageError: a kind other than status, telemetry or diagnostics.
            OSError: the disk refused the write (nothing was queued).
        """
        if kind not in _TAGS:
            raise UsageError(
                f"the outbox holds status, telemetry and diagnostics, not {kind.value}"
            )
        size = len(payload)
        with self._lock:
            self._make_room(size)
            if kind is TopicKind.TELEMETRY and self._size + size > self.max_bytes:
                self._count_drops(1)
                return None
            seq = self._next_seq
            path = self.directory / f"{seq:012d}.{_TAGS[kind]}.msg"
            atomic_write_bytes(path, payload, mode=0o600)
            self._next_seq += 1
            self._entries[seq] = OutboxEntry(seq, kind, size, path)
            self._size += size
            return seq

    def _make_room(self, size: int) -> None:
        if self._size + size <= self.max_bytes:
            return
        victims: list[OutboxEntry] = []
        freed = 0
        for entry in self._entries.values():
            if self._size - freed + size <= self.max_bytes:
                break
            if entry.kind is TopicKind.TELEMETRY and entry.seq not in self._in_flight:
                victims.append(entry)
                freed += entry.size
        if victims:
            # A dropped window may itself carry the count of earlier drops: keep that too.
            self._count_drops(sum(1 + _carried_drops(entry) for entry in victims))
        for entry in victims:
            self._forget(entry)

    def _forget(self, entry: OutboxEntry) -> None:
        entry.path.unlink(missing_ok=True)
        del self._entries[entry.seq]
        self._in_flight.discard(entry.seq)
        self._size -= entry.size

    def _count_drops(self, count: int) -> None:
        self._dropped += count
        atomic_write_bytes(self.directory / _DROPPED, str(self._dropped).encode("ascii"))

    def take_dropped_count(self) -> int:
        """The number of telemetry windows dropped since the last call, then zero.

        The caller puts it in the next telemetry window's `dropped_windows`.
        """
        with self._lock:
            count, self._dropped = self._dropped, 0
            if count:
                atomic_write_bytes(self.directory / _DROPPED, b"0")
            return count

    def take_pending(self, limit: int, exclude: Collection[int] = ()) -> list[OutboxEntry]:
        """Up to `limit` of the oldest messages not yet handed out, now marked in flight.

        In-flight messages are not dropped at the bound (the broker may already have them).
        """
        with self._lock:
            picked: list[OutboxEntry] = []
            for entry in self._entries.values():
                if len(picked) >= limit:
                    break
                if entry.seq not in self._in_flight and entry.seq not in exclude:
                    picked.append(entry)
                    self._in_flight.add(entry.seq)
            return picked

    def release_in_flight(self) -> None:
        """Forget what was handed out (the link stopped): it will be handed out again."""
        with self._lock:
            self._in_flight.clear()

    def remove(self, seq: int) -> None:
        """Delete message `seq` once the broker acknowledged it (no-op when already gone)."""
        with self._lock:
            entry = self._entries.get(seq)
            if entry is not None:
                self._forget(entry)

    def close(self) -> None:
        """Nothing to flush (every write is durable); present for symmetry with the link."""
        with self._lock:
            self._in_flight.clear()


def _carried_drops(entry: OutboxEntry) -> int:
    """The `dropped_windows` a queued telemetry window reports (0 when unreadable)."""
    try:
        value = json.loads(entry.read()).get("dropped_windows", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if type(value) is int and value > 0 else 0


def outbox_is_empty(directory: Path) -> bool:
    """True when no message waits in `directory` (for `agent status`, without opening it)."""
    try:
        return not any(_NAME.fullmatch(name) for name in os.listdir(directory))
    except FileNotFoundError:
        return True
