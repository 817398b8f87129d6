"""Ingestion: what devices publish becomes device state, status history and telemetry buckets.

`Ingestor.handle(topic, payload)` is called by the link's worker thread(s) for
every message (thread-safe, as long as one device's messages come from one
thread, which `ServerLink` guarantees) and never raises: a bad message is
counted (`.refused` by reason), logged (one line per reason per `LOG_EVERY_S`)
and dropped. Order of checks for
a device message: the topic (a per-device topic of this namespace), the device's
enrolled key (unknown -> "unknown-device"), its signature over topic and bytes
("device-signature", `edgefleet.mqtt.devicesig`), for a diagnostics answer its size
("diagnostics-too-large", above `MAX_DIAGNOSTICS_BYTES`: nothing of it is stored), the
schema ("malformed"), then
the time the device dated it (a heartbeat's or status report's `sent_at`, a
telemetry window's end): more than `settings.max_clock_ahead` ahead of this
server's clock is "clock-ahead", logged once per device per `LOG_EVERY_S`, so
neither a wrong clock nor a stolen key can date a heartbeat that outranks the
device's honest ones until that date.
Presence (the Last Will) is unsigned by design: it only sets online/offline and
the next signed heartbeat corrects it.

The per-message path touches no database. Accepted messages are merged into
an in-memory batch: heartbeats coalesce per device (the last one sent wins)
and each is merged into its device's minute of heartbeat history
(`edgefleet.server.history`), presence coalesces too (with the reason of the
change it may make), status reports and diagnostics answers queue, telemetry
windows merge into `TelemetryAggregate`s per (device, bundle, version, bucket). `flush` (every
`settings.telemetry_flush_s` on the worker `flusher`, and at `stop`) writes a
batch in one unit of work (`batch.BatchWriter`: status deduplicated by
sequence, telemetry merged into buckets, devices locked in id order).
A batch that cannot be written (`WRITE_ATTEMPTS` tries) is either held back
by an outage or refused for what it holds, and a trivial write tells which
(`_database_takes_writes`: an UPDATE of no row). When the database does not
take it (down, unreachable, read-only, not migrated), the batch stays queued
and is retried at the next flush, before any later one; nothing is dropped (the
link's flow control bounds what waits: `when_stored`). When the database takes
it, the batch is cut into one batch per device (`IngestBatch.device_parts`, in
device id order) written one after the other, before any later batch; a device's
part that still fails all its tries for what it holds (not for a lock, a
deadlock or a lost connection, which wait for the next flush as an outage does)
is dead-lettered: set aside, logged as an
ERROR naming the device, what was set aside (`IngestBatch.contents`) and the
database's error, counted by kind in `dead_lettered`, kept in the database as
the device sent it (`edgefleet.server.deadletters`, from `IngestBatch.kept`)
and as `last_dead_letter` (the health check shows it). `replay` takes a dead
letter's messages again through `_take`, the path of every message, in the
caller's thread (they are older than what the device sent since, and are
ordered by their own dates and sequences, as redelivered messages are), and
writes them. The batch's `on_stored`
callbacks are called once all its parts are written or set aside, so one
device's message the database refuses does not hold back the fleet.
The devices a written batch brought back (`BatchWriter.write`) are handed to
`on_return` (the rollout side's `resend.Returns.add`, which only records them:
ingestion never waits for directives to be sent).

Deduplication of status reports: in memory, the highest sequence per device
together with the key that signed it (a device removed and enrolled again with
a new key counts from 1 again, and is not taken for a replay); at the write,
`Device.status_sequence`.

Deduplication of telemetry: a window is identified by (device, window_start);
the most recent `TELEMETRY_DEDUPE_SIZE` identities are remembered, so a window
redelivered by the broker or re-sent from a device's outbox is not counted
twice.

Nothing handled is lost when the process dies: `when_stored(callback)` calls
`callback` once every message handled before the call is written (at once
when the batches hold no message), and the link acknowledges messages to the
broker only then; what was not acknowledged is redelivered to the replica's
session.

Lifecycle in a server: `start()` (the flusher), hand `handle` to the link,
and at shutdown stop the link first (it handles what it queued), then `stop()`
here (a last flush).
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import false
from sqlalchemy import update as update_rows
from sqlalchemy.exc import OperationalError

from edgefleet.errors import DeviceSignatureError, MessageSchemaError, UsageError
from edgefleet.mqtt.devicesig import verify_device_payload
from edgefleet.mqtt.messages import (
    MAX_DIAGNOSTICS_BYTES,
    MESSAGE_TYPES,
    DiagnosticsReport,
    Heartbeat,
    Presence,
    StatusReport,
    TelemetryWindow,
    parse_message,
    parse_presence,
)
from edgefleet.mqtt.topics import DeviceId, TopicKind, parse_device_topic
from edgefleet.server import history
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device
from edgefleet.server.deadletters import (
    describe_dropped,
    discard_dead_letter,
    get_dead_letter,
    keep_dead_letter,
    letters_of,
)
from edgefleet.server.errors import ConflictError, NotFoundError, StorageError
from edgefleet.server.mqtt.aggregate import TelemetryAggregate, bucket_start
from edgefleet.server.mqtt.batch import BatchWriter, DeviceUpdate, IngestBatch, KeptMessage
from edgefleet.server.mqtt.interfaces import DeviceKeys, MessageHandler
from edgefleet.server.settings import ServerSettings
from edgefleet.timefmt import parse_time, utcnow
from edgefleet.worker import Worker

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
TELEMETRY_DEDUPE_SIZE = 200_000
TOPIC_CACHE_SIZE = 100_000
# The reason a presence message gives for the change it makes (PresenceChange.reason).
PRESENCE_REASONS = {
    Presence.ONLINE: "connected",
    Presence.OFFLINE_CLEAN: "disconnected cleanly",
    Presence.OFFLINE: "connection lost (last will)",
}
WRITE_ATTEMPTS = 3
TAKEN = "taken"  # what `_take` says of a message merged into the batch


@dataclass(frozen=True)
class DeadLetter:
    """What ingestion set aside of one device because the database refused it."""

    device_id: str
    at: dt.datetime
    dropped: dict[str, int]  # messages by kind (`IngestBatch.contents`)
    error: str  # the database's error, one line
    kept_id: int | None = None  # the dead letter that keeps them (None: nothing kept)


@dataclass(frozen=True)
class Replay:
    """What `Ingestor.replay` made of a dead letter."""

    device_id: str
    outcomes: dict[str, int]  # per message: TAKEN, "duplicate" or the reason it was refused
    settled: bool  # written or set aside again, and the dead letter deleted (False: waiting)
    again: DeadLetter | None  # set aside again: the new dead letter


class Ingestor:
    """Turns device messages into database state, in batches. See the module docstring."""

    def __init__(
        self,
        db: Database,
        keys: DeviceKeys,
        settings: ServerSettings,
        clock: Callable[[], dt.datetime] = utcnow,
        blocks: MessageHandler | None = None,
        on_return: Callable[[set[str]], None] | None = None,
    ) -> None:
        self._db = db
        self._on_return = on_return
        self._keys = keys
        self._settings = settings
        self._clock = clock
        self._blocks = blocks
        self._bucket = settings.telemetry_bucket
        self.counts: collections.Counter[str] = collections.Counter()  # kind -> accepted
        self.refused: collections.Counter[str] = collections.Counter()  # reason -> n
        self._duplicates: collections.Counter[str] = collections.Counter()  # kind -> n
        self.flushes = 0
        self.flush_failures = 0
        self.flushed_messages = 0
        self.dead_lettered: collections.Counter[str] = collections.Counter()  # kind -> n
        self.last_dead_letter: DeadLetter | None = None
        self._lock = threading.Lock()  # guards _batch (worker thread vs flush thread)
        self._flush_lock = threading.Lock()
        self._replay_lock = threading.Lock()  # one replay at a time: a dead letter replays once
        self._replays_waiting: set[int] = set()  # dead letters replayed, not written yet
        self._batch = IngestBatch()
        self._writer = BatchWriter(
            is_sqlite=db.is_sqlite,
            status_reports_kept=settings.status_reports_kept,
            max_clock_ahead=settings.max_clock_ahead,
            return_gap=settings.offline_after,
        )
        self._pending: collections.deque[IngestBatch] = collections.deque()
        self._order = 0
        # device id -> (public key, highest status sequence seen signed by that key)
        self._status_seen: dict[str, tuple[str, int]] = {}
        self._windows_seen: collections.OrderedDict[tuple[str, str], None] = (
            collections.OrderedDict()
        )
        self._bucket_starts: dict[str, dt.datetime] = {}
        self._topics: dict[str, tuple[DeviceId, TopicKind]] = {}
        self._last_log: dict[str, float] = {}
        self.flusher = Worker("edgefleet-flush", self.flush, settings.telemetry_flush_s)

    # -- per message (the link's worker thread) ----------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """Take one message from the broker. Never raises."""
        self._take(topic, payload)

    def _take(self, topic: str, payload: bytes) -> str:
        """Take one message; returns what became of it: TAKEN (into the batch), "duplicate",
        or the reason it was refused."""
        parsed = self._topics.get(topic)
        if parsed is None:
            try:
                parsed = parse_device_topic(topic)
            except MessageSchemaError as exc:
                return self._refuse("bad-topic", exc)
            if len(self._topics) >= TOPIC_CACHE_SIZE:
                self._topics.clear()
            self._topics[topic] = parsed
        device_id, kind = parsed
        if kind is TopicKind.PRESENCE:
            return self._on_presence(device_id, payload)
        verified = self._verify(device_id, topic, payload)
        if isinstance(verified, str):
            return verified
        message_bytes, key = verified
        if kind is TopicKind.BLOCKS_REQUEST:
            return self._on_blocks(topic, message_bytes)
        model_cls = MESSAGE_TYPES.get(kind)
        if model_cls is None:  # a kind devices do not publish (directive, blocks/data)
            return self._refuse("bad-topic", f"devices do not publish on {topic!r}")
        if kind is TopicKind.DIAGNOSTICS and len(message_bytes) > MAX_DIAGNOSTICS_BYTES:
            detail = (
                f"a diagnostics answer of {len(message_bytes)} bytes from {device_id!r}, "
                f"above the {MAX_DIAGNOSTICS_BYTES} limit"
            )
            return self._refuse("diagnostics-too-large", detail, per=device_id)
        try:
            # parse_device_message without parsing the topic a second time
            message = parse_message(model_cls, message_bytes)
        except MessageSchemaError as exc:
            return self._refuse("malformed", exc)
        if message.device_id != device_id:
            return self._refuse("malformed", f"a message on {topic!r} names {message.device_id!r}")
        now = self._clock()
        if isinstance(message, TelemetryWindow):
            arrived = KeptMessage(device_id, topic, payload, now, message.window_start)
            return self._on_telemetry(arrived, message)
        arrived = KeptMessage(device_id, topic, payload, now)
        if isinstance(message, Heartbeat):
            return self._on_heartbeat(arrived, message)
        if isinstance(message, StatusReport):
            return self._on_status(arrived, key, message)
        if isinstance(message, DiagnosticsReport):
            return self._on_diagnostics(arrived, message)
        return self._refuse("bad-topic", f"devices do not publish on {topic!r}")

    def _dated_ahead(self, device_id: str, what: str, dated: str, now: dt.datetime) -> bool:
        """Whether the device dated a message beyond `max_clock_ahead` from `now` (refused)."""
        ahead = parse_time(dated) - now
        if ahead <= self._settings.max_clock_ahead:
            return False
        detail = (
            f"device {device_id!r} dated a {what} {ahead} ahead of this server's clock "
            f"(tolerance {self._settings.max_clock_ahead}): check both clocks (NTP)"
        )
        self._refuse("clock-ahead", detail, per=device_id)
        return True

    def _verify(self, device_id: str, topic: str, payload: bytes) -> tuple[bytes, str] | str:
        """(message bytes, the key that verified them) when the device's enrolled key
        signed them; else the reason it is refused (counted)."""
        try:
            key = self._keys.public_key(device_id)
            if key is None:
                return self._refuse("unknown-device", f"message from unknown device {device_id!r}")
            try:
                return verify_device_payload(topic, payload, key), key
            except DeviceSignatureError as exc:
                # Removed and enrolled again with a new key through another replica?
                # The key cache reloads at most once per interval, so forged
                # messages cannot each cost a query.
                fresh = self._keys.public_key(device_id, fresh=True)
                if fresh is None or fresh == key:
                    return self._refuse("device-signature", exc)
            try:
                return verify_device_payload(topic, payload, fresh), fresh
            except DeviceSignatureError as exc:
                return self._refuse("device-signature", exc)
        except UsageError as exc:  # a stored key that is not a key: ours to fix, not theirs
            return self._refuse("bad-stored-key", exc)
        except StorageError as exc:
            return self._refuse("key-lookup-failed", exc)

    def _on_presence(self, device_id: str, payload: bytes) -> str:
        try:
            presence = parse_presence(payload)
        except MessageSchemaError as exc:
            return self._refuse("malformed", exc)
        now = self._clock()
        with self._lock:
            update = self._update(device_id)
            update.online = presence is Presence.ONLINE
            update.connected = update.connected or update.online
            update.online_reason = PRESENCE_REASONS[presence]
            update.online_at = now
            if update.online:
                update.last_seen = now
            update.messages += 1
            self._batch.messages += 1
            self.counts["presence"] += 1
        return TAKEN

    def _on_blocks(self, topic: str, payload: bytes) -> str:
        if self._blocks is None:
            return self._refuse("no-block-service", "a block request, and no block service here")
        with self._lock:
            self.counts["blocks/request"] += 1
        try:
            self._blocks(topic, payload)
        except Exception:
            log.exception("the block service failed on %s", topic)
        return TAKEN

    def _on_heartbeat(self, arrived: KeptMessage, message: Heartbeat) -> str:
        device_id, now = arrived.device_id, arrived.received_at
        if self._dated_ahead(device_id, message.what, message.sent_at, now):
            return "clock-ahead"
        with self._lock:
            update = self._seen(device_id, now)
            self._order += 1
            update.offer_heartbeat(message, self._order)  # an older one than kept is dropped
            slot_key = (device_id, history.slot_start(now, history.SLOT_S))
            slots = self._batch.heartbeat_slots
            slot = slots.get(slot_key)
            if slot is None:
                slot = slots[slot_key] = history.HeartbeatSlot()
            slot.add(message)
            self._count_in(update, arrived, "heartbeat")
        return TAKEN

    def _on_status(self, arrived: KeptMessage, key: str, message: StatusReport) -> str:
        device_id, now = arrived.device_id, arrived.received_at
        if self._dated_ahead(device_id, message.what, message.sent_at, now):
            return "clock-ahead"
        with self._lock:
            seen = self._status_seen.get(device_id)
            # A sequence is remembered with the key that signed it: a device removed
            # and enrolled again has a new key and counts from 1 again.
            if seen is not None and seen[0] == key and message.sequence <= seen[1]:
                self._duplicates["status"] += 1
                return "duplicate"
            self._status_seen[device_id] = (key, message.sequence)
            update = self._seen(device_id, now)
            self._order += 1
            update.statuses.append((self._order, now, message))
            self._count_in(update, arrived, "status")
        return TAKEN

    def _on_diagnostics(self, arrived: KeptMessage, message: DiagnosticsReport) -> str:
        device_id, now = arrived.device_id, arrived.received_at
        if self._dated_ahead(device_id, message.what, message.sent_at, now):
            return "clock-ahead"
        with self._lock:
            update = self._seen(device_id, now)
            self._batch.diagnostics.append((device_id, message, now))
            self._count_in(update, arrived, "diagnostics")
        return TAKEN

    def _on_telemetry(self, arrived: KeptMessage, window: TelemetryWindow) -> str:
        device_id, now = arrived.device_id, arrived.received_at
        if self._dated_ahead(device_id, window.what, window.window_end, now):
            return "clock-ahead"
        start = self._bucket_starts.get(window.window_start)
        if start is None:
            if len(self._bucket_starts) > 4096:
                self._bucket_starts.clear()
            start = bucket_start(parse_time(window.window_start), self._bucket)
            self._bucket_starts[window.window_start] = start
        key = (device_id, window.bundle_name, window.bundle_version, start)
        identity = (device_id, window.window_start)
        with self._lock:
            seen = self._windows_seen
            if identity in seen:
                self._duplicates["telemetry"] += 1
                return "duplicate"
            seen[identity] = None
            if len(seen) > TELEMETRY_DEDUPE_SIZE:
                seen.popitem(last=False)
            batch = self._batch
            aggregate = batch.telemetry.get(key)
            if aggregate is None:
                aggregate = batch.telemetry[key] = TelemetryAggregate()
            aggregate.add_window(window)
            update = self._seen(device_id, now)
            self._count_in(update, arrived, "telemetry")
        return TAKEN

    def _count_in(self, update: DeviceUpdate, arrived: KeptMessage, kind: str) -> None:
        """A signed message merged into the batch (under the lock): counted and kept."""
        update.messages += 1
        self._batch.messages += 1
        self._batch.kept.append(arrived)
        self.counts[kind] += 1

    def _update(self, device_id: str) -> DeviceUpdate:
        update = self._batch.devices.get(device_id)
        if update is None:
            update = self._batch.devices[device_id] = DeviceUpdate()
        return update

    def _seen(self, device_id: str, now: dt.datetime) -> DeviceUpdate:
        """A signed message arrived just now: the device is connected."""
        update = self._update(device_id)
        if update.online is not True:
            update.online, update.online_reason, update.online_at = True, "reporting again", now
        update.last_seen = now
        return update

    def _refuse(self, reason: str, detail: object, per: str = "") -> str:
        """Count a refusal; log it once per `LOG_EVERY_S` per reason (and per `per`, a device).
        Returns `reason`."""
        with self._lock:
            self.refused[reason] += 1
        now = time.monotonic()
        subject = f"{reason} {per}"
        if now - self._last_log.get(subject, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_log[subject] = now
            log.warning("refused a device message (%s): %s", reason, detail)
        return reason

    def when_stored(self, callback: Callable[[], None]) -> None:
        """Call `callback` (in the flushing thread) once every message handled so far is
        written. Never raises; `callback` must not raise either."""
        with self._lock:
            self._batch.on_stored.append(callback)

    # -- flushing ----------------------------------------------------------------------------

    def start(self) -> None:
        """Flush every `settings.telemetry_flush_s` on the worker `flusher` until `stop`.

        Raises:
            RuntimeError: called twice.
        """
        self.flusher.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the flusher, then write what is left."""
        self.flusher.stop(timeout)
        self.flush()

    def flush(self) -> int:
        """Write the current batch (and any left from failed flushes); return messages written.

        Never raises for a database failure: in an outage the batch stays queued and
        is retried; what the database refuses of one device is dead-lettered (see the
        module docstring).
        """
        with self._flush_lock:
            with self._lock:
                batch, self._batch = self._batch, IngestBatch()
            if batch.messages or batch.on_stored:
                self._pending.append(batch)
            written = 0
            while self._pending:
                batch = self._pending[0]
                failure = self._write_with_retries(batch)
                if failure is not None:
                    if not self._database_takes_writes():
                        break  # an outage: retried at the next flush
                    if len(batch.devices) > 1:
                        self._pending.popleft()
                        parts = batch.device_parts()
                        parts[-1].on_stored.extend(batch.on_stored)
                        self._pending.extendleft(reversed(parts))
                        continue
                    if _transient(failure):
                        break  # a lock or a lost connection: retried at the next flush
                    self._dead_letter(batch, failure)
                else:
                    written += batch.messages
                self._pending.popleft()
                for callback in batch.on_stored:
                    callback()
            self.flushes += 1
            self.flushed_messages += written
            return written

    def _write_with_retries(self, batch: IngestBatch) -> Exception | None:
        """Write `batch` in one unit of work, `WRITE_ATTEMPTS` tries; the last error, if
        every try failed."""
        if not batch.messages:
            return None
        failure: Exception | None = None
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self._db.session() as session:
                    returned = self._writer.write(session, batch)
                if returned and self._on_return is not None:
                    self._on_return(returned)
                return None
            # OverflowError: sqlite3 refuses an integer beyond 64 bits (a sum of counts)
            # before the database sees it; PostgreSQL answers a StorageError.
            except (StorageError, OverflowError) as exc:
                failure = exc
                self.flush_failures += 1
                log.warning("writing ingested messages failed (attempt %d): %s", attempt + 1, exc)
                time.sleep(0.05 * (attempt + 1))
        return failure

    def _database_takes_writes(self) -> bool:
        """Whether the database takes a trivial write (an UPDATE of no device): False when
        it is down, unreachable, read-only or not migrated."""
        try:
            with self._db.session() as session:
                session.execute(update_rows(Device).where(false()).values(online=Device.online))
        except StorageError as exc:
            log.warning("the database takes no write, ingested messages wait: %s", exc)
            return False
        return True

    def _dead_letter(self, part: IngestBatch, failure: Exception) -> None:
        """Set aside `part` (one device's messages), which the database refused while it
        takes writes: logged, counted, kept in the database as they arrived (`deadletters`)
        and as `last_dead_letter`. Its telemetry windows and status reports are forgotten
        by the deduplication, so that the device's outbox or a replay can bring them again."""
        (device_id,) = part.devices
        dropped = part.contents()
        error = " ".join(str(failure).split())
        with self._lock:
            self._status_seen.pop(device_id, None)
            for message in part.kept:
                if message.window_start is not None:
                    self._windows_seen.pop((device_id, message.window_start), None)
        kept_id = self._keep(device_id, dropped, error, part)
        # Replaced, not changed in place: readers in other threads (/metrics, /health)
        # see the counts before or after, never a dict being changed.
        self.dead_lettered = self.dead_lettered + collections.Counter(dropped)
        self.last_dead_letter = DeadLetter(device_id, self._clock(), dropped, error, kept_id)
        what = describe_dropped(dropped)
        log.error(
            "set aside what device %r sent (%s messages: %s): the database refuses it: %s%s",
            device_id,
            part.messages,
            what,
            error,
            "" if kept_id is None else f"; kept as dead letter {kept_id}",
        )

    def _keep(
        self, device_id: str, dropped: dict[str, int], error: str, part: IngestBatch
    ) -> int | None:
        """Store what `part` held as it arrived; its id, or None when there is nothing to keep
        (presence only) or the database refuses that too (logged: then it is lost)."""
        if not part.kept:
            return None
        try:
            with self._db.session() as session:
                return keep_dead_letter(
                    session,
                    device_id,
                    self._clock(),
                    error,
                    dropped,
                    part.kept,
                    self._settings.dead_letters_kept,
                )
        except StorageError as exc:
            log.error("could not keep what device %r sent either, it is lost: %s", device_id, exc)
            return None

    def replay(self, letter_id: int) -> Replay:
        """Take a dead letter's messages again, as if they had just arrived, and write them.

        Each goes through the checks of any message (its signature by the device's
        enrolled key included). The dead letter is deleted once they are written or
        set aside again (then as a new dead letter); while the database takes no
        writes they wait, as any message does, and it is deleted when they are written.

        Raises:
            NotFoundError: no such dead letter (replayed already, or discarded).
            ConflictError: its messages replayed here still wait for the database.
            StorageError: the database could not be read.
        """
        with self._replay_lock:
            if letter_id in self._replays_waiting:
                raise ConflictError(
                    f"dead letter {letter_id} was replayed and its messages wait for the "
                    "database to take writes; it is deleted once they are written"
                )
            with self._db.session() as session:
                row = get_dead_letter(session, letter_id)
                device_id, messages = row.device_id, letters_of(row)
            outcomes = collections.Counter(
                self._take(topic, payload) for topic, payload in messages
            )
            discarded = threading.Event()

            def discard() -> None:
                try:
                    with self._db.session() as session:
                        discard_dead_letter(session, letter_id)
                except (StorageError, NotFoundError) as exc:
                    log.warning("dead letter %d was replayed and not deleted: %s", letter_id, exc)
                self._replays_waiting.discard(letter_id)
                discarded.set()

            before = self.last_dead_letter
            self._replays_waiting.add(letter_id)
            self.when_stored(discard)
            self.flush()
            after = self.last_dead_letter
            again = (
                after if after is not before and after and after.device_id == device_id else None
            )
            return Replay(device_id, dict(outcomes), discarded.is_set(), again)

    # -- metrics -----------------------------------------------------------------------------

    @property
    def duplicates(self) -> collections.Counter[str]:
        """Messages dropped as already seen, by kind: status reports seen in memory or
        found in the database at the write, telemetry windows seen in memory."""
        with self._lock:
            merged = collections.Counter(self._duplicates)
        if self._writer.duplicates:
            merged["status"] += self._writer.duplicates
        return merged

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Counters for /metrics: accepted by kind, refused by reason, duplicates by kind."""
        return {
            "accepted": dict(self.counts),
            "refused": dict(self.refused),
            "duplicates": dict(self.duplicates),
            "flush": {
                "flushes": self.flushes,
                "failures": self.flush_failures,
                "messages": self.flushed_messages,
            },
            "dead_lettered": dict(self.dead_lettered),
        }


def _transient(failure: Exception) -> bool:
    """Whether a write failed for the moment rather than for what it holds: a lock
    timeout, a deadlock, a connection lost (the DBAPI's OperationalError)."""
    return isinstance(failure.__cause__, OperationalError)


__all__ = ["DeadLetter", "Ingestor", "Replay"]
