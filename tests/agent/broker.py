"""The servers the agent's transport and link tests talk to, each real, none a mock.

- `MosquittoBroker`: a mosquitto process on a free port with a temporary config
  (persistence on, unlimited queued messages, anonymous access), which a test
  can stop, kill and restart on the same port and database.
- `Observer`: a plain paho client that records what arrives on some topics,
  as the fleet server would see it (optionally with a persistent session).
- `BlockServer`: the server side of the MQTT block protocol
  (`edgefleet.mqtt.blocks`), serving files over the real broker, with faults
  on demand: drop blocks, damage them in transit, forge them consistently,
  stop serving after some blocks.
(The HTTP counterpart, `FileServer`, is in `tests.agent.test_transport_http`.)

Every wait is bounded; a test that cannot get mosquitto is skipped, unless
EDGEFLEET_REQUIRE_MOSQUITTO=1 (CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.errors import MessageSchemaError
from edgefleet.mqtt.blocks import (
    block_count,
    block_extent,
    encode_block_data,
    encode_blocks_unavailable,
    parse_block_request,
)
from edgefleet.mqtt.topics import DeviceTopics, TopicKind, device_filter

WAIT = 10.0  # seconds: the bound on every wait in these helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_device_id(prefix: str = "dev") -> str:
    """A device id no other test uses, so each test has its own topics."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def mosquitto_or_skip() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )
    if path is None:
        if os.environ.get("EDGEFLEET_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("mosquitto is not installed and EDGEFLEET_REQUIRE_MOSQUITTO=1")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    return path


class MosquittoBroker:
    """One mosquitto process; `stop` and `start` again keep the port and the database."""

    def __init__(self, directory: Path, *, executable: str, extra_config: str = "") -> None:
        self.directory = directory
        self.executable = executable
        self.port = free_port()
        self.extra_config = extra_config
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _write_config(self) -> Path:
        config = self.directory / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "max_queued_messages 0\n"
            f"log_dest file {self.directory}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n" + self.extra_config
        )
        return config

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("broker already running")
        config = self._write_config()
        self._process = subprocess.Popen(
            [self.executable, "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start:\n{self.log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {WAIT} s")

    def stop(self) -> None:
        """Terminate cleanly (mosquitto saves its database)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: nothing saved since the last autosave."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _end(self, sig: int) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(sig)
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(WAIT)

    @classmethod
    @contextlib.contextmanager
    def running(cls, directory: Path, extra_config: str = "") -> Iterator[MosquittoBroker]:
        directory.mkdir(parents=True, exist_ok=True)
        broker = cls(directory, executable=mosquitto_or_skip(), extra_config=extra_config)
        broker.start()
        try:
            yield broker
        finally:
            broker.kill()


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    return host, int(port)


def paho_client(client_id: str = "") -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or unique_device_id("obs"),
        protocol=mqtt.MQTTv5,
    )


def connect(client: mqtt.Client, url: str, *, persistent: bool = False) -> None:
    """Connect and start paho's own loop (which reconnects quickly by itself)."""
    host, port = host_port(url)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if persistent:
        properties.SessionExpiryInterval = 3600
    # paho annotates whole seconds, but takes fractions (it only sleeps them).
    client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]
    client.connect(host, port, 30, clean_start=not persistent, properties=properties)
    client.loop_start()


def publish_once(
    url: str, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
) -> None:
    """Publish one message as the fleet server would, and wait for the broker to take it."""
    client = paho_client()
    connect(client, url)
    try:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic} not acknowledged within {WAIT} s")
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


class Observer:
    """Records every message on `filters`; `wait_for` blocks until a predicate holds."""

    def __init__(self, url: str, filters: list[str], *, persistent: bool = False) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._filters = filters
        self.client = paho_client(unique_device_id("obs"))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        connect(self.client, url, persistent=persistent)
        if not self._subscribed.wait(WAIT):
            raise TimeoutError("observer did not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe([(f, 1) for f in self._filters])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(message.topic, bytes(message.payload), message.retain))
            self._cond.notify_all()

    def on(self, topic: str) -> list[bytes]:
        with self._cond:
            return [m.payload for m in self.messages if m.topic == topic]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class BlockFaults:
    """What the block server does wrong; each set is consumed as it strikes (once per index)."""

    drop: set[int] = field(default_factory=set)  # never sent the first time
    damage: set[int] = field(default_factory=set)  # a byte flipped after hashing: in transit
    forge: set[int] = field(default_factory=set)  # a byte flipped before hashing: every time
    stop_after: int | None = None  # serve this many blocks in all, then go silent


class BlockServer:
    """The fleet server's side of the block protocol, for the files it is given."""

    def __init__(self, url: str, files: list[Path], faults: BlockFaults | None = None) -> None:
        self.files = {_sha256(path): path for path in files}
        self.faults = faults or BlockFaults()
        self.blocks_sent = 0
        self.bytes_sent = 0
        self.requested: list[int] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = paho_client(unique_device_id("blocksrv"))
        self.client.on_connect = lambda c, *a: c.subscribe(
            device_filter(TopicKind.BLOCKS_REQUEST), 1
        )
        self.client.on_subscribe = lambda *args: self._ready.set()
        self.client.on_message = self._on_message
        connect(self.client, url)
        if not self._ready.wait(WAIT):
            raise TimeoutError("block server did not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            device_id, request = parse_block_request(message.topic, bytes(message.payload))
        except MessageSchemaError:
            self.refused += 1
            return
        out = DeviceTopics(device_id).blocks_data
        path = self.files.get(request.sha256)
        if path is None:
            client.publish(out, encode_blocks_unavailable(request.sha256, "unknown bundle"))
            return
        length = path.stat().st_size
        with path.open("rb") as handle:
            for index in request.indexes:
                with self._lock:
                    self.requested.append(index)
                    if index >= block_count(length, request.block_size):
                        continue
                    if index in self.faults.drop:
                        self.faults.drop.discard(index)
                        continue
                    limit = self.faults.stop_after
                    if limit is not None and self.blocks_sent >= limit:
                        continue
                    offset, size = block_extent(index, length, request.block_size)
                    handle.seek(offset)
                    data = handle.read(size)
                    if index in self.faults.forge:
                        data = _flip(data)
                    payload = encode_block_data(request.sha256, request.block_size, index, data)
                    if index in self.faults.damage:
                        self.faults.damage.discard(index)
                        payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
                    self.blocks_sent += 1
                    self.bytes_sent += size
                client.publish(out, payload, qos=TopicKind.BLOCKS_DATA.qos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
