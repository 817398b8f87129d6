"""MQTT block transfer: the agent asks for the blocks it lacks and resumes by bitmap.

The protocol is in `edgefleet.mqtt.blocks`. The fetcher keeps up to `window`
blocks requested and not yet received; it asks for more in one request
message once half the window has arrived, and asks again for blocks whose
request timed out (block data is QoS 0, so a lost block is a timed-out one).
A block whose data does not match its `block_sha256` is asked for again at
once. Blocks land in a preallocated part file whose bitmap is persisted as
they arrive (`bitmap.BlockFile`), so a restarted agent asks only for the
missing ones.

The final check is the whole file's SHA-256 against the signed directive. A
mismatch means a server that sent wrong blocks with matching block digests
(or, after a power cut, a block marked but not on disk): the part is discarded;
a transfer that resumed earlier bytes starts over once, a transfer that began
from zero is refused with TamperedFileError.

Threads: the link calls the handler in its network thread; the handler only
queues the payload (bounded, excess dropped). Parsing, writing and requests
happen in the thread that called `fetch`.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgefleet.agent.errors import DownloadError
from edgefleet.agent.transport.base import (
    FetchStats,
    already_fetched,
    bitmap_path,
    finish,
    part_path,
)
from edgefleet.agent.transport.bitmap import BlockFile
from edgefleet.agent.transport.sources import SourcesFetcher
from edgefleet.errors import MessageSchemaError, TamperedFileError, UsageError
from edgefleet.mqtt.blocks import (
    MAX_INDEXES_PER_REQUEST,
    BlockData,
    BlockRequest,
    BlocksUnavailable,
    block_extent,
    encode_block_request,
    parse_block_payload,
)
from edgefleet.mqtt.directives import BundleRef, Directive, MqttBlocksSource, Source

BlocksHandler = Callable[[bytes], None]


class BlockChannel(Protocol):
    """The MQTT side the fetcher needs; `edgefleet.agent.link.AgentLink` implements it."""

    @property
    def device_id(self) -> str: ...

    def send_block_request(self, payload: bytes) -> bool:
        """Publish on this device's blocks_request topic; False when not connected."""
        ...

    def set_blocks_handler(self, handler: BlocksHandler | None) -> None:
        """Route payloads of this device's blocks_data topic to `handler` (None: drop them)."""
        ...


class MqttBlockFetcher:
    """Fetches bundles over MQTT in blocks, through a `BlockChannel`."""

    checks_digest = True  # the installer's marker: `finish` checks length and SHA-256

    def __init__(
        self,
        channel: BlockChannel,
        *,
        window: int = 32,
        request_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        sync_interval: float = 1.0,
    ) -> None:
        """
        Args:
            window: blocks requested and not yet received, at most.
            request_timeout: seconds after which a requested block is asked for again.
            idle_timeout: seconds without a new block after which `fetch` gives up
                (DownloadError; the bitmap keeps what arrived).
            sync_interval: seconds between fsyncs of the part file and bitmap.
        """
        if window < 1 or request_timeout <= 0 or idle_timeout <= 0:
            raise UsageError("window, request_timeout and idle_timeout must be positive")
        self.channel = channel
        self.window = window
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.sync_interval = sync_interval
        self.last_stats: FetchStats | None = None
        self._busy = threading.Lock()

    def fetch(self, directive: Directive, destination: Path) -> Path:
        """Fetch over the directive's mqtt-blocks source (see `Fetcher.fetch`)."""
        return SourcesFetcher(blocks=self).fetch(directive, destination)

    def fetch_from(self, source: Source, bundle: BundleRef, destination: Path) -> Path:
        """Fetch `bundle` in blocks of the source's size into `destination`.

        Raises:
            RuntimeError: another fetch is running on this fetcher (one channel,
                one transfer at a time).
        """
        if not isinstance(source, MqttBlocksSource):
            raise UsageError(f"MqttBlockFetcher cannot fetch from a {source.transport} source")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("MqttBlockFetcher is already fetching: one transfer at a time")
        try:
            return self._fetch_blocks(source, bundle, destination)
        finally:
            self._busy.release()

    def _fetch_blocks(self, source: MqttBlocksSource, bundle: BundleRef, destination: Path) -> Path:
        stats = self.last_stats = FetchStats(transport="mqtt-blocks")
        if already_fetched(destination, bundle):
            return destination
        resumed = False
        while True:
            blocks = BlockFile(
                part_path(destination),
                bitmap_path(destination),
                bundle.sha256,
                bundle.length,
                source.block_size,
                sync_interval=self.sync_interval,
            )
            if blocks.resumed_blocks:
                resumed = True
                stats.resumed_from = sum(
                    block_extent(i, bundle.length, source.block_size)[1]
                    for i in range(blocks.count)
                    if blocks.has(i)
                )
            try:
                self._transfer(blocks, bundle, stats)
            finally:
                blocks.close()
            try:
                return finish(destination, bundle)
            except TamperedFileError:
                if not resumed:
                    raise
                resumed = False  # start over once, from zero
                stats.restarts += 1

    def _transfer(self, blocks: BlockFile, bundle: BundleRef, stats: FetchStats) -> None:
        inbox: queue.Queue[bytes] = queue.Queue(maxsize=4 * self.window)

        def handler(payload: bytes) -> None:
            # Beyond the bound is more than was asked for: such a block is asked for again.
            with contextlib.suppress(queue.Full):
                inbox.put_nowait(payload)

        self.channel.set_blocks_handler(handler)
        try:
            _Transfer(self, blocks, bundle, stats, inbox).run()
        finally:
            self.channel.set_blocks_handler(None)


