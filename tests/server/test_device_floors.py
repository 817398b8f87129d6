"""Security floors and refusals as the server sees them: heartbeats carry the floors,
a refused install leaves the device's state alone, and a rollout counts it as failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.mqtt.topics import TopicKind
from edgefleet.server.api.schemas.devices import DevicePublic
from edgefleet.server.db.database import Database
from edgefleet.server.mqtt.ingest import Ingestor
from edgefleet.server.rollouts.progress import DeviceState, _answer
from tests.server.fleet import SimDevice
from tests.server.test_ingest import (
    Clock,
    Keys,
    device_row,
    enroll,
    heartbeat,
    make_settings,
    signed,
    status,
)


@pytest.fixture
def device() -> SimDevice:
    return SimDevice("floored-1")


@pytest.fixture
def ingestor(database: Database, device: SimDevice, tmp_path: Path) -> Ingestor:
    enroll(database, [device])
    return Ingestor(database, Keys([device]), make_settings(tmp_path), clock=Clock())


def test_heartbeats_report_the_floors_and_an_older_agents_keeps_them(
    ingestor: Ingestor, database: Database, device: SimDevice
) -> None:
    assert DevicePublic.model_validate(device_row(database, device.id)).security_floors is None
    floors = {"demo": 1_000_001_000_000, "m2": 5_000_000_000_000}
    ingestor.handle(*signed(device, TopicKind.HEARTBEAT, heartbeat(device, security_floors=floors)))
    ingestor.flush()
    assert DevicePublic.model_validate(device_row(database, device.id)).security_floors == floors
    # An agent that predates floors per name sends none: what was reported stays.
    later = heartbeat(device, uptime_s=9, sent_at="2026-03-01T12:00:05Z")
    ingestor.handle(*signed(device, TopicKind.HEARTBEAT, later))
    ingestor.flush()
    row = device_row(database, device.id)
    assert row.heartbeat is not None and row.heartbeat["uptime_s"] == 9
    assert row.security_floors == floors


def test_a_refused_install_is_history_and_leaves_the_device_committed(
    ingestor: Ingestor, database: Database, device: SimDevice
) -> None:
    served = {"bundle_name": "demo", "bundle_version": "1.1.0"}
    ingestor.handle(*signed(device, TopicKind.STATUS, status(device, 1, "committed", **served)))
    reason = "tampered-file: 'model.onnx' does not match its SHA-256 in the manifest"
    other = {"bundle_name": "demo", "bundle_version": "1.2.0"}
    refused = status(device, 2, "refused", **other, reason=reason)
    ingestor.handle(*signed(device, TopicKind.STATUS, refused))
    ingestor.flush()
    shown = DevicePublic.model_validate(device_row(database, device.id))
    assert (shown.install_state, shown.model_name, shown.model_version) == (
        "committed",
        "demo",
        "1.1.0",
    )


def test_a_refusal_answers_a_rollout_directive_as_failed_with_its_code() -> None:
    reason = "below-security-floor: bundle demo@1.0.0 has release counter 1000000000000, ..."
    assert _answer(DeviceState.NOTIFIED, "refused", reason) == (DeviceState.FAILED, reason)
    assert _answer(DeviceState.ROLLING_BACK, "refused", reason) == (
        DeviceState.FAILED,
        f"the rollback failed: {reason}",
    )
