"""FleetTimestamper: one replica publishes, at its period, with increasing sequences."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from edgefleet.errors import FleetAcceptsError, FleetTimestampError, UsageError
from edgefleet.mqtt import (
    FLEET_ACCEPTS_TOPIC,
    FLEET_TIMESTAMP_TOPIC,
    accepted_fields,
    verify_fleet_accepts,
    verify_fleet_timestamp,
)
from edgefleet.server.db.database import Database
from edgefleet.server.fleettime import FleetTimestamper
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet
from tests.server.rolloutsim import START, ManualClock, RecordingPublisher, make_settings


def _stamper(
    db: Database,
    keyset: KeySet,
    tmp_path: Path,
    clock: ManualClock,
    publisher: RecordingPublisher,
    replica: str = "replica-a",
) -> FleetTimestamper:
    settings = make_settings(
        tmp_path,
        replica_id=replica,
        fleet_timestamp_period=dt.timedelta(minutes=10),
        fleet_timestamp_ttl=dt.timedelta(hours=1),
        lease_ttl=dt.timedelta(seconds=15),
    )
    return FleetTimestamper(db, [keyset.server], 3, publisher, settings, clock)


def test_first_tick_publishes_then_once_per_period(
    database: Database, keyset: KeySet, trust: TrustRoot, tmp_path: Path
) -> None:
    clock, publisher = ManualClock(), RecordingPublisher()
    stamper = _stamper(database, keyset, tmp_path, clock, publisher)
    assert stamper.tick() is True
    for _ in range(5):
        clock.advance(100)
        assert stamper.tick() is False  # 500 s < 600 s
    clock.advance(100)
    assert stamper.tick() is True
    assert [(c.topic, c.qos, c.retain) for c in publisher.calls] == [
        (FLEET_TIMESTAMP_TOPIC, 1, True),
        (FLEET_ACCEPTS_TOPIC, 1, True),
    ] * 2
    stamps, accepts = publisher.calls[0::2], publisher.calls[1::2]
    first = verify_fleet_timestamp(stamps[0].payload, trust, last_sequence=0, now=START)
    assert first.sequence == 1 and first.trust_root_version == 3
    assert first.issued_at == START and first.expires_at == START + dt.timedelta(hours=1)
    second = verify_fleet_timestamp(
        stamps[1].payload, trust, last_sequence=first.sequence, now=clock()
    )
    assert second.sequence == 2
    # A device refuses the first one again (the retained copy redelivered).
    with pytest.raises(FleetTimestampError):
        verify_fleet_timestamp(stamps[0].payload, trust, last_sequence=2, now=clock())
    # Each timestamp comes with the fields this server accepts, under its sequence and dates.
    announced = verify_fleet_accepts(accepts[1].payload, trust, last_sequence=1, now=clock())
    assert (announced.sequence, announced.expires_at) == (2, second.expires_at)
    assert announced.messages == accepted_fields()
    assert "link.connects" in announced.messages["heartbeat"]
    with pytest.raises(FleetAcceptsError):
        verify_fleet_accepts(accepts[0].payload, trust, last_sequence=1, now=clock())


def test_only_the_lease_holder_publishes_and_another_takes_over(
    database: Database, keyset: KeySet, tmp_path: Path
) -> None:
    clock, publisher = ManualClock(), RecordingPublisher()
    a = _stamper(database, keyset, tmp_path, clock, publisher, "replica-a")
    b = _stamper(database, keyset, tmp_path, clock, publisher, "replica-b")
    assert a.tick() is True
    assert b.tick() is False
    clock.advance(10)
    assert a.tick() is False  # renews its lease, not yet due
    assert b.tick() is False
    # a stops; once its lease expires, b publishes at once with the next sequence.
    clock.advance(16)
    assert b.tick() is True
    assert (a.last_sequence, b.last_sequence) == (1, 2)
    # a comes back: b holds the lease now.
    assert a.tick() is False


def test_needs_a_key_and_a_trust_version(
    sqlite_database: Database, keyset: KeySet, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(UsageError):
        FleetTimestamper(sqlite_database, [], 1, RecordingPublisher(), settings)
    with pytest.raises(UsageError):
        FleetTimestamper(sqlite_database, [keyset.server], 0, RecordingPublisher(), settings)
