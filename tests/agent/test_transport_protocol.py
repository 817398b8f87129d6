"""The block protocol's schemas (edgefleet.mqtt.blocks) and the resume bitmap, without a broker."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from edgefleet.agent.transport import BlocksHandler, MqttBlockFetcher
from edgefleet.agent.transport.bitmap import BlockFile, recorded_blocks, reduce_to_prefix
from edgefleet.errors import MessageSchemaError, UsageError
from edgefleet.mqtt.blocks import (
    MAX_BLOCK_PAYLOAD_BYTES,
    MAX_INDEXES_PER_REQUEST,
    BlockData,
    BlockRequest,
    BlocksUnavailable,
    block_count,
    block_extent,
    encode_block_data,
    encode_block_request,
    encode_blocks_unavailable,
    parse_block_payload,
    parse_block_request,
)
from edgefleet.mqtt.directives import MAX_BLOCK_SIZE, MqttBlocksSource
from edgefleet.mqtt.messages import MAX_MESSAGE_BYTES
from edgefleet.mqtt.topics import DeviceTopics
from tests.agent.test_transport_http import make_directive

SHA = "ab" * 32


def test_block_arithmetic() -> None:
    assert block_count(1, 1024) == 1
    assert block_count(2048, 1024) == 2
    assert block_count(2049, 1024) == 3
    assert block_extent(2, 2049, 1024) == (2048, 1)
    with pytest.raises(UsageError):
        block_extent(3, 2049, 1024)
    with pytest.raises(UsageError):
        block_count(0, 1024)


def test_largest_block_message_fits_the_message_limit() -> None:
    payload = encode_block_data(SHA, MAX_BLOCK_SIZE, 10**9, b"\x00" * MAX_BLOCK_SIZE)
    assert len(payload) <= MAX_BLOCK_PAYLOAD_BYTES <= MAX_MESSAGE_BYTES
    assert isinstance(parse_block_payload(payload), BlockData)


def test_block_data_round_trips_with_raw_bytes() -> None:
    data = bytes(range(256)) * 4 + b"\n\n"  # newlines in the data are fine
    block = parse_block_payload(encode_block_data(SHA, 2048, 3, data))
    assert isinstance(block, BlockData)
    assert (block.sha256, block.block_size, block.index, block.data) == (SHA, 2048, 3, data)
    assert block.is_intact()
    header = encode_block_data(SHA, 2048, 3, data).split(b"\n", 1)[0]
    assert json.loads(header)["block_sha256"] == hashlib.sha256(data).hexdigest()


def test_unavailable_round_trips() -> None:
    message = parse_block_payload(encode_blocks_unavailable(SHA, "unknown bundle"))
    assert isinstance(message, BlocksUnavailable) and message.reason == "unknown bundle"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"no header line",
        b"[]\n",
        b'{"schema_version": 2}\n',
        b'{"schema_version": "1"}\n',
        b'{"schema_version": 1, "type": "block"}\n',
        b'{"schema_version": 1, "type": "other", "sha256": "' + SHA.encode() + b'"}\n',
        encode_blocks_unavailable(SHA, "gone") + b"data",
        b"x" * (MAX_BLOCK_PAYLOAD_BYTES + 1),
        b" " * 2000 + b"\n",  # header line too long
    ],
)
def test_malformed_block_payloads(payload: bytes) -> None:
    with pytest.raises(MessageSchemaError):
        parse_block_payload(payload)


def test_block_data_longer_than_its_block_size_is_refused() -> None:
    payload = encode_block_data(SHA, 1024, 0, b"x" * 1024) + b"extra"
    with pytest.raises(MessageSchemaError, match="above block size"):
        parse_block_payload(payload)
    with pytest.raises(UsageError):
        encode_block_data(SHA, 1024, 0, b"x" * 1025)


def test_block_request_is_checked_against_its_topic() -> None:
    request = BlockRequest(device_id="cam-01", sha256=SHA, block_size=4096, indexes=[0, 5])
    payload = encode_block_request(request)
    assert parse_block_request(DeviceTopics("cam-01").blocks_request, payload) == (
        "cam-01",
        request,
    )
    with pytest.raises(MessageSchemaError, match="claims to come from"):
        parse_block_request(DeviceTopics("cam-02").blocks_request, payload)
    with pytest.raises(MessageSchemaError, match="does not carry"):
        parse_block_request(DeviceTopics("cam-01").status, payload)


@pytest.mark.parametrize(
    "indexes", [[], [1, 1], [-1], list(range(MAX_INDEXES_PER_REQUEST + 1))], ids=str
)
def test_block_request_bounds(indexes: list[int]) -> None:
    raw = {
        "schema_version": 1,
        "device_id": "cam-01",
        "sha256": SHA,
        "block_size": 4096,
        "indexes": indexes,
    }
    with pytest.raises(MessageSchemaError):
        parse_block_request(DeviceTopics("cam-01").blocks_request, json.dumps(raw).encode())


def test_bitmap_survives_reopen_and_rejects_another_transfer(tmp_path: Path) -> None:
    part, bitmap = tmp_path / "b.part", tmp_path / "b.blocks"
    blocks = BlockFile(part, bitmap, SHA, 10_000, 1024, sync_interval=60)
    assert blocks.missing() == list(range(10)) and part.stat().st_size == 10_000
    blocks.write_block(3, b"3" * 1024)
    blocks.write_block(9, b"9" * 784)
    blocks.persist()  # recorded at once: the bitmap is small
    assert recorded_blocks(bitmap, SHA, 10_000, 1024) == {3, 9}
    blocks.close()
    again = BlockFile(part, bitmap, SHA, 10_000, 1024, sync_interval=60)
    assert (again.resumed_blocks, again.has(3), again.has(9)) == (2, True, True)
    again.close()
    other = BlockFile(part, bitmap, SHA, 10_000, 2048, sync_interval=60)  # another block size
    assert other.resumed_blocks == 0 and recorded_blocks(bitmap, SHA, 10_000, 1024) is None
    other.close()


def test_bitmap_to_prefix_and_back(tmp_path: Path) -> None:
    part, bitmap = tmp_path / "b.part", tmp_path / "b.blocks"
    blocks = BlockFile(part, bitmap, SHA, 10_000, 1024, sync_interval=0)
    for index in (0, 1, 4):
        blocks.write_block(index, bytes([index]) * 1024)
    blocks.close()
    assert reduce_to_prefix(part, bitmap) == 2048
    assert part.stat().st_size == 2048 and not bitmap.exists()
    back = BlockFile(part, bitmap, SHA, 10_000, 1000, sync_interval=0)  # whole blocks count
    assert [back.has(i) for i in range(4)] == [True, True, False, False]
    back.close()
    bitmap.write_bytes(b"garbage")
    assert reduce_to_prefix(part, bitmap) == 0 and not part.exists()


class SilentChannel:
    def __init__(self) -> None:
        self.requests = threading.Event()

    @property
    def device_id(self) -> str:
        return "cam-01"

    def send_block_request(self, payload: bytes) -> bool:
        self.requests.set()
        return True

    def set_blocks_handler(self, handler: BlocksHandler | None) -> None:
        pass


def test_one_transfer_at_a_time_per_fetcher(tmp_path: Path) -> None:
    channel = SilentChannel()
    fetcher = MqttBlockFetcher(channel, request_timeout=0.2, idle_timeout=1.0)
    directive = make_directive(b"x" * 5000, [MqttBlocksSource(block_size=1024)])
    errors: list[BaseException] = []

    def first() -> None:
        try:
            fetcher.fetch(directive, tmp_path / "one")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    assert channel.requests.wait(5)
    with pytest.raises(RuntimeError, match="one transfer at a time"):
        fetcher.fetch(directive, tmp_path / "two")
    thread.join(10)
    assert len(errors) == 1 and "kept for resume" in str(errors[0])
