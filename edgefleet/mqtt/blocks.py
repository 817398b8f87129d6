"""MQTT block transfer: how a device that only reaches the broker fetches a bundle.

The device asks for numbered blocks of the bundle file; the server answers each
block in its own message. Blocks are `block_size` bytes (the directive's
`MqttBlocksSource.block_size`), the last one shorter; block `i` covers bytes
`[i * block_size, min((i + 1) * block_size, length))` of the file.

    device -> server  DeviceTopics(id).blocks_request   QoS 1   JSON `BlockRequest`
    server -> device  DeviceTopics(id).blocks_data      QoS 0   framed `BlockData` or
                                                                `BlocksUnavailable`

A block request is an ordinary device message (JSON, `schema_version`,
`device_id` checked against the topic). A data message is framed as one line of
compact JSON (keys sorted), a newline, then the raw block bytes:

    {"block_sha256":"<hex>","block_size":65536,"index":7,"schema_version":1,
     "sha256":"<hex>","type":"block"}\\n<raw bytes>
    {"reason":"unknown bundle","schema_version":1,"sha256":"<hex>","type":"unavailable"}\\n

(the header is one line on the wire; it is wrapped here).

Raw bytes rather than base64 keep a block at its own size on the wire; the JSON
header stays under `MAX_BLOCK_HEADER_BYTES`, so the largest data message
(`MAX_BLOCK_SIZE` plus header) stays under `MAX_MESSAGE_BYTES` and any broker's
default limit. Block data is QoS 0: a lost block is simply requested again.

Trust: block data is not signed (a request travels in the device's signed
frame, like every device message: `edgefleet.mqtt.devicesig`). `block_sha256`
only lets the device notice a block damaged on the way and ask again at once;
what makes the file trusted is its SHA-256 against the signed directive,
checked by the device over the whole file before use. The server must serve
only blocks of bundles it holds and only to the device whose topic the request
came on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.canonical import parse_json
from edgefleet.errors import MalformedDocumentError, MessageSchemaError, UsageError
from edgefleet.mqtt.directives import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from edgefleet.mqtt.messages import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Message,
    encode_message,
    parse_message,
)
from edgefleet.mqtt.topics import DeviceId, TopicKind, parse_device_topic
from edgefleet.validation import describe_validation_error

MAX_INDEXES_PER_REQUEST = 1024
MAX_BLOCK_HEADER_BYTES = 1024
MAX_BLOCK_PAYLOAD_BYTES = MAX_BLOCK_SIZE + MAX_BLOCK_HEADER_BYTES
assert MAX_BLOCK_PAYLOAD_BYTES <= MAX_MESSAGE_BYTES

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
BlockSize = Annotated[int, Field(ge=MIN_BLOCK_SIZE, le=MAX_BLOCK_SIZE)]
BlockIndex = Annotated[int, Field(ge=0)]


def block_count(length: int, block_size: int) -> int:
    """How many blocks a file of `length` bytes has."""
    if length < 1 or block_size < 1:
        raise UsageError(f"length {length} and block size {block_size} must be positive")
    return -(-length // block_size)


def block_extent(index: int, length: int, block_size: int) -> tuple[int, int]:
    """The (offset, size) of block `index` in a file of `length` bytes.

    Raises:
        UsageError: `index` is not a block of the file.
    """
    if not 0 <= index < block_count(length, block_size):
        raise UsageError(f"block {index} is outside a file of {length} bytes")
    offset = index * block_size
    return offset, min(block_size, length - offset)


class BlockRequest(Message):
    """A device asks for blocks of the bundle file with this digest."""

    what: ClassVar[str] = "block request"

    sha256: Sha256Hex
    block_size: BlockSize
    indexes: list[BlockIndex] = Field(min_length=1, max_length=MAX_INDEXES_PER_REQUEST)

    @field_validator("indexes")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("indexes repeat")
        return value


class _Header(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    schema_version: Literal[1] = 1
    sha256: Sha256Hex


class _BlockHeader(_Header):
    type: Literal["block"] = "block"
    block_size: BlockSize
    index: BlockIndex
    block_sha256: Sha256Hex


class BlocksUnavailable(_Header):
    """The server cannot serve this bundle (unknown, withdrawn): the device stops asking."""

    type: Literal["unavailable"] = "unavailable"
    reason: str = Field(max_length=256)


@dataclass(frozen=True)
class BlockData:
    """One block as received; `data` is untrusted until the whole file's digest matches."""

    sha256: str
    block_size: int
    index: int
    block_sha256: str
    data: bytes

    def is_intact(self) -> bool:
        """True when `data` hashes to the `block_sha256` its sender claimed."""
        return hashlib.sha256(self.data).hexdigest() == self.block_sha256


