"""An agent newer than its server, on a real mosquitto: once it hears the server's signed
announcement of the fields it accepts (retained), its heartbeats leave out the optional fields
the server does not know, so the server takes them; a newer announcement brings them back, and
one the trust root did not sign changes nothing."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from edgefleet.keys import SigningKey
from edgefleet.mqtt import (
    FleetAccepts,
    accepted_fields,
    fleet_accepts_topic,
    sign_fleet_accepts,
)
from edgefleet.mqtt.topics import DeviceTopics
from edgefleet.timefmt import format_time, utcnow
from tests.agent.broker import MosquittoBroker, Observer
from tests.agent.test_trust_rotation import Device, broker  # noqa: F401 (the fixture)
from tests.conftest import KeySet, make_trust_root

# What a server that predates the link report and the trust root version accepts.
OLDER = {
    kind: [p for p in paths if not p.startswith(("link", "trust_root_version"))]
    for kind, paths in accepted_fields().items()
}


def announcement(sequence: int, messages: dict[str, list[str]], server: SigningKey) -> bytes:
    now = utcnow()
    accepts = FleetAccepts(
        sequence=sequence,
        issued=format_time(now - dt.timedelta(minutes=1)),
        expires=format_time(now + dt.timedelta(hours=1)),
        messages=messages,
    )
    return sign_fleet_accepts(accepts, [server])


def quick_device(tmp_path: Path, keys: KeySet, broker: MosquittoBroker) -> Device:  # noqa: F811
    """A device flashed with a trust root of `keys`, sending a heartbeat every second."""
    device = Device(tmp_path, make_trust_root(keys), broker.url)
    telemetry = device.config.telemetry.model_copy(update={"heartbeat_seconds": 1})
    device.config = device.config.model_copy(update={"telemetry": telemetry})
    return device


def test_heartbeats_follow_the_fields_the_server_announced(
    tmp_path: Path,
    broker: MosquittoBroker,  # noqa: F811
) -> None:
    keys = KeySet(*(SigningKey.generate() for _ in range(3)))
    device = quick_device(tmp_path, keys, broker)
    topic = DeviceTopics(device.config.device_id).heartbeat
    observer = Observer(broker.url, [topic])

    def heartbeats() -> list[dict[str, Any]]:
        return [json.loads(payload) for payload in observer.on(topic)]

    def next_heartbeat() -> dict[str, Any]:
        seen = len(heartbeats())
        assert observer.wait_for(lambda: len(observer.on(topic)) > seen)
        return heartbeats()[seen]

    device.publish(fleet_accepts_topic(), announcement(5, OLDER, keys.server), retain=True)
    try:
        with device.running() as agent:
            assert observer.wait_for(lambda: any("link" not in h for h in heartbeats()))
            narrowed = next_heartbeat()
            assert "link" not in narrowed and "trust_root_version" not in narrowed
            assert narrowed["device_id"] == device.config.device_id
            link = agent.link
            assert link is not None
            assert link.describe().startswith("connected; the server is older, left out: ")
            assert "heartbeat.link" in link.describe()
            # One that the trust root did not sign is refused and changes nothing.
            forged = announcement(6, accepted_fields(), SigningKey.generate())
            device.publish(fleet_accepts_topic(), forged, retain=True)
            assert observer.wait_for(lambda: link.counters().refused == 1)
            assert "link" not in next_heartbeat()
            # The server upgraded: its announcement names the fields, and they come back.
            device.publish(
                fleet_accepts_topic(), announcement(7, accepted_fields(), keys.server), retain=True
            )
            assert observer.wait_for(lambda: "link" in heartbeats()[-1], timeout=15)
            assert next_heartbeat()["trust_root_version"] == 1
            assert link.describe() == "connected"
    finally:
        observer.close()
        device.publish(fleet_accepts_topic(), b"", retain=True)  # clear the retained copy


def test_without_an_announcement_heartbeats_go_out_whole(
    tmp_path: Path,
    broker: MosquittoBroker,  # noqa: F811
) -> None:
    device = quick_device(tmp_path, KeySet(*(SigningKey.generate() for _ in range(3))), broker)
    topic = DeviceTopics(device.config.device_id).heartbeat
    observer = Observer(broker.url, [topic])
    try:
        with device.running():
            assert observer.wait_for(lambda: len(observer.on(topic)) >= 2)
        for payload in observer.on(topic):
            heartbeat = json.loads(payload)
            assert "link" in heartbeat and heartbeat["trust_root_version"] == 1
            assert set(heartbeat) - set(OLDER["heartbeat"])  # what an older server refuses
    finally:
        observer.close()
