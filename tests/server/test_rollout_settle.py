"""Rollouts settle from what devices restate, and unanswered directives are sent again.

Real ingestion (`Ingestor` with its `BatchWriter`) and the real rollout driver
on SQLite and PostgreSQL; the devices are played by the test, which verifies
each directive as an agent would and answers with signed messages through
ingestion. A report or a directive is "lost" by never handing it on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from edgefleet.errors import ReplayedDirectiveError
from edgefleet.mqtt import Directive, verify_directive
from edgefleet.mqtt.devicesig import sign_device_payload
from edgefleet.mqtt.messages import (
    DirectiveAnswer,
    Heartbeat,
    Presence,
    StatusReport,
    encode_message,
)
from edgefleet.mqtt.topics import DeviceTopics, TopicKind
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow, Device, RolloutDevice
from edgefleet.server.directives import DirectiveIssuer
from edgefleet.server.mqtt.ingest import Ingestor
from edgefleet.server.principals import Principal, Role
from edgefleet.server.rollouts.driver import RolloutDriver
from edgefleet.server.rollouts.plan import plan_from_dict
from edgefleet.server.rollouts.progress import state_counts
from edgefleet.server.rollouts.resend import Returns
from edgefleet.server.rollouts.service import abort_rollout, rollout_status, start_rollout
from edgefleet.timefmt import format_time
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet
from tests.server.fleet import SimDevice
from tests.server.rolloutsim import (
    ManualClock,
    RecordingPublisher,
    add_bundle,
    add_device,
    make_settings,
)

OPERATOR = Principal("alice", Role.OPERATOR)
PLAN = {"stages": [{"percent": 100}], "gates": {"bake_s": 5}}


@dataclass
class Loop:
    """One device, ingestion and the driver on one database, with a clock that moves when told."""

    db: Database
    clock: ManualClock
    publisher: RecordingPublisher
    ingestor: Ingestor
    driver: RolloutDriver
    trust: TrustRoot
    device: SimDevice
    link_connects: list[int] = field(default_factory=lambda: [0])
    status_sequence: int = 0
    accepted: int = 0  # the highest directive sequence the device accepted

    def start(self, plan: dict[str, Any] = PLAN) -> int:
        with self.db.session() as session:
            bundle = session.scalars(select(BundleRow)).one()
            rollout = start_rollout(
                session,
                bundle=bundle,
                selector={},
                plan=plan_from_dict(plan),
                actor=OPERATOR,
                now=self.clock(),
            )
            return rollout.id

    def tick(self, seconds: float = 1.0) -> None:
        self.driver.tick()
        self.clock.advance(seconds)

    def directives(self) -> list[bytes]:
        topic = DeviceTopics(self.device.id).directive
        return [call.payload for call in self.publisher.calls if call.topic == topic]

    def accept(self, payload: bytes) -> Directive:
        """Verify `payload` as the agent does (a sequence it accepted before is refused)."""
        directive = verify_directive(
            payload,
            self.trust,
            device_id=self.device.id,
            last_sequence=self.accepted,
            now=self.clock(),
        )
        self.accepted = directive.sequence
        return directive

    def send(self, kind: TopicKind, payload: bytes) -> None:
        topic = DeviceTopics(self.device.id).topic(kind)
        if kind is not TopicKind.PRESENCE:
            payload = sign_device_payload(topic, payload, self.device.key)
        self.ingestor.handle(topic, payload)
        self.ingestor.flush()

    def heartbeat(
        self, version: str, state: str = "committed", answered: DirectiveAnswer | None = None
    ) -> None:
        message = Heartbeat(
            device_id=self.device.id,
            sent_at=format_time(self.clock()),
            uptime_s=5,
            cpu_percent=3.0,
            memory_used_bytes=1,
            memory_total_bytes=2,
            disk_free_bytes=1,
            disk_total_bytes=2,
            agent_version="0.2.0",
            model_name="demo",
            model_version=version,
            install_state=state,
            answered=answered,
        )
        self.send(TopicKind.HEARTBEAT, encode_message(message))

    def status(self, directive: Directive, state: str, version: str) -> None:
        self.status_sequence += 1
        message = StatusReport(
            device_id=self.device.id,
            sent_at=format_time(self.clock()),
            sequence=self.status_sequence,
            install_state=state,
            bundle_name="demo",
            bundle_version=version,
            directive_sequence=directive.sequence,
        )
        self.send(TopicKind.STATUS, encode_message(message))

    def presence(self, presence: Presence) -> None:
        self.send(TopicKind.PRESENCE, presence.payload)

    def membership(self, rollout_id: int) -> RolloutDevice:
        with self.db.session() as session:
            rd = session.get(RolloutDevice, (rollout_id, self.device.id))
            assert rd is not None
            session.expunge(rd)
            return rd

    def state(self, rollout_id: int) -> str:
        with self.db.session() as session:
            return rollout_status(session, rollout_id, self.clock()).state


class Keys:
    def __init__(self, device: SimDevice) -> None:
        self.device = device

    def public_key(self, device_id: str, *, fresh: bool = False) -> str | None:
        return self.device.public_key if device_id == self.device.id else None


@pytest.fixture
def loop(database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot) -> Loop:
    clock = ManualClock()
    publisher = RecordingPublisher()
    settings = make_settings(tmp_path)
    device = SimDevice("cam-1")
    add_bundle(database, now=clock())
    add_device(database, device.id, now=clock())  # serves demo@1.0.0
    with database.session() as session:
        session.execute(
            update(Device).where(Device.id == device.id).values(public_key=device.public_key)
        )
    returns = Returns()
    connects = [0]
    ingestor = Ingestor(database, Keys(device), settings, clock, on_return=returns.add)
    issuer = DirectiveIssuer([keyset.server], settings, clock)
    driver = RolloutDriver(
        database,
        issuer,
        publisher,
        settings,
        clock,
        returns=returns,
        connects=lambda: connects[0],
    )
    return Loop(database, clock, publisher, ingestor, driver, trust, device, connects)


def installed(loop: Loop, plan: dict[str, Any] = PLAN) -> tuple[int, Directive]:
    """A rollout whose install directive the device accepted and answered `downloading`."""
    rid = loop.start(plan)
    loop.tick()
    (payload,) = loop.directives()
    directive = loop.accept(payload)
    assert directive.action == "install"
    loop.status(directive, "downloading", "2.0.0")
    loop.tick()
    assert loop.membership(rid).state == "installing"
    return rid, directive


def test_a_lost_committed_report_is_settled_by_the_next_heartbeat(loop: Loop) -> None:
    rid, directive = installed(loop)
    # The device committed; its report was lost. Its heartbeat says where it rests.
    loop.heartbeat("1.0.0")  # still the old version: no answer yet
    loop.tick()
    assert loop.membership(rid).state == "installing"
    loop.heartbeat("2.0.0")
    loop.tick()
    settled = loop.membership(rid)
    assert settled.state == "succeeded"
    assert settled.reason is not None and "heartbeat" in settled.reason
    # The lost report turns up late: nothing moves again, nothing is counted twice.
    loop.status(directive, "committed", "2.0.0")
    loop.tick()
    after = loop.membership(rid)
    assert (after.state, after.reason, after.updated_at) == (
        settled.state,
        settled.reason,
        settled.updated_at,
    )
    with loop.db.session() as session:
        assert state_counts(session, rid)["succeeded"] == 1
    for _ in range(10):
        loop.tick()
    assert loop.state(rid) == "completed"


def test_a_lost_failure_report_is_settled_by_the_heartbeat_that_restates_it(
    loop: Loop,
) -> None:
    rid, directive = installed(loop, {**PLAN, "max_retries": 0})  # a failure stays failed
    # The install failed and was rolled back; its report was lost. The heartbeat restates
    # the answer to that directive.
    reason = "smoke test failed: the model answered nothing"
    failed = DirectiveAnswer(sequence=directive.sequence, install_state="failed", reason=reason)
    loop.heartbeat("1.0.0", "failed", DirectiveAnswer(sequence=directive.sequence + 1,
                                                       install_state="failed"))  # fmt: skip
    loop.tick()
    assert loop.membership(rid).state == "installing"  # the answer to another directive
    loop.heartbeat("1.0.0", "failed", failed)
    loop.tick()
    settled = loop.membership(rid)
    assert settled.state == "failed"
    assert settled.reason is not None and settled.reason.startswith(reason)
    assert "heartbeat" in settled.reason
    # The lost report turns up late: nothing moves again.
    loop.status(directive, "failed", "2.0.0")
    loop.tick()
    after = loop.membership(rid)
    assert (after.state, after.reason, after.updated_at) == (
        settled.state,
        settled.reason,
        settled.updated_at,
    )
    with loop.db.session() as session:
        assert state_counts(session, rid)["failed"] == 1


def test_a_heartbeat_from_before_the_directive_settles_nothing(loop: Loop) -> None:
    rid = loop.start()
    loop.heartbeat("2.0.0")  # dated before the directive is issued
    loop.clock.advance(1)
    loop.tick()
    assert loop.membership(rid).state == "notified"


def test_a_lost_rollback_report_is_settled_by_the_heartbeat_on_the_previous_version(
    loop: Loop,
) -> None:
    rid, directive = installed(loop)
    loop.status(directive, "committed", "2.0.0")
    loop.tick()
    with loop.db.session() as session:
        abort_rollout(session, rid, OPERATOR, "bad", now=loop.clock())
    loop.tick()
    rollback = loop.accept(loop.directives()[-1])
    assert rollback.action == "rollback"
    loop.heartbeat("2.0.0")  # before it rolled back: still waiting
    loop.tick()
    assert loop.membership(rid).state == "rolling_back"
    loop.heartbeat("1.0.0")  # rolled back; the report was lost
    loop.tick()
    assert loop.membership(rid).state == "rolled_back"
    loop.tick()
    assert loop.state(rid) == "aborted"


def aborting_with_lost_rollback(loop: Loop) -> tuple[int, bytes]:
    """An aborting rollout whose rollback directive never reached the device."""
    rid, directive = installed(loop)
    loop.status(directive, "committed", "2.0.0")
    loop.tick()
    with loop.db.session() as session:
        abort_rollout(session, rid, OPERATOR, "bad", now=loop.clock())
    loop.tick()
    rollback = loop.directives()[-1]
    assert loop.membership(rid).state == "rolling_back"
    return rid, rollback


def test_a_lost_rollback_directive_is_sent_again_when_the_device_is_back(loop: Loop) -> None:
    rid, rollback = aborting_with_lost_rollback(loop)
    loop.presence(Presence.OFFLINE)
    loop.tick()
    sent = len(loop.directives())
    loop.presence(Presence.ONLINE)
    loop.tick()
    assert loop.directives()[sent:] == [rollback]  # the same signed bytes, once
    loop.tick()
    loop.tick()
    assert len(loop.directives()) == sent + 1
    directive = loop.accept(rollback)
    loop.status(directive, "committed", "1.0.0")
    loop.tick()
    loop.tick()
    assert loop.state(rid) == "aborted"


def test_a_new_connection_the_server_never_saw_end_gets_the_directive_again(
    loop: Loop,
) -> None:
    # A restarted embedded broker forgets the device's session and publishes no Last
    # Will: the database still has the device online when it connects again.
    _, rollback = aborting_with_lost_rollback(loop)
    sent = len(loop.directives())
    loop.presence(Presence.ONLINE)
    loop.tick()
    assert loop.directives()[sent:] == [rollback]
    loop.tick()
    assert len(loop.directives()) == sent + 1  # once per connection


def test_a_device_heard_from_after_silence_gets_its_directive_again(loop: Loop) -> None:
    _, rollback = aborting_with_lost_rollback(loop)
    sent = len(loop.directives())
    loop.tick(seconds=loop.driver.settings.offline_after.total_seconds())
    assert len(loop.directives()) == sent  # silence alone sends nothing
    loop.heartbeat("2.0.0", state="idle")  # the first word after the gap
    loop.tick()
    assert loop.directives()[sent:] == [rollback]


def test_unanswered_directives_are_sent_again_when_the_broker_link_reconnects(
    loop: Loop,
) -> None:
    rid, rollback = aborting_with_lost_rollback(loop)
    loop.link_connects[0] = 1
    sent = len(loop.directives())
    loop.tick()
    loop.tick()
    assert loop.directives()[sent:] == [rollback]  # once per connection
    directive = loop.accept(rollback)
    # A device that accepted it ignores the same directive sent again.
    loop.link_connects[0] = 2
    loop.tick()
    assert loop.directives()[-1] == rollback
    with pytest.raises(ReplayedDirectiveError):
        loop.accept(rollback)
    loop.status(directive, "committed", "1.0.0")
    loop.tick()
    loop.link_connects[0] = 3
    answered = len(loop.directives())
    loop.tick()
    assert len(loop.directives()) == answered  # nothing left unanswered
    assert loop.state(rid) == "aborted"


def test_nothing_is_sent_again_without_a_return_or_a_reconnect(loop: Loop) -> None:
    rid = loop.start()
    loop.tick()
    loop.heartbeat("1.0.0", state="idle")  # heard from, but never away
    for _ in range(3):
        loop.tick()
    assert len(loop.directives()) == 1
    assert loop.membership(rid).state == "notified"
