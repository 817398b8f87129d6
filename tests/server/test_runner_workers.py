"""The replica's background workers survive a foreign error: logged, counted, survived.

Each worker is built as `server run` builds it, on a real SQLite database whose
next unit of work fails once with an OSError (a full disk under the database),
the one fake: at the project's own `Database` interface. The tests look at the
outcome through a second, plain `Database` on the same file.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.mqtt import FLEET_ACCEPTS_TOPIC, FLEET_TIMESTAMP_TOPIC
from edgefleet.mqtt.topics import TopicKind
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow, Device, TelemetryBucket
from edgefleet.server.directives import DirectiveIssuer
from edgefleet.server.drift.evaluator import LEASE_NAME as DRIFT_LEASE
from edgefleet.server.drift.evaluator import DriftEvaluator
from edgefleet.server.fleettime import FleetTimestamper
from edgefleet.server.leases import lease_holder
from edgefleet.server.mqtt.ingest import Ingestor
from edgefleet.server.principals import Principal, Role
from edgefleet.server.rollouts.driver import RolloutDriver
from edgefleet.server.rollouts.plan import plan_from_dict
from edgefleet.server.rollouts.service import start_rollout
from edgefleet.server.runner import (
    drift_worker,
    driver_worker,
    retention_worker,
    timestamp_worker,
)
from edgefleet.timefmt import utcnow
from edgefleet.worker import Worker
from tests.conftest import KeySet
from tests.server.fleet import SimDevice
from tests.server.rolloutsim import RecordingPublisher, add_bundle, add_device, make_settings
from tests.server.test_ingest import Keys, enroll, signed, telemetry

WAIT = 30.0
STEP_S = 0.05  # the workers' interval here: the step after the failure comes soon


class FullDiskDatabase(Database):
    """A real database whose next unit of work fails once, as a full disk would."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.failure: OSError | None = None

    def fail_once(self) -> OSError:
        self.failure = OSError(errno.ENOSPC, "No space left on device")
        return self.failure

    @contextmanager
    def session(self) -> Iterator[Session]:
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure
        with super().session() as session:
            yield session


@pytest.fixture
def db(sqlite_database: Database) -> Iterator[FullDiskDatabase]:
    flaky = FullDiskDatabase(sqlite_database.url)
    yield flaky
    flaky.dispose()


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def survives_a_full_disk(
    worker: Worker,
    db: FullDiskDatabase,
    done: Callable[[], bool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Start `worker` with the database failing its first unit of work; `done` says the
    work got done by a later step."""
    failure = db.fail_once()
    with caplog.at_level(logging.ERROR):
        worker.start()
        try:
            assert wait_until(done), f"{worker.name}: no step after the failure did the work"
            assert worker.alive and worker.healthy
        finally:
            worker.stop()
    assert worker.failures == 1 and worker.last_failure is failure
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[1] is failure]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR
    assert logged[0].getMessage().startswith(f"{worker.name} failed")


def test_the_rollout_driver_survives_a_foreign_error(
    db: FullDiskDatabase, tmp_path: Path, keyset: KeySet, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path)
    add_bundle(db)
    add_device(db, "dev-01")
    with db.session() as session:
        bundle = session.scalars(select(BundleRow)).one()
        start_rollout(
            session,
            bundle=bundle,
            selector={},
            plan=plan_from_dict({"stages": [{"percent": 100}]}),
            actor=Principal("alice", Role.OPERATOR),
        )
    publisher = RecordingPublisher()
    driver = RolloutDriver(db, DirectiveIssuer([keyset.server], settings), publisher, settings)
    worker = driver_worker(driver, STEP_S)
    survives_a_full_disk(worker, db, lambda: bool(publisher.to_device("dev-01")), caplog)


def test_the_fleet_timestamper_survives_a_foreign_error(
    db: FullDiskDatabase, tmp_path: Path, keyset: KeySet, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, lease_ttl=dt.timedelta(seconds=1.5))
    publisher = RecordingPublisher()
    worker = timestamp_worker(FleetTimestamper(db, [keyset.server], 1, publisher, settings))
    survives_a_full_disk(
        worker,
        db,
        lambda: [c.topic for c in publisher.calls] == [FLEET_TIMESTAMP_TOPIC, FLEET_ACCEPTS_TOPIC],
        caplog,
    )


def test_retention_survives_a_foreign_error(
    db: FullDiskDatabase,
    sqlite_database: Database,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(tmp_path, offline_after=dt.timedelta(minutes=2))
    add_device(db, "dev-silent", now=utcnow() - dt.timedelta(hours=1), online=True)

    def marked_offline() -> bool:
        with sqlite_database.session() as session:
            device = session.get(Device, "dev-silent")
            return device is not None and not device.online

    worker = retention_worker(db, settings, STEP_S)
    survives_a_full_disk(worker, db, marked_offline, caplog)


def test_the_drift_evaluator_survives_a_foreign_error(
    db: FullDiskDatabase,
    sqlite_database: Database,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(tmp_path, drift_interval_s=STEP_S)

    def evaluating() -> bool:
        with sqlite_database.session() as session:
            return lease_holder(session, DRIFT_LEASE) == settings.replica_id

    worker = drift_worker(DriftEvaluator(db, settings))
    survives_a_full_disk(worker, db, evaluating, caplog)


def test_the_ingestion_flusher_survives_a_foreign_error(
    db: FullDiskDatabase,
    sqlite_database: Database,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = SimDevice("dev-1")
    enroll(db, [device])
    ingestor = Ingestor(db, Keys([device]), make_settings(tmp_path, telemetry_flush_s=STEP_S))
    ingestor.handle(*signed(device, TopicKind.TELEMETRY, telemetry(device, utcnow())))

    def written() -> bool:
        with sqlite_database.session() as session:
            return session.scalars(select(TelemetryBucket.requests)).all() == [100]

    # The batch the failed flush took is kept and written by the next one.
    survives_a_full_disk(ingestor.flusher, db, written, caplog)
    assert ingestor.flushed_messages == 1
