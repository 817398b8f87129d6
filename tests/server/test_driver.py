"""RolloutDriver end to end on a real database, with a simulated fleet answering directives.

Each test starts a rollout through the service, then alternates driver ticks,
simulator steps (devices verify the published directives and write status
reports as ingestion would) and clock moves, and checks what devices received
and where the rollout ended.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from edgefleet.errors import PublishError
from edgefleet.mqtt import DeviceTopics, Directive, parse_device_topic
from edgefleet.server.api.schemas.rollouts import RolloutStatus
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from edgefleet.server.db.models import (
    Alert,
    BundleRow,
    Device,
    Lease,
    RolloutDevice,
    RolloutTransition,
)
from edgefleet.server.directives import DirectiveIssuer
from edgefleet.server.drift.alerts import open_alert
from edgefleet.server.drift.cohorts import stage_cohort
from edgefleet.server.drift.evaluator import DATASET_DRIFT, FEATURE_DRIFT
from edgefleet.server.principals import Principal, Role
from edgefleet.server.rollouts import driver as driver_module
from edgefleet.server.rollouts import latency as latency_module
from edgefleet.server.rollouts import progress, stagetelemetry
from edgefleet.server.rollouts.driver import RolloutDriver
from edgefleet.server.rollouts.latency import latency_lookback, latency_percentile, merge_latency
from edgefleet.server.rollouts.plan import plan_from_dict
from edgefleet.server.rollouts.service import (
    abort_rollout,
    pause_rollout,
    resume_rollout,
    rollout_status,
    start_rollout,
)
from edgefleet.server.rollouts.stagetelemetry import StageTelemetry
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet
from tests.server.rolloutsim import (
    START,
    DeviceSimulator,
    ManualClock,
    RecordingPublisher,
    add_bundle,
    add_device,
    make_settings,
)

OPERATOR = Principal("alice", Role.OPERATOR)
FAST = {"bake_s": 5}  # default gates, a short bake


@dataclass
class Fleet:
    db: Database
    clock: ManualClock
    publisher: RecordingPublisher
    sim: DeviceSimulator
    driver: RolloutDriver

    def start(
        self, plan: dict[str, Any], selector: dict[str, str] | None = None, bundle: str = "demo"
    ) -> int:
        with self.db.session() as session:
            row = session.scalars(select(BundleRow).where(BundleRow.name == bundle)).one()
            rollout = start_rollout(
                session,
                bundle=row,
                selector=selector or {},
                plan=plan_from_dict(plan),
                actor=OPERATOR,
                now=self.clock(),
            )
            return rollout.id

    def run(self, ticks: int = 1, seconds: float = 1.0) -> None:
        for _ in range(ticks):
            self.driver.tick()
            self.sim.step()
            self.clock.advance(seconds)

    def run_until(
        self, rollout_id: int, state: str, limit: int = 200, seconds: float = 1.0
    ) -> None:
        for _ in range(limit):
            if self.state(rollout_id) == state:
                return
            self.run(seconds=seconds)
        raise AssertionError(f"rollout {rollout_id} is {self.state(rollout_id)}, not {state}")

    def state(self, rollout_id: int) -> str:
        return self.status(rollout_id).state

    def status(self, rollout_id: int) -> RolloutStatus:
        with self.db.session() as session:
            return rollout_status(session, rollout_id, self.clock())

    def devices(self, rollout_id: int) -> dict[str, str]:
        with self.db.session() as session:
            rows = session.scalars(
                select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
            )
            return {rd.device_id: rd.state for rd in rows}

    def received(self, device_id: str) -> list[Directive]:
        return self.sim.device(device_id).received

    def model_version(self, device_id: str) -> str | None:
        with self.db.session() as session:
            device = session.get(Device, device_id)
            assert device is not None
            return device.model_version

    def transitions(self, rollout_id: int) -> list[tuple[str, str, str]]:
        with self.db.session() as session:
            rows = session.scalars(
                select(RolloutTransition)
                .where(RolloutTransition.rollout_id == rollout_id)
                .order_by(RolloutTransition.id)
            )
            return [(t.from_state, t.to_state, t.actor) for t in rows]


def make_fleet(
    db: Database,
    tmp_path: Path,
    keyset: KeySet,
    trust: TrustRoot,
    devices: int,
    *,
    replica: str = "replica-a",
    clock: ManualClock | None = None,
    publisher: RecordingPublisher | None = None,
    **settings: Any,
) -> Fleet:
    clock = clock or ManualClock()
    publisher = publisher or RecordingPublisher()
    config = make_settings(tmp_path, replica_id=replica, **settings)
    issuer = DirectiveIssuer([keyset.server], config, clock)
    driver = RolloutDriver(db, issuer, publisher, config, clock)
    fleet = Fleet(db, clock, publisher, DeviceSimulator(db, publisher, trust, clock), driver)
    if devices:
        add_bundle(db, now=clock())
        for i in range(devices):
            add_device(db, f"dev-{i:02d}", now=clock(), tags={"site": "a"})
    return fleet


@pytest.fixture
def fleet3(database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot) -> Fleet:
    return make_fleet(database, tmp_path, keyset, trust, 3)


def test_smallest_plan_completes_with_default_gates(fleet3: Fleet) -> None:
    f = fleet3
    rid = f.start({"stages": [{"percent": 34}, {"percent": 100}], "gates": FAST})
    f.run()
    first = [d for d, s in f.devices(rid).items() if s == "notified"]
    assert len(first) == 2  # ceil(34% of 3)
    f.run()  # the devices answered: succeeded; baking starts
    status = f.status(rid)
    assert status.stages[0].states["succeeded"] == 2 and status.stage_index == 0
    assert status.stages[0].decision == "wait"
    assert any("baking" in r for r in status.stages[0].reasons)
    f.run_until(rid, "completed")
    assert f.devices(rid) == {f"dev-{i:02d}": "succeeded" for i in range(3)}
    for i in range(3):
        (directive,) = f.received(f"dev-{i:02d}")
        assert directive.action == "install" and not directive.shadow
        assert f.model_version(f"dev-{i:02d}") == "2.0.0"
    assert f.transitions(rid) == [
        ("created", "running", "alice"),
        ("running", "running", "driver"),
        ("running", "completed", "driver"),
    ]
    with f.db.session() as session:  # and its lease given up
        assert session.scalars(select(Lease)).all() == []
    # A completed rollout is left alone.
    calls = len(f.publisher.calls)
    f.run(3)
    assert len(f.publisher.calls) == calls


def test_health_gate_failure_aborts_and_rolls_back_the_updated_devices(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 10)
    rid = f.start({"stages": [{"percent": 30}, {"percent": 100}], "gates": {"bake_s": 600}})
    f.run(2)
    updated = sorted(d for d, s in f.devices(rid).items() if s == "succeeded")
    assert len(updated) == 3
    f.sim.telemetry(updated, requests=100, errors=30)  # 30% errors, above 5%
    f.run()
    status = f.status(rid)
    assert status.state == "aborting"
    assert "max_error_rate" in (status.reason or "")
    f.run_until(rid, "aborted")
    for device_id in updated:
        install, rollback = f.received(device_id)
        assert (install.action, rollback.action) == ("install", "rollback")
        assert rollback.sequence > install.sequence
        assert f.model_version(device_id) == "1.0.0"
    untouched = [d for d in f.devices(rid) if d not in updated]
    assert untouched == []  # stage 2 never began
    assert all(f.received(f"dev-{i:02d}") == [] for i in range(10) if f"dev-{i:02d}" not in updated)
    assert set(f.devices(rid).values()) == {"rolled_back"}
    assert [t[1] for t in f.transitions(rid)] == ["running", "aborting", "aborted"]


def test_failed_installs_abort_without_rolling_back_the_failed_devices(fleet3: Fleet) -> None:
    f = fleet3
    for i in range(3):
        f.sim.set_behaviour(f"dev-{i:02d}", "fail")
    rid = f.start({"stages": [{"percent": 100}], "max_retries": 0, "gates": FAST})
    f.run_until(rid, "aborted")
    assert set(f.devices(rid).values()) == {"failed"}
    assert all([d.action for d in f.received(f"dev-{i:02d}")] == ["install"] for i in range(3))
    assert "max_failure_share" in (f.status(rid).reason or "")


def test_gate_failure_pauses_when_the_plan_says_so(fleet3: Fleet) -> None:
    f = fleet3
    f.sim.set_behaviour("dev-00", "fail")
    f.sim.set_behaviour("dev-01", "fail")
    rid = f.start(
        {"stages": [{"percent": 100}], "max_retries": 0, "on_gate_failure": "pause", "gates": FAST}
    )
    f.run_until(rid, "paused")
    assert f.transitions(rid)[-1][:2] == ("running", "paused")
    assert all(len(f.received(f"dev-{i:02d}")) == 1 for i in range(3))


def test_pause_stops_notifying_and_resume_continues(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    rid = f.start({"stages": [{"count": 2}, {"percent": 100}], "gates": {"bake_s": 0}})
    f.driver.tick()  # two directives out
    with database.session() as session:
        pause_rollout(session, rid, OPERATOR, "looking at dashboards", now=f.clock())
    f.sim.step()  # the two devices install anyway
    f.run(5)
    status = f.status(rid)
    assert status.state == "paused" and status.reason == "looking at dashboards"
    assert status.stages[0].states["succeeded"] == 2  # reconciled while paused
    assert status.stage_index == 0 and status.stages[1].assigned == 0
    assert sum(len(f.received(f"dev-{i:02d}")) for i in range(4)) == 2
    with database.session() as session:
        resume_rollout(session, rid, OPERATOR, now=f.clock())
    f.run_until(rid, "completed")
    assert all(f.model_version(f"dev-{i:02d}") == "2.0.0" for i in range(4))
    assert [t[1] for t in f.transitions(rid)] == [
        "running",
        "paused",
        "running",
        "running",
        "completed",
    ]


def test_operator_abort_rolls_back_what_was_installed(fleet3: Fleet) -> None:
    f = fleet3
    rid = f.start({"stages": [{"percent": 34}, {"percent": 100}], "gates": {"bake_s": 600}})
    f.run(2)
    with f.db.session() as session:
        abort_rollout(session, rid, OPERATOR, "wrong model", now=f.clock())
    f.run_until(rid, "aborted")
    rolled = [d for d, s in f.devices(rid).items() if s == "rolled_back"]
    assert len(rolled) == 2
    assert all(f.model_version(d) == "1.0.0" for d in rolled)
    assert f.status(rid).reason == "wrong model"


def test_timeouts_are_retried_up_to_max_retries(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    f.sim.set_behaviour("dev-00", "silent")
    f.sim.set_behaviour("dev-01", "fail")
    plan = {
        "stages": [{"percent": 100}],
        "device_timeout_s": 60,
        "max_retries": 1,
        # Long enough a bake that the stage waits for dev-00's last timeout.
        "gates": {"bake_s": 150, "min_success_share": 0.75, "max_failure_share": 0.25},
    }
    rid = f.start(plan)
    f.run(1)
    f.sim.set_behaviour("dev-01", "ok")  # the retry works for this one
    f.run(3)
    # Back to pending, but a device gets at most one directive a minute (the rate limit
    # is counted from the stored notification times).
    assert f.devices(rid)["dev-01"] == "pending"
    assert [d.sequence for d in f.received("dev-01")] == [1]
    assert f.devices(rid)["dev-00"] == "notified"
    f.run(8, seconds=10)  # the first timeout: retried once; dev-01's retry goes out too
    assert f.devices(rid)["dev-01"] == "succeeded"
    assert [d.sequence for d in f.received("dev-01")] == [1, 2]
    f.run(7, seconds=10)  # the second: no retries left
    assert f.devices(rid)["dev-00"] == "timed_out"
    assert [d.sequence for d in f.received("dev-00")] == [1, 2]
    with database.session() as session:
        rd = session.get(RolloutDevice, (rid, "dev-00"))
        assert rd is not None and rd.attempts == 2 and "no final answer" in (rd.reason or "")
    assert f.state(rid) == "running"  # baking since the last device finished
    f.run(20, seconds=10)
    assert f.state(rid) == "completed"
    assert [d.sequence for d in f.received("dev-00")] == [1, 2]


def test_late_joiners_join_the_current_stage(fleet3: Fleet) -> None:
    f = fleet3
    rid = f.start({"stages": [{"percent": 100}], "gates": {"bake_s": 30}}, {"site": "a"})
    f.run(2)
    f.clock.advance(1)
    add_device(f.db, "late-match", now=f.clock(), tags={"site": "a"})
    add_device(f.db, "late-other", now=f.clock(), tags={"site": "b"})
    f.run(2)
    devices = f.devices(rid)
    assert devices["late-match"] == "succeeded" and "late-other" not in devices
    assert f.received("late-other") == []
    f.run_until(rid, "completed", seconds=5)


def test_devices_in_another_active_rollout_are_skipped_and_join_when_it_ends(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    add_bundle(database, name="other", version="1.0.0", now=f.clock())
    stages = [{"count": 1}, {"percent": 100, "gates": {"bake_s": 600}}]
    first = f.start({"stages": stages, "gates": FAST}, {"site": "a"})
    (canary,) = f.devices(first)
    rest = sorted(f"dev-{i:02d}" for i in range(4) if f"dev-{i:02d}" != canary)
    # Before the first rollout reaches them, a second one takes a device of its later
    # stage and a device enrolled meanwhile (a late joiner of both).
    taken = rest[0]
    with database.session() as session:
        device = session.get(Device, taken)
        assert device is not None
        device.tags = {"site": "a", "group": "b"}
    f.clock.advance(1)
    add_device(database, "late", now=f.clock(), tags={"site": "a", "group": "b"})
    second = f.start(
        {"stages": [{"percent": 100}], "gates": {"bake_s": 30}}, {"group": "b"}, "other"
    )
    f.run(6, seconds=2)  # the canary passes; the first rollout's second stage begins
    devices = f.devices(first)
    assert devices[taken] == "skipped" and devices["late"] == "skipped"
    assert [devices[d] for d in rest[1:]] == ["succeeded", "succeeded"]
    with database.session() as session:
        rd = session.get(RolloutDevice, (first, taken))
        assert rd is not None
        assert rd.reason == f"in active rollout {second}; joins when that one ends"
    status = f.status(first)
    assert status.stage_index == 1
    # Left out, and not counted by the gates: the late joiner in the stage it came in.
    assert (status.stages[0].assigned, status.stages[0].states["skipped"]) == (1, 1)
    assert (status.stages[1].assigned, status.stages[1].states["skipped"]) == (2, 1)
    assert status.devices["skipped"] == 2
    assert [d.bundle.name for d in f.received(taken) if d.bundle] == ["other"]
    f.run_until(second, "completed", seconds=10)
    f.run(2)  # now they join the first rollout's current stage
    devices = f.devices(first)
    assert devices[taken] == "succeeded" and devices["late"] == "succeeded"
    assert [d.bundle.name for d in f.received(taken) if d.bundle] == ["other", "demo"]
    f.run_until(first, "completed", seconds=60)
    assert f.status(first).stages[1].assigned == 4


def test_offline_devices_wait_and_are_notified_when_back(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 3, directive_ttl=dt.timedelta(seconds=30))
    f.sim.set_online("dev-00", False)
    rid = f.start({"stages": [{"percent": 100}], "gates": {"bake_s": 0}})
    f.run(3)
    status = f.status(rid)
    assert f.devices(rid)["dev-00"] == "pending" and f.received("dev-00") == []
    assert "1 offline" in " ".join(status.stages[0].reasons)
    f.sim.set_online("dev-00", True)
    f.run(2)
    assert f.devices(rid)["dev-00"] == "succeeded"
    assert status.state == "running"
    f.run_until(rid, "completed")


def test_a_device_never_connected_is_notified_when_it_first_connects(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    """Enrolled, never connected: no session on the broker, so a directive would go
    nowhere; the gate counts it offline, and it is sent nothing until it connects."""
    f = make_fleet(database, tmp_path, keyset, trust, 2)
    add_device(database, "fresh", now=f.clock(), tags={"site": "a"}, online=False, seen=False)
    rid = f.start({"stages": [{"percent": 100}], "gates": {"bake_s": 0}})
    f.run(3)
    assert f.devices(rid)["fresh"] == "pending" and f.received("fresh") == []
    assert not any(call.topic == DeviceTopics("fresh").directive for call in f.publisher.calls)
    assert "1 offline" in " ".join(f.status(rid).stages[0].reasons)
    f.sim.set_online("fresh", True)  # its first connection
    f.run(2)
    assert f.devices(rid)["fresh"] == "succeeded"
    f.run_until(rid, "completed")


def test_device_offline_after_notification_gets_a_fresh_directive(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 2, directive_ttl=dt.timedelta(seconds=30))
    rid = f.start({"stages": [{"percent": 100}], "gates": {"bake_s": 0}})
    f.driver.tick()
    f.sim.set_online("dev-00", False)  # before its directive arrived; the broker keeps it
    f.sim.set_online("dev-01", False, lose_session=True)  # and here the session is gone
    f.run(6, seconds=10)  # longer than the directive TTL
    assert f.devices(rid) == {"dev-00": "notified", "dev-01": "notified"}
    f.sim.set_online("dev-00", True)
    f.sim.set_online("dev-01", True)
    f.run_until(rid, "completed")
    # dev-00 refused the expired directive it was holding and took the new one.
    assert f.sim.device("dev-00").refused == ["DirectiveExpiredError"]
    assert [d.sequence for d in f.received("dev-00")] == [2]
    assert [d.sequence for d in f.received("dev-01")] == [2]


def test_rate_limit_per_minute(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 8)
    for i in range(8):
        f.sim.set_behaviour(f"dev-{i:02d}", "silent")
    rid = f.start({"stages": [{"percent": 100}], "rate_limit_per_minute": 3})

    def notified() -> int:
        return sum(1 for s in f.devices(rid).values() if s == "notified")

    f.run(1, seconds=30)
    assert notified() == 3
    f.run(1, seconds=29)  # 30 s later: the same minute
    assert notified() == 3
    f.run(1, seconds=2)  # 59 s: still within it
    assert notified() == 3
    f.run(1)  # 61 s after the first three
    assert notified() == 6
    f.run(1, seconds=60)
    f.run(1)
    assert notified() == 8
    assert len(f.publisher.calls) == 8


def test_renotifications_share_the_rate_limit(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    for i in range(4):
        f.sim.set_behaviour(f"dev-{i:02d}", "silent")
    rid = f.start({"stages": [{"percent": 100}], "rate_limit_per_minute": 2})
    f.run(1)
    notified = sorted(d for d, s in f.devices(rid).items() if s == "notified")
    waiting = sorted(d for d, s in f.devices(rid).items() if s == "pending")
    assert len(notified) == 2 and len(f.publisher.calls) == 2
    for device_id in notified:  # offline before answering: to be notified again when back
        f.sim.set_online(device_id, False)
    f.run(1)
    for device_id in notified:
        f.sim.set_online(device_id, True)
    f.run(1, seconds=30)  # back within the minute: the limit holds them
    f.run(1, seconds=28)  # 59 s after the first two
    assert len(f.publisher.calls) == 2
    f.run(1)  # 60 s: room for two more, taken by the re-notifications first
    assert len(f.publisher.calls) == 4
    assert all(len(f.received(d)) == 2 for d in notified)
    assert [f.devices(rid)[d] for d in waiting] == ["pending", "pending"]
    f.run(1, seconds=59)
    assert len(f.publisher.calls) == 4
    f.run(1)
    assert len(f.publisher.calls) == 6
    assert all(len(f.received(d)) == 1 for d in waiting)


def test_shadow_stage_then_real_install(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    plan = {"stages": [{"percent": 50, "shadow": True}, {"percent": 100}], "gates": FAST}
    rid = f.start(plan)
    f.run(2)
    shadow = sorted(d for d, s in f.devices(rid).items() if s == "succeeded")
    assert len(shadow) == 2
    assert all(f.model_version(d) == "1.0.0" for d in shadow)  # still serving the old one
    f.sim.telemetry(shadow, version="1.0.0", requests=50, shadow=(50, 49))
    f.run(2)
    status = f.status(rid)
    checks = {c.name: c.passed for c in status.stages[0].checks}
    assert checks["min_shadow_agreement"] is True
    f.run_until(rid, "completed")
    for device_id in shadow:
        first, second = f.received(device_id)
        assert first.shadow and not second.shadow
    assert all(f.model_version(f"dev-{i:02d}") == "2.0.0" for i in range(4))


def test_shadow_disagreement_aborts_stops_the_shadow_and_keeps_what_devices_serve(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    plan = {"stages": [{"percent": 50, "shadow": True}, {"percent": 100}], "gates": FAST}
    rid = f.start(plan)
    f.run(2)
    shadow = sorted(d for d, s in f.devices(rid).items() if s == "succeeded")
    f.sim.telemetry(shadow, version="1.0.0", requests=50, shadow=(50, 20))
    f.run_until(rid, "aborted")
    assert "min_shadow_agreement" in (f.status(rid).reason or "")
    for device_id in shadow:
        install, rollback = f.received(device_id)
        assert install.action == "install" and install.shadow
        # The rollback names the bundle: the device keeps 1.0.0 and stops the shadow copy.
        assert rollback.action == "rollback"
        assert rollback.bundle is not None and install.bundle is not None
        assert rollback.bundle.version == install.bundle.version
        assert f.model_version(device_id) == "1.0.0"


def test_two_drivers_each_rollout_driven_by_exactly_one(
    postgres_url: str, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    db_a = open_database(postgres_url)
    db_b = open_database(postgres_url)
    try:
        clock = ManualClock()
        publisher = RecordingPublisher()
        a = make_fleet(db_a, tmp_path, keyset, trust, 0, clock=clock, publisher=publisher)
        b = make_fleet(
            db_b,
            tmp_path,
            keyset,
            trust,
            0,
            replica="replica-b",
            clock=clock,
            publisher=publisher,
        )
        rollouts = []
        for n in range(4):
            add_bundle(db_a, name=f"model{n}", now=clock())
            for i in range(3):
                add_device(db_a, f"m{n}-dev{i}", now=clock(), tags={"line": str(n)})
            plan = {"stages": [{"percent": 100}], "gates": {"bake_s": 3600}}
            rollouts.append(a.start(plan, {"line": str(n)}, bundle=f"model{n}"))
        reports: dict[str, list[Any]] = {"a": [], "b": []}
        barrier = threading.Barrier(2)

        def drive(name: str, driver: RolloutDriver) -> None:
            for _ in range(5):
                barrier.wait()
                reports[name].append(driver.tick())

        threads = [
            threading.Thread(target=drive, args=("a", a.driver)),
            threading.Thread(target=drive, args=("b", b.driver)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        driven_a = {r for rep in reports["a"] for r in rep.driven}
        driven_b = {r for rep in reports["b"] for r in rep.driven}
        assert driven_a | driven_b == set(rollouts)
        assert not driven_a & driven_b
        # Every device got exactly one directive, whichever replica sent it.
        topics = [c.topic for c in publisher.calls]
        assert len(topics) == 12 and len(set(topics)) == 12
        with db_a.session() as session:
            owners = {lease.name: lease.owner for lease in session.scalars(select(Lease))}
        assert owners == {
            f"rollout:{r}": ("replica-a" if r in driven_a else "replica-b") for r in rollouts
        }
        # replica-a stops; after its leases expire, replica-b drives its rollouts too.
        clock.advance(16)
        report = b.driver.tick()
        assert set(report.driven) == set(rollouts) and not report.skipped
    finally:
        db_a.dispose()
        db_b.dispose()


def _installed_at_p95_50_ms(f: Fleet) -> tuple[int, dict[str, Any]]:
    """Start a rollout of two stages, install its first, and report the new version there
    at a p95 of 50 ms: the rollout, and its first stage's checks by name."""
    rid = f.start({"stages": [{"percent": 50}, {"percent": 100}], "gates": {"bake_s": 600}})
    f.run(2)
    updated = sorted(d for d, s in f.devices(rid).items() if s == "succeeded")
    f.sim.telemetry(updated, latency_counts=[0, 0, 10, 90, 0, 0])
    with f.db.session() as session:
        checks = {c.name: c for c in rollout_status(session, rid, f.clock()).stages[0].checks}
    return rid, checks


