"""The MQTT block service: right blocks to the right device, refusals that never raise, and an
agent's block fetcher downloading a real bundle through mosquitto."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgefleet.agent.errors import DownloadError
from edgefleet.agent.transport import MqttBlockFetcher
from edgefleet.bundle import verify_bundle
from edgefleet.mqtt.blocks import (
    BlockData,
    BlockRequest,
    BlocksUnavailable,
    block_count,
    encode_block_request,
    parse_block_payload,
)
from edgefleet.mqtt.directives import MqttBlocksSource
from edgefleet.mqtt.topics import DeviceTopics, TopicKind
from edgefleet.server.bundles import BundleStore
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow
from edgefleet.server.mqtt.blockservice import BlockService
from edgefleet.server.mqtt.link import ServerLink
from edgefleet.server.principals import Principal, Role
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, unique_device_id
from tests.agent.test_transport_blocks import agent_link
from tests.agent.test_transport_http import make_directive

BLOCK = 16 * 1024
DEVICE = "cam-07"


@dataclass
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class RecordingPublisher:
    """A `Publisher` that keeps what it is given; `fail` makes it raise instead."""

    calls: list[Published] = field(default_factory=list)
    fail: bool = False

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        if self.fail:
            raise ConnectionError("the broker is gone")
        self.calls.append(Published(topic, payload, qos, retain))

    def parsed(self) -> list[BlockData | BlocksUnavailable]:
        return [parse_block_payload(call.payload) for call in self.calls]


@dataclass
class Served:
    service: BlockService
    publisher: RecordingPublisher
    store: BundleStore
    row: BundleRow
    content: bytes


@pytest.fixture
def served(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot, bundle_file: Path
) -> Served:
    store = BundleStore(tmp_path / "data", trust)
    upload = store.new_upload_path()
    shutil.copyfile(bundle_file, upload)
    with sqlite_database.session() as session:
        row, _ = store.push(session, upload, Principal("ci", Role.OPERATOR))
    publisher = RecordingPublisher()
    service = BlockService(store, sqlite_database, publisher)
    return Served(service, publisher, store, row, bundle_file.read_bytes())


def request(
    sha256: str, indexes: list[int], *, device: str = DEVICE, block_size: int = BLOCK
) -> tuple[str, bytes]:
    message = BlockRequest(device_id=device, sha256=sha256, block_size=block_size, indexes=indexes)
    return DeviceTopics(device).blocks_request, encode_block_request(message)


def test_requested_blocks_go_to_the_requesting_device_at_qos_0(served: Served) -> None:
    served.service.handle(*request(served.row.sha256, [5, 0, 2]))
    calls = served.publisher.calls
    assert [(c.topic, c.qos, c.retain) for c in calls] == [
        (DeviceTopics(DEVICE).blocks_data, 0, False)
    ] * 3
    blocks = served.publisher.parsed()
    assert all(isinstance(b, BlockData) and b.is_intact() for b in blocks)
    assert [b.index for b in blocks if isinstance(b, BlockData)] == [5, 0, 2]
    for block in blocks:
        assert isinstance(block, BlockData)
        assert block.sha256 == served.row.sha256 and block.block_size == BLOCK
        start = block.index * BLOCK
        assert block.data == served.content[start : start + BLOCK]
    assert served.service.counts["blocks"] == 3 and not served.service.refused


def test_every_block_together_is_the_stored_bundle(served: Served) -> None:
    count = block_count(served.row.length, BLOCK)
    served.service.handle(*request(served.row.sha256, list(range(count))))
    blocks = [b for b in served.publisher.parsed() if isinstance(b, BlockData)]
    assert len(blocks) == count and len(blocks[-1].data) == served.row.length % BLOCK
    assert b"".join(b.data for b in blocks) == served.content


def only_unavailable(served: Served, reason: str) -> None:
    messages = served.publisher.parsed()
    assert len(messages) == 1
    message = messages[0]
    assert isinstance(message, BlocksUnavailable) and reason in message.reason
    assert served.publisher.calls[0].topic == DeviceTopics(DEVICE).blocks_data


def test_unknown_bundle_is_answered_unavailable(served: Served) -> None:
    served.service.handle(*request("e" * 64, [0]))
    only_unavailable(served, "unknown bundle")
    assert served.service.counts["unavailable"] == 1


def test_a_stored_bundle_whose_file_is_missing_is_logged_as_an_error(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    # A replica whose data directory is not the one the bundle was pushed to.
    served.store.path_of(served.row).unlink()
    with caplog.at_level(logging.ERROR, logger="edgefleet.server.bundles"):
        served.service.handle(*request(served.row.sha256, [0]))
    only_unavailable(served, "unknown bundle")
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert "bundle demo@1.2.3 is stored in the database but its file" in message
    assert "replicas must share one data directory" in message


def test_a_file_without_a_bundle_row_is_not_served(served: Served, tmp_path: Path) -> None:
    # Only bundles the store lists are served, whatever lies in the data directory.
    orphan = "f" * 64
    (served.store.bundles_dir / f"{orphan}.efb").write_bytes(b"x" * 5000)
    served.service.handle(*request(orphan, [0]))
    only_unavailable(served, "unknown bundle")


def test_a_block_outside_the_bundle_is_answered_unavailable_and_nothing_else(
    served: Served,
) -> None:
    count = block_count(served.row.length, BLOCK)
    served.service.handle(*request(served.row.sha256, [0, 1, count]))
    only_unavailable(served, f"block {count} is outside the bundle")


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        (DeviceTopics(DEVICE).blocks_request, b"not json"),
        (DeviceTopics(DEVICE).blocks_request, b"{}"),
        (DeviceTopics(DEVICE).blocks_request, b"\xff" * 100),
        # Another device's request on this device's topic: never served to either.
        (DeviceTopics(DEVICE).blocks_request, request("a" * 64, [0], device="cam-08")[1]),
        (DeviceTopics(DEVICE).status, request("a" * 64, [0])[1]),
        ("edgefleet/v1/devices/+/blocks/request", request("a" * 64, [0])[1]),
        ("elsewhere", request("a" * 64, [0])[1]),
    ],
)
def test_malformed_requests_are_counted_and_dropped(
    served: Served, topic: str, payload: bytes
) -> None:
    served.service.handle(topic, payload)
    assert served.publisher.calls == []
    assert served.service.refused == {"malformed": 1}


@pytest.mark.parametrize("change", ["indexes-repeat", "block-size-too-small", "no-indexes"])
def test_requests_beyond_the_protocol_limits_are_dropped(served: Served, change: str) -> None:
    raw = json.loads(request(served.row.sha256, [0])[1])
    raw.update(
        {
            "indexes-repeat": {"indexes": [1, 1]},
            "block-size-too-small": {"block_size": 16},
            "no-indexes": {"indexes": []},
        }[change]
    )
    served.service.handle(DeviceTopics(DEVICE).blocks_request, json.dumps(raw).encode())
    assert served.publisher.calls == [] and served.service.refused == {"malformed": 1}


def test_a_vanished_file_is_answered_unavailable_until_it_is_back(
    served: Served, sqlite_database: Database, bundle_file: Path
) -> None:
    served.service.handle(*request(served.row.sha256, [0]))  # cached now
    served.store.path_of(served.row).unlink()
    served.publisher.calls.clear()
    served.service.handle(*request(served.row.sha256, [1]))
    only_unavailable(served, "unreadable")
    upload = served.store.new_upload_path()
    shutil.copyfile(bundle_file, upload)
    with sqlite_database.session() as session:
        served.store.push(session, upload, Principal("ci", Role.OPERATOR))  # restores it
    served.publisher.calls.clear()
    served.service.handle(*request(served.row.sha256, [1]))
    assert [type(m) for m in served.publisher.parsed()] == [BlockData]


def test_the_bundle_lookup_is_cached(served: Served, tmp_path: Path) -> None:
    served.service.handle(*request(served.row.sha256, [0]))
    # A database that cannot be reached: a cached bundle is still served.
    broken = Database(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    served.service.db = broken
    served.service.handle(*request(served.row.sha256, [1]))
    assert len(served.publisher.parsed()) == 2 and not served.service.refused
    served.service.handle(*request("e" * 64, [0]))  # not cached: needs the database
    assert served.service.refused == {"internal": 1}
    broken.dispose()


def test_a_failing_publisher_is_counted_not_raised(served: Served) -> None:
    served.publisher.fail = True
    served.service.handle(*request(served.row.sha256, [0]))
    assert served.service.refused == {"internal": 1}


# -- end to end: the agent's fetcher, mosquitto, the server's link ------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker.running(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def server_link(broker: MosquittoBroker, served: Served) -> Iterator[ServerLink]:
    service: BlockService | None = None

    def handle(topic: str, payload: bytes) -> None:
        assert service is not None
        service.handle(topic, payload)

    link = ServerLink(
        broker.url,
        unique_device_id("server"),
        unique_device_id("group"),
        {TopicKind.BLOCKS_REQUEST: handle},
    )
    service = served.service = BlockService(served.store, served.service.db, link)
    link.start()
    assert link.wait_connected(10)
    try:
        yield link
    finally:
        link.stop()


def test_agent_fetches_a_bundle_in_blocks_through_mosquitto(
    broker: MosquittoBroker,
    server_link: ServerLink,
    served: Served,
    tmp_path: Path,
    trust: TrustRoot,
) -> None:
    device = unique_device_id()
    destination = tmp_path / "downloads" / "bundle.efb"
    destination.parent.mkdir()
    directive = make_directive(served.content, [MqttBlocksSource(block_size=BLOCK)], device)
    with agent_link(broker, tmp_path, device) as link:
        fetcher = MqttBlockFetcher(link, window=4, request_timeout=2.0, idle_timeout=10.0)
        assert fetcher.fetch(directive, destination) == destination
    assert destination.read_bytes() == served.content
    assert verify_bundle(destination, trust).manifest.name == "demo"
    count = block_count(served.row.length, BLOCK)
    assert served.service.counts["blocks"] >= count
    assert fetcher.last_stats is not None and fetcher.last_stats.blocks_received == count


def test_agent_stops_at_once_when_the_server_does_not_hold_the_bundle(
    broker: MosquittoBroker, server_link: ServerLink, tmp_path: Path
) -> None:
    device = unique_device_id()
    destination = tmp_path / "bundle.efb"
    directive = make_directive(b"not stored here", [MqttBlocksSource(block_size=BLOCK)], device)
    with (
        agent_link(broker, tmp_path, device) as link,
        pytest.raises(DownloadError, match="unknown bundle"),
    ):
        MqttBlockFetcher(link, request_timeout=2.0, idle_timeout=30.0).fetch(directive, destination)
