"""`FleetSimulator`: many devices on a real broker, speaking the real device protocol.

The devices share one or a few paho clients (a real agent per device would be
far too heavy for a test of 1,000 devices). Every device message is built with
the core's schemas and signed with the device's own key
(`edgefleet.mqtt.devicesig`), exactly as `AgentLink` sends it. The simulator
subscribes to `edgefleet/v1/devices/+/directive`, verifies each directive
against the trust root (`verify_directive`, per-device sequence), records it,
and answers as an agent would: status `downloading` then `committed` (its
served version moves), or `failed` for devices in `fail`; a rollback directive
is answered with `committed` back on the previous version. Refused directives
are recorded with the error's class name.

Limits: presence is published on demand (`presence`), not as a Last Will (one
Will per client, and many devices share a client).
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.errors import UntrustedInputError
from edgefleet.mqtt.devicesig import DeviceKey, sign_device_payload
from edgefleet.mqtt.directives import Directive, verify_directive
from edgefleet.mqtt.messages import (
    BinCounts,
    Heartbeat,
    LatencyHistogram,
    Message,
    Presence,
    StatusReport,
    TelemetryWindow,
    encode_message,
)
from edgefleet.mqtt.topics import DeviceTopics, TopicKind, device_filter, parse_device_topic
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from tests.agent.broker import host_port, unique_device_id

WAIT = 10.0
LATENCY_BOUNDS = [5.0, 10.0, 50.0, 100.0]


@dataclass
class SimDevice:
    """One simulated device: its id, key, profile and what it serves."""

    id: str
    key: DeviceKey = field(default_factory=DeviceKey.generate)
    profile: str = "x86_64-avx2"
    model_name: str | None = None
    model_version: str | None = None
    previous_version: str | None = None
    status_sequence: int = 0
    directive_sequence: int = 0

    @property
    def public_key(self) -> str:
        return self.key.public_hex


@dataclass(frozen=True)
class ReceivedDirective:
    device_id: str
    directive: Directive


def make_devices(count: int, prefix: str = "sim") -> list[SimDevice]:
    return [SimDevice(unique_device_id(prefix)) for _ in range(count)]


def telemetry_window(
    device_id: str,
    start: dt.datetime,
    *,
    bundle: tuple[str, str] = ("demo", "1.2.3"),
    requests: int = 100,
    errors: int = 0,
    fallbacks: int = 0,
    seconds: int = 60,
    features: int = 2,
    bins: int = 10,
) -> TelemetryWindow:
    """A plausible telemetry window: latencies spread over the bounds, bins filled evenly."""
    per_bin = [requests // bins] * bins
    latency = [requests // 5] * 4 + [requests - 4 * (requests // 5)]
    inputs = {
        f"f{i}": BinCounts(counts=per_bin, nan=0, below=requests % bins, above=0)
        for i in range(features)
    }
    return TelemetryWindow(
        device_id=device_id,
        window_start=format_time(start),
        window_end=format_time(start + dt.timedelta(seconds=seconds)),
        bundle_name=bundle[0],
        bundle_version=bundle[1],
        requests=requests,
        errors=errors,
        fallbacks=fallbacks,
        schema_violations=0,
        latency=LatencyHistogram(bounds_ms=LATENCY_BOUNDS, counts=latency),
        inputs=inputs,
        outputs={"y": BinCounts(counts=per_bin, nan=0, below=requests % bins, above=0)},
    )


class FleetSimulator:
    """Devices publishing signed messages over `clients` paho connections."""

    def __init__(
        self,
        broker_url: str,
        devices: Iterable[SimDevice],
        *,
        trust: TrustRoot | None = None,
        clients: int = 1,
        fail: Iterable[str] = (),
        answer_directives: bool = True,
        agent_version: str = "0.1.0",
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.devices = {device.id: device for device in devices}
        self.trust = trust
        self.fail = set(fail)
        self.answer_directives = answer_directives
        self.agent_version = agent_version
        self.clock = clock
        self.directives: list[ReceivedDirective] = []
        self.refused: list[tuple[str, str]] = []  # (device id, error class)
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        host, port = host_port(broker_url)
        self._clients = [self._connect(host, port, i) for i in range(max(1, clients))]
        self._next = itertools.cycle(self._clients)
        if not self._subscribed.wait(WAIT):
            self.close()
            raise TimeoutError("the fleet simulator did not subscribe to directives")

    def _connect(self, host: str, port: int, index: int) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=unique_device_id("fleet"), protocol=mqtt.MQTTv5
        )
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        if index == 0:
            client.on_connect = lambda c, *a: c.subscribe(
                device_filter(TopicKind.DIRECTIVE), TopicKind.DIRECTIVE.qos
            )
            client.on_subscribe = lambda *a: self._subscribed.set()
            client.on_message = self._on_message
        client.connect(host, port, 30)
        client.loop_start()
        return client

    def close(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()

    # -- device messages ---------------------------------------------------------------------

    def send(self, device_id: str, kind: TopicKind, message: Message) -> mqtt.MQTTMessageInfo:
        """Sign and publish a message of `device_id` (at the kind's QoS)."""
        device = self.devices[device_id]
        topic = DeviceTopics(device_id).topic(kind)
        frame = sign_device_payload(topic, encode_message(message), device.key)
        return next(self._next).publish(topic, frame, qos=kind.qos)

    def send_raw(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return next(self._next).publish(topic, payload, qos=qos)

    def presence(self, device_id: str, online: bool) -> None:
        payload = (Presence.ONLINE if online else Presence.OFFLINE).payload
        self.send_raw(DeviceTopics(device_id).presence, payload).wait_for_publish(WAIT)

    def heartbeat(self, device_id: str, **overrides: Any) -> Heartbeat:
        device = self.devices[device_id]
        fields: dict[str, Any] = {
            "device_id": device_id,
            "sent_at": format_time(self.clock()),
            "uptime_s": 100,
            "cpu_percent": 12.5,
            "memory_used_bytes": 100 << 20,
            "memory_total_bytes": 1 << 30,
            "disk_free_bytes": 1 << 30,
            "disk_total_bytes": 8 << 30,
            "agent_version": self.agent_version,
            "model_name": device.model_name,
            "model_version": device.model_version,
            "install_state": "committed" if device.model_version else "idle",
        }
        fields.update(overrides)
        message = Heartbeat(**fields)
        self.send(device_id, TopicKind.HEARTBEAT, message)
        return message

    def status(self, device_id: str, install_state: str, **fields: Any) -> StatusReport:
        device = self.devices[device_id]
        device.status_sequence += 1
        message = StatusReport(
            device_id=device_id,
            sent_at=format_time(self.clock()),
            sequence=fields.pop("sequence", device.status_sequence),
            install_state=install_state,
            **fields,
        )
        self.send(device_id, TopicKind.STATUS, message)
        return message

    def telemetry(self, device_id: str, start: dt.datetime, **fields: Any) -> TelemetryWindow:
        device = self.devices[device_id]
        if device.model_name and "bundle" not in fields:
            fields["bundle"] = (device.model_name, device.model_version)
        window = telemetry_window(device_id, start, **fields)
        self.send(device_id, TopicKind.TELEMETRY, window)
        return window

    # -- directives --------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            device_id, _ = parse_device_topic(message.topic)
        except UntrustedInputError:
            return
        device = self.devices.get(device_id)
        if device is None or self.trust is None:
            return
        try:
            directive = verify_directive(
                bytes(message.payload),
                self.trust,
                device_id=device_id,
                last_sequence=device.directive_sequence,
            )
        except UntrustedInputError as exc:
            with self._cond:
                self.refused.append((device_id, type(exc).__name__))
                self._cond.notify_all()
            return
        device.directive_sequence = directive.sequence
        with self._cond:
            self.directives.append(ReceivedDirective(device_id, directive))
            self._cond.notify_all()
        if self.answer_directives:
            self._answer(device, directive)

    def _answer(self, device: SimDevice, directive: Directive) -> None:
        previous = device.model_version
        if directive.action == "rollback":
            # As the agent: a rollback names the bundle it undoes; a device not serving it
            # keeps what it serves.
            named = directive.bundle
            if named is None or (device.model_name, device.model_version) == (
                named.name,
                named.version,
            ):
                device.model_version, device.previous_version = device.previous_version, None
            self.status(
                device.id,
                "rolling_back",
                bundle_name=device.model_name,
                bundle_version=previous,
                directive_sequence=directive.sequence,
            )
            self.status(
                device.id,
                "committed",
                bundle_name=device.model_name,
                bundle_version=device.model_version,
                directive_sequence=directive.sequence,
                reason="rolled back on request",
            )
            return
        bundle = directive.bundle
        assert bundle is not None
        common = {
            "bundle_name": bundle.name,
            "bundle_version": bundle.version,
            "previous_version": previous,
            "directive_sequence": directive.sequence,
        }
        self.status(device.id, "downloading", **common)
        if device.id in self.fail:
            self.status(device.id, "failed", reason="simulated failure", **common)
            return
        if directive.shadow:
            reason = f"{bundle.name}-{bundle.version} runs in shadow beside {previous}: simulated"
            self.status(device.id, "committed", reason=reason, **common)
            return
        device.previous_version = previous
        device.model_name, device.model_version = bundle.name, bundle.version
        self.status(device.id, "committed", **common)

    def directives_for(self, device_id: str) -> list[Directive]:
        with self._cond:
            return [r.directive for r in self.directives if r.device_id == device_id]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


__all__ = [
    "FleetSimulator",
    "ReceivedDirective",
    "SimDevice",
    "make_devices",
    "telemetry_window",
]
