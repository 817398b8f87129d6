"""Serving bundles over MQTT in blocks, for devices that reach only the broker.

The protocol is `edgefleet.mqtt.blocks`: a device asks on its blocks_request
topic for numbered blocks of a bundle file named by its SHA-256; the service
answers each block on that device's blocks_data topic at QoS 0 (a lost block
is requested again), or once with `unavailable` when it cannot serve.

Invariants:
- only files of bundles in the `bundles` table are served (a digest the store
  does not know is `unavailable`, never a file lookup by a device's string);
- blocks go only to the topic of the device whose topic the request came on
  (`parse_block_request` checks the request's device id against the topic; the
  ingestor has already checked the device's signature before calling `handle`);
- `handle` never raises: a malformed request is counted in `refused` and
  dropped, so one bad device cannot stop the worker that calls it.

Digest -> (path, length) is cached in memory: a bundle's bytes never change
under its digest, so the cache needs no invalidation; a file that disappears
from disk is evicted and answered `unavailable`.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from edgefleet.errors import MessageSchemaError
from edgefleet.mqtt.blocks import (
    BlockRequest,
    block_count,
    block_extent,
    encode_block_data,
    encode_blocks_unavailable,
    parse_block_request,
)
from edgefleet.mqtt.topics import DeviceTopics, TopicKind
from edgefleet.server.bundles import BundleStore
from edgefleet.server.db.database import Database
from edgefleet.server.mqtt.interfaces import Publisher

log = logging.getLogger(__name__)

BLOCK_DATA_QOS = TopicKind.BLOCKS_DATA.qos  # 0: a lost block is simply asked for again
MAX_CACHED_BUNDLES = 256


@dataclass(frozen=True)
class _Served:
    path: Path
    length: int


class BlockService:
    """Answers block requests from the bundle store; a `MessageHandler` for the ingestor.

    Counters (for /metrics): `refused` (reason -> requests dropped: "malformed",
    "internal"), `counts` ("requests", "blocks", "bytes", "unavailable").
    """

    def __init__(self, store: BundleStore, db: Database, publisher: Publisher) -> None:
        self.store = store
        self.db = db
        self.publisher = publisher
        self.refused: collections.Counter[str] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()
        self._cache: collections.OrderedDict[str, _Served] = collections.OrderedDict()
        self._lock = threading.Lock()

    def handle(self, topic: str, payload: bytes) -> None:
        """Answer one block request received on `topic`; never raises."""
        try:
            device_id, request = parse_block_request(topic, payload)
        except MessageSchemaError as exc:
            self._refuse("malformed")
            log.debug("malformed block request on %s: %s", topic, exc)
            return
        try:
            self._serve(DeviceTopics(device_id).blocks_data, request)
        except Exception:  # StorageError, a publisher's error: never kill the calling worker
            self._refuse("internal")
            log.warning("block request on %s failed", topic, exc_info=True)

    def _refuse(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self.counts.update(amounts)

    def _serve(self, out_topic: str, request: BlockRequest) -> None:
        self._count(requests=1)
        served = self._lookup(request.sha256)
        if served is None:
            self._unavailable(out_topic, request.sha256, "unknown bundle")
            return
        count = block_count(served.length, request.block_size)
        outside = [index for index in request.indexes if index >= count]
        if outside:
            # The device's idea of the file differs from ours: it cannot complete.
            self._unavailable(
                out_topic,
                request.sha256,
                f"block {outside[0]} is outside the bundle ({count} blocks of "
                f"{request.block_size} bytes)",
            )
            return
        try:
            with served.path.open("rb") as handle:
                for index in request.indexes:
                    offset, size = block_extent(index, served.length, request.block_size)
                    handle.seek(offset)
                    data = handle.read(size)
                    if len(data) != size:
                        raise OSError(f"{served.path} is shorter than {served.length} bytes")
                    payload = encode_block_data(request.sha256, request.block_size, index, data)
                    self.publisher.publish(out_topic, payload, qos=BLOCK_DATA_QOS)
                    self._count(blocks=1, bytes=size)
        except OSError as exc:
            log.warning("cannot serve bundle %s in blocks: %s", request.sha256, exc)
            with self._lock:
                self._cache.pop(request.sha256, None)
            self._unavailable(out_topic, request.sha256, "bundle file unreadable")

    def _unavailable(self, out_topic: str, sha256: str, reason: str) -> None:
        self._count(unavailable=1)
        self.publisher.publish(
            out_topic, encode_blocks_unavailable(sha256, reason), qos=BLOCK_DATA_QOS
        )

    def _lookup(self, sha256: str) -> _Served | None:
        with self._lock:
            served = self._cache.get(sha256)
            if served is not None:
                self._cache.move_to_end(sha256)
                return served
        # Outside the lock: a database round trip must not stall other requests.
        with self.db.session() as session:
            row = self.store.get_by_sha256(session, sha256)
            if row is None:
                return None
            served = _Served(self.store.path_of(row), row.length)
            if not served.path.is_file():
                self.store.log_missing(row)
                return None
        with self._lock:
            self._cache[sha256] = served
            while len(self._cache) > MAX_CACHED_BUNDLES:
                self._cache.popitem(last=False)
        return served


__all__ = ["BLOCK_DATA_QOS", "BlockService"]
