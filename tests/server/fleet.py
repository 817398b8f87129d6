"""`FleetSimulator`: simulated devices the test drives message by message.

The devices and what they say are `edgefleet simulate`'s (`SimDevice` in
`edgefleet.simulate.device`: the same signed heartbeats, telemetry windows,
status reports and answers to directives); what differs is the transport and
who decides when: here the test sends each message itself, over one or a few
shared paho clients, and reads back every directive. The simulator subscribes
to `edgefleet/v1/devices/+/directive`, verifies each directive against the
trust root (`verify_directive`, per-device sequence), records it, and answers
it as `SimDevice` does, without a download (`failed` for devices in `fail`).
Refused directives are recorded with the error's class name. For a whole
fleet that downloads and runs on its own, run `edgefleet simulate`.

Limits: presence is published on demand (`presence`), not as a Last Will (one
Will per client, and many devices share a client).
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.errors import UntrustedInputError
from edgefleet.mqtt.directives import Directive, verify_directive
from edgefleet.mqtt.messages import Heartbeat, Message, Presence, StatusReport, TelemetryWindow
from edgefleet.mqtt.topics import DeviceTopics, TopicKind, device_filter, parse_device_topic
from edgefleet.simulate.device import LATENCY_BOUNDS, SimDevice, telemetry_window
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot
from tests.agent.broker import host_port, unique_device_id

WAIT = 10.0


@dataclass(frozen=True)
class ReceivedDirective:
    device_id: str
    directive: Directive


def make_devices(count: int, prefix: str = "sim") -> list[SimDevice]:
    return [SimDevice(unique_device_id(prefix)) for _ in range(count)]


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
        topic, frame = self.devices[device_id].frame(kind, message)
        return next(self._next).publish(topic, frame, qos=kind.qos)

    def send_raw(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return next(self._next).publish(topic, payload, qos=qos)

    def presence(self, device_id: str, online: bool) -> None:
        payload = (Presence.ONLINE if online else Presence.OFFLINE).payload
        self.send_raw(DeviceTopics(device_id).presence, payload).wait_for_publish(WAIT)

    def heartbeat(self, device_id: str, **overrides: Any) -> Heartbeat:
        message = self.devices[device_id].heartbeat(self.clock(), self.agent_version, **overrides)
        self.send(device_id, TopicKind.HEARTBEAT, message)
        return message

    def status(self, device_id: str, install_state: str, **fields: Any) -> StatusReport:
        message = self.devices[device_id].status(self.clock(), install_state, **fields)
        self.send(device_id, TopicKind.STATUS, message)
        return message

    def telemetry(self, device_id: str, start: dt.datetime, **fields: Any) -> TelemetryWindow:
        window = self.devices[device_id].telemetry(start, **fields)
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
        failure = "simulated failure" if device.id in self.fail else None
        begun = device.begin(directive, self.clock())
        for report in [*begun, *device.finish(directive, self.clock(), failure)]:
            self.send(device.id, TopicKind.STATUS, report)

    def directives_for(self, device_id: str) -> list[Directive]:
        with self._cond:
            return [r.directive for r in self.directives if r.device_id == device_id]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


__all__ = [
    "LATENCY_BOUNDS",
    "FleetSimulator",
    "ReceivedDirective",
    "SimDevice",
    "make_devices",
    "telemetry_window",
]