class _Transfer:
    """One pass of the request/receive loop over a `BlockFile`."""

    def __init__(
        self,
        fetcher: MqttBlockFetcher,
        blocks: BlockFile,
        bundle: BundleRef,
        stats: FetchStats,
        inbox: queue.Queue[bytes],
    ) -> None:
        self.fetcher = fetcher
        self.blocks = blocks
        self.bundle = bundle
        self.stats = stats
        self.inbox = inbox
        self.to_request: collections.deque[int] = collections.deque(blocks.missing())
        self.outstanding: dict[int, float] = {}  # block index -> deadline

    def run(self) -> None:
        fetcher = self.fetcher
        last_progress = time.monotonic()
        while not self.blocks.is_complete:
            now = time.monotonic()
            self._expire(now)
            if len(self.outstanding) <= fetcher.window // 2:
                self._request(now)
            if now - last_progress > fetcher.idle_timeout:
                raise DownloadError(
                    f"no block of {self.bundle.name} {self.bundle.version} arrived for "
                    f"{fetcher.idle_timeout:.0f} s; {self.blocks.present} of "
                    f"{self.blocks.count} blocks kept for resume"
                )
            next_deadline = min(self.outstanding.values(), default=now + fetcher.request_timeout)
            wait = max(0.01, min(next_deadline - now, last_progress + fetcher.idle_timeout - now))
            try:
                payloads = [self.inbox.get(timeout=wait)]
            except queue.Empty:
                continue
            while len(payloads) < 64:
                try:
                    payloads.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            before = self.blocks.present
            for payload in payloads:
                self._receive(payload)
                self.blocks.persist()
            if self.blocks.present > before:
                self.blocks.persist(force=True)
                last_progress = time.monotonic()

    def _expire(self, now: float) -> None:
        expired = sorted(i for i, deadline in self.outstanding.items() if deadline <= now)
        for index in reversed(expired):
            del self.outstanding[index]
            self.to_request.appendleft(index)
        self.stats.rerequested += len(expired)

    def _request(self, now: float) -> None:
        batch: list[int] = []
        room = self.fetcher.window - len(self.outstanding)
        while self.to_request and len(batch) < room:
            index = self.to_request.popleft()
            if not self.blocks.has(index) and index not in self.outstanding:
                batch.append(index)
        for start in range(0, len(batch), MAX_INDEXES_PER_REQUEST):
            indexes = batch[start : start + MAX_INDEXES_PER_REQUEST]
            request = BlockRequest(
                device_id=self.fetcher.channel.device_id,
                sha256=self.bundle.sha256,
                block_size=self.blocks.block_size,
                indexes=indexes,
            )
            # Not connected: the blocks still count as asked for, and time out into a retry.
            if self.fetcher.channel.send_block_request(encode_block_request(request)):
                self.stats.requests_sent += 1
            deadline = now + self.fetcher.request_timeout
            self.outstanding.update(dict.fromkeys(indexes, deadline))

    def _receive(self, payload: bytes) -> None:
        stats = self.stats
        try:
            message = parse_block_payload(payload)
        except MessageSchemaError:
            stats.malformed += 1
            return
        if message.sha256 != self.bundle.sha256:
            return  # another transfer's late blocks
        if isinstance(message, BlocksUnavailable):
            raise DownloadError(
                f"the server cannot serve {self.bundle.name} {self.bundle.version} in blocks: "
                f"{message.reason}"
            )
        self._store(message)

    def _store(self, block: BlockData) -> None:
        stats = self.stats
        if block.block_size != self.blocks.block_size:
            return  # an earlier transfer of the same bundle with another block size
        if block.index >= self.blocks.count:
            stats.malformed += 1
            return
        size = block_extent(block.index, self.bundle.length, block.block_size)[1]
        if len(block.data) != size or not block.is_intact():
            # Damaged on the way: ask again now rather than at the timeout.
            stats.corrupt += 1
            if not self.blocks.has(block.index) and block.index in self.outstanding:
                del self.outstanding[block.index]
                self.to_request.appendleft(block.index)
            return
        if self.blocks.has(block.index):
            stats.duplicates += 1
            return
        self.blocks.write_block(block.index, block.data)
        self.outstanding.pop(block.index, None)
        stats.blocks_received += 1
        stats.bytes_received += len(block.data)
