"""The server's narrow interfaces to the MQTT side.

Domain code (directives, fleet timestamps, block service) publishes through
`Publisher` and never sees paho; `edgefleet.server.mqtt.link.ServerLink`
implements it against a broker, tests implement it with a list of calls.
"""

from __future__ import annotations

from typing import Protocol


class Publisher(Protocol):
    """Something that hands a message to the broker (server -> devices).

    `publish` raises `edgefleet.errors.PublishError` when the broker did not take
    the message (what "taken" means: `edgefleet.mqtt.session`).
    """

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None: ...


class DeviceKeys(Protocol):
    """Lookup of a device's enrolled Ed25519 public key (hex), None when unknown.

    `fresh=True` asks to bypass a cache (the ingestor asks once after a signature
    failed: the device may have been re-keyed through another replica). May raise
    `StorageError`. `edgefleet.server.devices.DeviceKeyCache` implements it.
    """

    def public_key(self, device_id: str, *, fresh: bool = False) -> str | None: ...


class MessageHandler(Protocol):
    """Receives one MQTT message (topic, payload bytes); must not raise."""

    def __call__(self, topic: str, payload: bytes) -> None: ...