def encode_block_request(request: BlockRequest) -> bytes:
    """The JSON bytes to publish on the device's blocks_request topic."""
    return encode_message(request)


def parse_block_request(topic: str, payload: bytes) -> tuple[DeviceId, BlockRequest]:
    """Parse a block request received on a device's blocks_request topic (server side).

    Raises:
        MessageSchemaError: another topic, a bad payload, or a request naming
            another device than its topic.
    """
    device_id, kind = parse_device_topic(topic)
    if kind is not TopicKind.BLOCKS_REQUEST:
        raise MessageSchemaError(f"topic {topic!r} does not carry block requests")
    request = parse_message(BlockRequest, payload)
    if request.device_id != device_id:
        raise MessageSchemaError(
            f"block request on the topic of device {device_id!r} claims to come from "
            f"device {request.device_id!r}"
        )
    return device_id, request


def _frame(header: _Header, data: bytes = b"") -> bytes:
    text = json.dumps(header.model_dump(), sort_keys=True, separators=(",", ":"))
    return text.encode("utf-8") + b"\n" + data


def encode_block_data(sha256: str, block_size: int, index: int, data: bytes) -> bytes:
    """The framed bytes of one block, to publish on the device's blocks_data topic.

    Raises:
        UsageError: `data` is longer than `block_size` or a field is invalid.
    """
    if len(data) > block_size:
        raise UsageError(f"block {index} holds {len(data)} bytes, above block size {block_size}")
    try:
        header = _BlockHeader(
            sha256=sha256,
            block_size=block_size,
            index=index,
            block_sha256=hashlib.sha256(data).hexdigest(),
        )
    except ValidationError as exc:
        raise UsageError(f"block header: {describe_validation_error(exc, 'header')}") from exc
    return _frame(header, bytes(data))


def encode_blocks_unavailable(sha256: str, reason: str) -> bytes:
    """The framed bytes telling a device that the bundle `sha256` cannot be served."""
    try:
        return _frame(BlocksUnavailable(sha256=sha256, reason=reason[:256]))
    except ValidationError as exc:
        raise UsageError(f"unavailable: {describe_validation_error(exc, 'header')}") from exc


def parse_block_payload(payload: bytes) -> BlockData | BlocksUnavailable:
    """Parse a message received on the blocks_data topic.

    Raises:
        MessageSchemaError: too large, no header line, a header that does not
            match its schema, or data longer than the block size (an
            `unavailable` message carries no data).
    """
    if not isinstance(payload, (bytes, bytearray)):
        raise MessageSchemaError(f"block payload is a {type(payload).__name__}, not bytes")
    if len(payload) > MAX_BLOCK_PAYLOAD_BYTES:
        raise MessageSchemaError(
            f"block message is {len(payload)} bytes, above the {MAX_BLOCK_PAYLOAD_BYTES} limit"
        )
    end = payload.find(b"\n", 0, MAX_BLOCK_HEADER_BYTES + 1)
    if end < 0:
        raise MessageSchemaError(
            f"block message has no header line within {MAX_BLOCK_HEADER_BYTES} bytes"
        )
    try:
        raw = parse_json(bytes(payload[:end]), "block header")
    except MalformedDocumentError as exc:
        raise MessageSchemaError(str(exc)) from exc
    except ValueError as exc:
        raise MessageSchemaError(f"block header is not acceptable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise MessageSchemaError(f"block header is a JSON {type(raw).__name__}, not an object")
    if raw.get("schema_version") != SCHEMA_VERSION or type(raw.get("schema_version")) is not int:
        raise MessageSchemaError(
            f"block header has schema_version {raw.get('schema_version')!r}; "
            f"this side understands {SCHEMA_VERSION}"
        )
    data = bytes(payload[end + 1 :])
    try:
        if raw.get("type") == "unavailable":
            unavailable = BlocksUnavailable.model_validate(raw)
            if data:
                raise MessageSchemaError("an unavailable message carries data")
            return unavailable
        header = _BlockHeader.model_validate(raw)
    except ValidationError as exc:
        raise MessageSchemaError(
            f"block header does not match its schema: field "
            f"{describe_validation_error(exc, 'header')}"
        ) from exc
    if len(data) > header.block_size:
        raise MessageSchemaError(
            f"block {header.index} carries {len(data)} bytes, above block size {header.block_size}"
        )
    return BlockData(header.sha256, header.block_size, header.index, header.block_sha256, data)
