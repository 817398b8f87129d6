"""MQTT block transfer over real mosquitto: complete, resumed by bitmap, lossy, damaged, forged."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.errors import DownloadError
from edgefleet.agent.link import AgentLink
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.transport import BlocksHandler, MqttBlockFetcher, SourcesFetcher
from edgefleet.agent.transport.base import bitmap_path, part_path
from edgefleet.agentconfig import MqttSettings
from edgefleet.backoff import Backoff
from edgefleet.errors import TamperedFileError
from edgefleet.mqtt.blocks import (
    BlockRequest,
    block_count,
    encode_block_data,
    parse_block_payload,
)
from edgefleet.mqtt.directives import HttpSource, MqttBlocksSource, Source
from edgefleet.mqtt.messages import parse_message
from tests.agent.broker import (
    BlockFaults,
    BlockServer,
    MosquittoBroker,
    publish_once,
    unique_device_id,
)
from tests.agent.test_link import wait_until
from tests.agent.test_transport_http import make_directive

BLOCK = 16 * 1024
LENGTH = 40 * BLOCK + 123  # 41 blocks, the last one short
COUNT = block_count(LENGTH, BLOCK)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker.running(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def content() -> bytes:
    return os.urandom(LENGTH)


@pytest.fixture
def served(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "served.efb"
    path.write_bytes(content)
    return path


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    (tmp_path / "downloads").mkdir()
    return tmp_path / "downloads" / "bundle"


@contextlib.contextmanager
def agent_link(broker: MosquittoBroker, tmp_path: Path, device_id: str) -> Iterator[AgentLink]:
    link = AgentLink(
        device_id,
        MqttSettings(url=broker.url),
        Outbox(tmp_path / f"outbox-{device_id}", 1 << 20),
        on_directive=lambda payload: None,
        on_fleet_timestamp=lambda payload: None,
        backoff=Backoff(initial=0.05, maximum=0.5),
        poll_interval=0.1,
    )
    link.start()
    assert link.wait_connected(10)
    try:
        yield link
    finally:
        link.stop()


@contextlib.contextmanager
def block_server(
    broker: MosquittoBroker, served: Path, faults: BlockFaults | None = None
) -> Iterator[BlockServer]:
    server = BlockServer(broker.url, [served], faults)
    try:
        yield server
    finally:
        server.close()


def fetcher(
    link: AgentLink, *, request_timeout: float = 1.0, idle_timeout: float = 5.0
) -> MqttBlockFetcher:
    return MqttBlockFetcher(
        link, window=8, request_timeout=request_timeout, idle_timeout=idle_timeout
    )


def test_block_transfer_delivers_the_verified_file(
    broker: MosquittoBroker, tmp_path: Path, served: Path, content: bytes, destination: Path
) -> None:
    device = unique_device_id()
    with agent_link(broker, tmp_path, device) as link, block_server(broker, served) as server:
        blocks = fetcher(link)
        directive = make_directive(content, [MqttBlocksSource(block_size=BLOCK)], device)
        assert blocks.fetch(directive, destination) == destination
    assert destination.read_bytes() == content
    assert sorted(p.name for p in destination.parent.iterdir()) == ["bundle"]
    assert sorted(server.requested) == list(range(COUNT))
    stats = blocks.last_stats
    assert stats is not None and stats.blocks_received == COUNT and stats.bytes_received == LENGTH


def test_restart_resumes_by_bitmap_and_requests_only_missing_blocks(
    broker: MosquittoBroker, tmp_path: Path, served: Path, content: bytes, destination: Path
) -> None:
    device = unique_device_id()
    directive = make_directive(content, [MqttBlocksSource(block_size=BLOCK)], device)
    with (
        agent_link(broker, tmp_path, device) as link,
        block_server(broker, served, BlockFaults(stop_after=17)),
        pytest.raises(DownloadError, match="kept for resume"),
    ):
        fetcher(link, idle_timeout=1.5).fetch(directive, destination)
    assert bitmap_path(destination).exists() and part_path(destination).stat().st_size == LENGTH
    assert not destination.exists()

    # A new agent process: a new link and fetcher, only the files on disk carry over.
    with agent_link(broker, tmp_path, device) as link, block_server(broker, served) as server:
        resumed = fetcher(link)
        resumed.fetch(directive, destination)
    assert destination.read_bytes() == content
    assert len(server.requested) == COUNT - 17 and len(set(server.requested)) == COUNT - 17
    stats = resumed.last_stats
    assert stats is not None and stats.resumed_from == 17 * BLOCK
    assert server.bytes_sent == LENGTH - 17 * BLOCK


def test_lost_blocks_are_requested_again_after_the_timeout(
    broker: MosquittoBroker, tmp_path: Path, served: Path, content: bytes, destination: Path
) -> None:
    device = unique_device_id()
    directive = make_directive(content, [MqttBlocksSource(block_size=BLOCK)], device)
    with (
        agent_link(broker, tmp_path, device) as link,
        block_server(broker, served, BlockFaults(drop={0, 9, COUNT - 1})),
    ):
        blocks = fetcher(link, request_timeout=0.3)
        blocks.fetch(directive, destination)
    assert destination.read_bytes() == content
    assert blocks.last_stats is not None and blocks.last_stats.rerequested >= 3


def test_block_damaged_in_transit_is_requested_again_at_once(
    broker: MosquittoBroker, tmp_path: Path, served: Path, content: bytes, destination: Path
) -> None:
    device = unique_device_id()
    directive = make_directive(content, [MqttBlocksSource(block_size=BLOCK)], device)
    with (
        agent_link(broker, tmp_path, device) as link,
        block_server(broker, served, BlockFaults(damage={4})) as server,
    ):
        blocks = fetcher(link, request_timeout=30.0)  # the retry cannot be the timeout's
        blocks.fetch(directive, destination)
    assert destination.read_bytes() == content
    assert blocks.last_stats is not None and blocks.last_stats.corrupt == 1
    assert server.requested.count(4) == 2


def test_forged_block_is_caught_by_the_final_digest_and_refused(
    broker: MosquittoBroker, tmp_path: Path, served: Path, content: bytes, destination: Path
) -> None:
    # A server (or broker) that sends a wrong block with a matching block digest: only
    # the signed SHA-256 of the whole file can tell. A fresh transfer is refused.
    device = unique_device_id()
    directive = make_directive(content, [MqttBlocksSource(block_size=BLOCK)], device)
    with (
        agent_link(broker, tmp_path, device) as link,
        block_server(broker, served, BlockFaults(forge={7})),
        pytest.raises(TamperedFileError),
    ):
        fetcher(link).fetch(directive, destination)
    assert list(destination.parent.iterdir()) == []


def test_forged_block_in_resumed_transfer_starts_over_once_then_refuses(
    broker: MosquittoBroker, tmp_path: Path, served: Path, content: bytes, destination: Path
) -> None:
    device = unique_device_id()
    directive = make_directive(content, [MqttBlocksSource(block_size=BLOCK)], device)
    with agent_link(broker, tmp_path, device) as link:
        with block_server(broker, served, BlockFaults(stop_after=5)), pytest.raises(DownloadError):
            fetcher(link, idle_timeout=1.0).fetch(directive, destination)
        with block_server(broker, served, BlockFaults(forge={20})) as server:
            blocks = fetcher(link)
            with pytest.raises(TamperedFileError):
                blocks.fetch(directive, destination)
    assert blocks.last_stats is not None and blocks.last_stats.restarts == 1
    assert server.requested.count(0) == 1  # the second pass began from zero
    assert list(destination.parent.iterdir()) == []


def test_bundle_the_server_does_not_hold_fails_fast(
    broker: MosquittoBroker, tmp_path: Path, served: Path, destination: Path
) -> None:
    device = unique_device_id()
    directive = make_directive(os.urandom(1000), [MqttBlocksSource(block_size=1024)], device)
    with (
        agent_link(broker, tmp_path, device) as link,
        block_server(broker, served),
        pytest.raises(DownloadError, match="unknown bundle"),
    ):
        fetcher(link, idle_timeout=30.0).fetch(directive, destination)


def test_http_prefix_is_resumed_over_mqtt_blocks(
    broker: MosquittoBroker, tmp_path: Path, served: Path, content: bytes, destination: Path
) -> None:
    device = unique_device_id()
    part_path(destination).write_bytes(content[: 10 * BLOCK + 500])  # an HTTP download cut short
    sources: list[Source] = [
        HttpSource(url="http://127.0.0.1:9/unreachable"),
        MqttBlocksSource(block_size=BLOCK),
    ]
    directive = make_directive(content, sources, device)
    with agent_link(broker, tmp_path, device) as link, block_server(broker, served) as server:
        SourcesFetcher(blocks=fetcher(link)).fetch(directive, destination)
    assert destination.read_bytes() == content
    assert sorted(server.requested) == list(range(10, COUNT))


def test_link_drops_blocks_nobody_waits_for(
    broker: MosquittoBroker, tmp_path: Path, served: Path, content: bytes
) -> None:
    device = unique_device_id()
    with agent_link(broker, tmp_path, device) as link:
        payload = encode_block_data(hashlib.sha256(content).hexdigest(), BLOCK, 0, content[:BLOCK])
        publish_once(broker.url, link.topics.blocks_data, payload, qos=0)
        publish_once(broker.url, link.topics.directive, b"sync")  # QoS 1 after QoS 0: in order
        assert wait_until(lambda: link.counters().unexpected == 1)


class LoopbackChannel:
    """A `BlockChannel` that answers requests itself, with garbage mixed in first."""

    def __init__(self, content: bytes, noise: list[bytes]) -> None:
        self.content = content
        self.noise = noise
        self.handler: BlocksHandler | None = None

    @property
    def device_id(self) -> str:
        return "cam-01"

    def set_blocks_handler(self, handler: BlocksHandler | None) -> None:
        self.handler = handler

    def send_block_request(self, payload: bytes) -> bool:
        request = parse_message(BlockRequest, payload)
        assert self.handler is not None
        for junk in self.noise:
            self.handler(junk)
        self.noise = []
        sha = hashlib.sha256(self.content).hexdigest()
        for index in request.indexes:
            start = index * request.block_size
            data = self.content[start : start + request.block_size]
            self.handler(encode_block_data(sha, request.block_size, index, data))
        return True


def test_malformed_block_messages_are_counted_not_fatal(content: bytes, destination: Path) -> None:
    sha = hashlib.sha256(content).hexdigest()
    good = encode_block_data(sha, BLOCK, 1, content[BLOCK : 2 * BLOCK])
    noise = [
        b"not a block",
        b"{}\n",
        b'{"schema_version":2}\n',
        encode_block_data(sha, BLOCK, COUNT + 5, b"x"),  # beyond the file
        encode_block_data(sha, BLOCK, 1, b"short"),  # wrong size for its index
        encode_block_data("0" * 64, BLOCK, 1, content[:BLOCK]),  # another transfer
        good[:-1] + bytes([good[-1] ^ 0xFF]),  # damaged: its last byte always changes
    ]
    blocks = MqttBlockFetcher(
        LoopbackChannel(content, noise), request_timeout=1.0, idle_timeout=5.0
    )
    blocks.fetch(make_directive(content, [MqttBlocksSource(block_size=BLOCK)]), destination)
    assert destination.read_bytes() == content
    stats = blocks.last_stats
    assert stats is not None and (stats.malformed, stats.corrupt) == (4, 2)
    assert parse_block_payload(good).index == 1  # type: ignore[union-attr]