def test_latency_gate_compares_with_the_previous_version(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    before = START - dt.timedelta(hours=1)
    ids = [f"dev-{i:02d}" for i in range(4)]
    f.sim.telemetry(ids, version="1.0.0", latency_counts=[90, 10, 0, 0, 0, 0], at=before)
    rid, checks = _installed_at_p95_50_ms(f)
    assert checks["max_latency_p95_ratio"].passed is False
    assert "p95 50 ms vs 10 ms" in checks["max_latency_p95_ratio"].detail
    assert checks["max_error_rate"].passed is True
    f.run()
    assert f.state(rid) == "aborting"
    assert "max_latency_p95_ratio" in (f.status(rid).reason or "")


def test_the_latency_gate_reads_the_newest_buckets_only(
    database: Database,
    tmp_path: Path,
    keyset: KeySet,
    trust: TrustRoot,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # About 8 device-buckets: a stage of 2 devices reads 20 minutes back.
    monkeypatch.setattr(latency_module, "LATENCY_SAMPLE_BUCKETS", 8)
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    ids = [f"dev-{i:02d}" for i in range(4)]
    slow, fast = [0, 0, 0, 0, 1000, 0], [90, 10, 0, 0, 0, 0]
    f.sim.telemetry(ids, version="1.0.0", latency_counts=slow, at=START - dt.timedelta(hours=3))
    f.sim.telemetry(ids, version="1.0.0", latency_counts=fast, at=START - dt.timedelta(minutes=10))
    _, checks = _installed_at_p95_50_ms(f)
    # Read 3 hours back, the slow buckets would make the previous p95 100 ms and pass 50 ms.
    assert "p95 50 ms vs 10 ms before, each over 20 min" in checks["max_latency_p95_ratio"].detail
    assert checks["max_latency_p95_ratio"].passed is False


def test_the_latency_lookback_reads_about_the_same_number_of_buckets_at_any_size() -> None:
    bucket = dt.timedelta(minutes=5)
    assert latency_lookback(1, bucket) == dt.timedelta(hours=24)  # at most a day
    assert latency_lookback(10, bucket) == dt.timedelta(hours=24)
    assert latency_lookback(100, bucket) == dt.timedelta(minutes=500)
    assert latency_lookback(1_000, bucket) == dt.timedelta(minutes=50)
    assert latency_lookback(10_000, bucket) == dt.timedelta(minutes=10)  # at least two buckets
    assert latency_lookback(0, bucket) == dt.timedelta(hours=24)


def test_a_large_stage_is_judged_on_its_telemetry_kept_a_few_seconds(
    database: Database,
    tmp_path: Path,
    keyset: KeySet,
    trust: TrustRoot,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Read as a large stage's: a second kept per row (2 devices, 2 spans each: 4 s).
    monkeypatch.setattr(stagetelemetry, "ROWS_PER_SECOND", 1)
    reads = [0]
    read = stagetelemetry.read_stage_telemetry

    def reading(*args: Any, **kwargs: Any) -> StageTelemetry:
        reads[0] += 1
        return read(*args, **kwargs)

    monkeypatch.setattr(progress, "read_stage_telemetry", reading)
    f = make_fleet(database, tmp_path, keyset, trust, 2)
    rid = f.start({"stages": [{"percent": 100}], "gates": {"bake_s": 600}})
    f.run()
    assert reads == [1]
    f.run(3)  # within 4 s of the reading: judged on it, the devices' states afresh
    assert reads == [1]
    assert f.devices(rid) == {"dev-00": "succeeded", "dev-01": "succeeded"}
    with f.db.session() as session:  # the routes share the driver's readings (at its last tick)
        last_tick = f.clock() - dt.timedelta(seconds=1)
        kept = rollout_status(session, rid, last_tick, telemetry=f.driver.stage_telemetry)
    fresh = f.status(rid)  # without the driver's readings: read afresh
    assert reads == [2]
    assert kept.stages[0].telemetry_age_s == 3.0 and fresh.stages[0].telemetry_age_s == 0
    assert kept.stages[0].states == fresh.stages[0].states
    f.run()  # 4 s on: read afresh
    assert reads == [3]
    monkeypatch.setattr(stagetelemetry, "ROWS_PER_SECOND", 4_000)  # a small stage
    f.clock.advance(60)
    f.run()
    f.driver.tick()
    assert reads == [5]  # not kept: read at every judgement
    assert f.state(rid) == "running"


class FlakyPublisher(RecordingPublisher):
    """Takes `budget` messages, then raises as a link whose broker went away."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        if self.budget <= 0:
            raise PublishError(f"cannot publish to {topic}: not connected to the broker")
        self.budget -= 1
        super().publish(topic, payload, qos=qos, retain=retain)


def test_directives_the_broker_refused_are_sent_again_next_tick(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    publisher = FlakyPublisher(budget=1)
    f = make_fleet(database, tmp_path, keyset, trust, 3, publisher=publisher)
    rid = f.start({"stages": [{"percent": 100}], "gates": FAST})
    report = f.driver.tick()
    assert report.published == 1
    states = f.devices(rid)
    assert sorted(states.values()) == ["notified", "pending", "pending"]
    with database.session() as session:
        for rd in session.scalars(select(RolloutDevice).where(RolloutDevice.state == "pending")):
            assert rd.attempts == 0 and "not published" in (rd.reason or "")
    publisher.budget = 10
    f.sim.step()
    f.run_until(rid, "completed")
    assert len(publisher.calls) == 3


class RefusingPublisher(RecordingPublisher):
    """Raises `PublishError` for the devices in `refused`, as the server's link does for a
    message the broker did not take; takes the others."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        device_id, _ = parse_device_topic(topic)
        if device_id in self.refused:
            raise PublishError(f"the MQTT client refused a message to {topic}: queue full")
        super().publish(topic, payload, qos=qos, retain=retain)


def test_an_install_the_broker_did_not_take_is_undone_and_sent_within_the_rate_limit(
    database: Database,
    tmp_path: Path,
    keyset: KeySet,
    trust: TrustRoot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = RefusingPublisher()
    f = make_fleet(database, tmp_path, keyset, trust, 3, publisher=publisher)
    rid = f.start({"stages": [{"percent": 100}], "rate_limit_per_minute": 2, "gates": FAST})
    publisher.refused = {"dev-00"}
    with caplog.at_level("WARNING", logger="edgefleet.server.rollouts"):
        report = f.driver.tick()
    # dev-00 is not left notified; dev-01 after it was still published.
    assert report.published == 1
    assert f.devices(rid) == {"dev-00": "pending", "dev-01": "notified", "dev-02": "pending"}
    with database.session() as session:
        refused = session.get(RolloutDevice, (rid, "dev-00"))
        assert refused is not None
        assert (refused.attempts, refused.notified_at) == (0, None)
        assert "not published" in (refused.reason or "")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "1 of 2 directive(s) not published" in warnings[0]

    publisher.refused = set()
    f.clock.advance(1)  # within the minute: dev-01's directive still counts, dev-00's does not
    assert f.driver.tick().published == 1
    assert f.devices(rid) == {"dev-00": "notified", "dev-01": "notified", "dev-02": "pending"}
    assert len(publisher.to_device("dev-00")) == 1
    assert publisher.to_device("dev-02") == []
    f.sim.step()
    f.run_until(rid, "completed", seconds=20)
    assert [len(f.received(d)) for d in ("dev-00", "dev-01", "dev-02")] == [1, 1, 1]


def test_a_rollback_the_broker_did_not_take_is_sent_next_tick(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    publisher = RefusingPublisher()
    f = make_fleet(database, tmp_path, keyset, trust, 3, publisher=publisher)
    rid = f.start({"stages": [{"percent": 100}], "gates": {"bake_s": 600}})
    f.run(3)
    assert set(f.devices(rid).values()) == {"succeeded"}
    with f.db.session() as session:
        abort_rollout(session, rid, OPERATOR, now=f.clock())
    publisher.refused = {"dev-01"}
    assert f.driver.tick().published == 2
    assert f.devices(rid) == {
        "dev-00": "rolling_back",
        "dev-01": "installing",
        "dev-02": "rolling_back",
    }
    assert f.state(rid) == "aborting"
    publisher.refused = set()
    f.run_until(rid, "aborted")
    assert [d.action for d in f.received("dev-01")] == ["install", "rollback"]
    assert set(f.devices(rid).values()) == {"rolled_back"}


def test_latency_percentile_and_merge() -> None:
    bounds = [5.0, 10.0, 20.0]
    assert latency_percentile(None, 0.95) is None
    assert latency_percentile((bounds, [0, 0, 0, 0]), 0.95) is None
    assert latency_percentile((bounds, [95, 5, 0, 0]), 0.95) == 5.0
    assert latency_percentile((bounds, [94, 5, 1, 0]), 0.95) == 10.0
    assert latency_percentile((bounds, [0, 0, 0, 7]), 0.95) == 20.0  # overflow: highest bound
    merged = merge_latency(
        [
            {"bounds_ms": bounds, "counts": [1, 2, 3, 4]},
            {"bounds_ms": [5, 10, 20], "counts": [1, 1, 1, 1]},  # the same bounds, as integers
            {"bounds_ms": [1.0], "counts": [3, 3]},  # another agent's bounds: fewer requests
            {"bounds_ms": bounds, "counts": [1]},  # malformed: skipped
            None,
        ]
    )
    assert merged is not None and merged == (bounds, [2, 3, 4, 5])
    assert all(isinstance(bound, float) for bound in merged[0])
    assert merge_latency([]) is None


def test_abort_rolls_back_a_device_that_finished_after_it_timed_out(fleet3: Fleet) -> None:
    f = fleet3
    f.sim.set_behaviour("dev-00", "silent")
    plan = {
        "stages": [{"percent": 100}],
        "device_timeout_s": 30,
        "max_retries": 0,
        "gates": {"bake_s": 600, "max_failure_share": 0.5, "min_success_share": 0.5},
    }
    rid = f.start(plan)
    f.run(4, seconds=10)
    assert f.devices(rid)["dev-00"] == "timed_out"
    with f.db.session() as session:  # its heartbeat: it did install, late
        device = session.get(Device, "dev-00")
        assert device is not None
        device.model_version, device.previous_version = "2.0.0", "1.0.0"
        abort_rollout(session, rid, OPERATOR, "too slow", now=f.clock())
    f.sim.set_behaviour("dev-00", "ok")
    f.run_until(rid, "aborted")
    assert [d.action for d in f.received("dev-00")] == ["install", "rollback"]
    assert set(f.devices(rid).values()) == {"rolled_back"}
    assert f.model_version("dev-00") == "1.0.0"


def test_directives_per_tick_are_capped_for_installs_and_rollbacks(
    database: Database,
    tmp_path: Path,
    keyset: KeySet,
    trust: TrustRoot,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(driver_module, "MAX_DIRECTIVES_PER_TICK", 2)
    f = make_fleet(database, tmp_path, keyset, trust, 5)
    rid = f.start({"stages": [{"percent": 100}], "gates": {"bake_s": 600}})
    assert [f.driver.tick().published for _ in range(4)] == [2, 2, 1, 0]
    f.sim.step()
    f.run()
    with database.session() as session:
        abort_rollout(session, rid, OPERATOR, now=f.clock())
    assert [f.driver.tick().published for _ in range(3)] == [2, 2, 1]
    assert f.state(rid) == "aborting"
    f.sim.step()
    f.run_until(rid, "aborted")


def _open_drift_alert(
    db: Database,
    now: dt.datetime,
    *,
    device: str | None,
    version: str = "2.0.0",
    feature: str | None = "temperature",
    cohort: str | None = None,
) -> None:
    with db.session() as session:
        open_alert(
            session,
            Alert(
                kind=FEATURE_DRIFT if feature else DATASET_DRIFT,
                scope="cohort" if device is None else "device",
                device_id=device,
                cohort=cohort,
                bundle_name="demo",
                bundle_version=version,
                feature=feature,
                opened_at=now,
                evidence={},
            ),
        )


def _checks(f: Fleet, rollout_id: int) -> dict[str, Any]:
    with f.db.session() as session:
        stage = rollout_status(session, rollout_id, f.clock()).stages[0]
        return {c.name: c for c in stage.checks}


DRIFT_PLAN = {
    "stages": [{"count": 2}, {"percent": 100}],
    "on_gate_failure": "pause",
    "gates": {"max_drift": 0.0, "bake_s": 5},
}


@pytest.mark.parametrize("whose", ["device", "stage cohort"])
def test_drift_gate_pauses_a_rollout_whose_canaries_drift(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot, whose: str
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    rid = f.start({**DRIFT_PLAN, "gates": {"max_drift": 0.0, "bake_s": 600}})
    f.run(2)
    canaries = sorted(d for d, s in f.devices(rid).items() if s == "succeeded")
    assert len(canaries) == 2
    f.sim.telemetry(canaries)
    assert _checks(f, rid)["max_drift"].passed is True
    if whose == "device":
        _open_drift_alert(database, f.clock(), device=canaries[0])
    else:
        _open_drift_alert(database, f.clock(), device=None, cohort=stage_cohort(rid, 0))
    f.run()
    status = f.status(rid)
    assert status.state == "paused"
    assert "max_drift" in (status.reason or "") and "temperature" in (status.reason or "")
    assert [t[1] for t in f.transitions(rid)] == ["running", "paused"]
    assert all(f.received(d) == [] for d in f.devices(rid) if d not in canaries)


def test_drift_of_another_version_or_another_device_does_not_hold_the_stage(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    rid = f.start(DRIFT_PLAN)
    f.run(2)
    canaries = sorted(d for d, s in f.devices(rid).items() if s == "succeeded")
    others = sorted({f"dev-{i:02d}" for i in range(4)} - set(canaries))  # still on 1.0.0
    f.sim.telemetry(canaries)
    # The previous version drifting on a canary, and a device outside the stage drifting.
    _open_drift_alert(database, f.clock(), device=canaries[0], version="1.0.0")
    _open_drift_alert(database, f.clock(), device=others[0], version="1.0.0")
    _open_drift_alert(database, f.clock(), device=None, cohort="version", version="1.0.0")
    check = _checks(f, rid)["max_drift"]
    assert check.passed is True and check.detail == "0 of 2 devices drift; at most 0"
    f.run_until(rid, "completed")
    assert [t[1] for t in f.transitions(rid)] == ["running", "running", "completed"]


def test_accuracy_gate_fails_against_the_reference_once_enough_labels_came(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    report = {"chosen": "int8", "candidates": [{"name": "int8", "metrics": {"accuracy": 95.0}}]}
    with database.session() as session:
        bundle = session.scalars(select(BundleRow).where(BundleRow.version == "2.0.0")).one()
        bundle.report = report
    rid = f.start(
        {
            "stages": [{"count": 2}, {"percent": 100}],
            "on_gate_failure": "pause",
            "gates": {"max_accuracy_drop": 0.05, "min_labels": 50, "bake_s": 600},
        }
    )
    f.run(2)
    canaries = sorted(d for d, s in f.devices(rid).items() if s == "succeeded")
    f.sim.telemetry(canaries, labelled=(20, 12))  # 40 labels, 60% right
    f.run()
    check = _checks(f, rid)["max_accuracy_drop"]
    assert (check.passed, check.detail) == (None, "not judged: 40 of 50 labels needed")
    assert f.state(rid) == "running"
    f.sim.telemetry(canaries, labelled=(10, 6))  # 60 labels, 60% right
    f.run()
    status = f.status(rid)
    assert status.state == "paused"
    assert (
        "max_accuracy_drop: 36 of 60 labels right (60.0%) vs 95.0% from the converter's reference"
        in (status.reason or "")
    )


def test_accuracy_gate_without_a_reference_compares_with_the_previous_version(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    rid = f.start(
        {
            "stages": [{"count": 2}, {"percent": 100}],
            "on_gate_failure": "pause",
            "gates": {"max_accuracy_drop": 0.05, "bake_s": 7200},
        }
    )
    f.run(2)
    canaries = sorted(d for d, s in f.devices(rid).items() if s == "succeeded")
    others = sorted({f"dev-{i:02d}" for i in range(4)} - set(canaries))
    before = START - dt.timedelta(minutes=30)
    f.sim.telemetry(canaries, version="1.0.0", labelled=(50, 48), at=before)
    f.sim.telemetry(others, version="1.0.0", labelled=(50, 10), at=before)  # not the stage's
    f.sim.telemetry(canaries, labelled=(30, 21))  # 60 labels, 70% right
    check = _checks(f, rid)["max_accuracy_drop"]
    # The stage ran seconds: the previous version's labels of 30 minutes before are too old.
    assert check.passed is None
    assert check.detail == (
        "not judged: no reference accuracy, and 0 of 50 labels of the previous version"
    )
    f.clock.advance(3600)
    f.run()
    reason = f.status(rid).reason or ""
    assert f.state(rid) == "paused"
    assert "60 labels right (70.0%) vs 96.0% from the previous version before the stage" in reason


def test_a_tick_takes_directive_sequences_in_device_id_order(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    # A sequence locks its device's row until commit; ingestion locks devices in id
    # order, so the driver must too (PostgreSQL would otherwise find deadlocks).
    f = make_fleet(database, tmp_path, keyset, trust, 4)
    for i in range(4):
        f.sim.set_behaviour(f"dev-{i:02d}", "silent")
    for device_id in ("dev-00", "dev-01"):
        f.sim.set_online(device_id, False)  # pending until they are back
    rid = f.start({"stages": [{"percent": 100}]})
    f.run(1)
    assert sorted(d for d, s in f.devices(rid).items() if s == "notified") == ["dev-02", "dev-03"]
    for device_id in ("dev-02", "dev-03"):
        f.sim.set_online(device_id, False)  # before answering: notified again when back
    f.run(1)
    for i in range(4):
        f.sim.set_online(f"dev-{i:02d}", True)
    f.publisher.calls.clear()
    f.run(1, seconds=60)  # out of the rate window
    f.run(1)  # re-notifies dev-02 and dev-03, notifies dev-00 and dev-01
    topics = [call.topic for call in f.publisher.calls]
    assert topics == [DeviceTopics(f"dev-{i:02d}").directive for i in range(4)]
