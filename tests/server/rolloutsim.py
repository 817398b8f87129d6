"""Fakes of our own interfaces and a small device simulator for the rollout tests.

`RecordingPublisher` implements `edgefleet.server.mqtt.interfaces.Publisher`
with a list of calls. `DeviceSimulator` plays the fleet: it reads the
directives the server published, verifies each with the core's
`verify_directive` against the trust root (as the agent does, refusing replays
and expired ones), and answers by writing what ingestion would write: a
`StatusReportRow` per install state, the `Device` columns a status report
changes, and `TelemetryBucket` rows. A device offline when a directive is
published gets it when it comes back (the broker's persistent session).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from edgefleet.errors import EdgefleetError
from edgefleet.mqtt import Directive, parse_device_topic, verify_directive
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow, Device, StatusReportRow, TelemetryBucket
from edgefleet.server.mqtt.aggregate import TelemetryAggregate
from edgefleet.server.mqtt.buckets import store_buckets
from edgefleet.server.settings import ServerSettings
from edgefleet.trust import TrustRoot
from tests.conftest import PROFILE

START = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
LATENCY_BOUNDS = [5.0, 10.0, 20.0, 50.0, 100.0]
# The agent's COMMITTED reason when its health check saw no request (agent/install/health.py).
IDLE_NOTE = "committed unchecked: no traffic in 60 s of health check"


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class RecordingPublisher:
    """A `Publisher` that records every call."""

    def __init__(self) -> None:
        self.calls: list[Published] = []

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        self.calls.append(Published(topic, payload, qos, retain))

    def to_device(self, device_id: str) -> list[Published]:
        return [c for c in self.calls if c.topic.split("/")[3:4] == [device_id]]


class ManualClock:
    """An injectable clock that moves only when told."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def make_settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "trust_path": tmp_path / "trust.json",
        "server_key_path": tmp_path / "server.key",
        "public_url": "https://fleet.example.org/",
        "replica_id": "replica-a",
        "block_size": 32 * 1024,
    }
    values.update(overrides)
    return ServerSettings(**values)


def add_device(
    db: Database,
    device_id: str,
    *,
    now: dt.datetime = START,
    tags: dict[str, str] | None = None,
    profile: str = PROFILE,
    online: bool = True,
    seen: bool = True,
    model: tuple[str, str] | None = ("demo", "1.0.0"),
) -> None:
    with db.session() as session:
        session.add(
            Device(
                id=device_id,
                public_key="00" * 32,
                enrolled_at=now,
                profile=profile,
                arch="x86_64",
                runtimes=["onnxruntime"],
                agent_version="0.1.0",
                tags=tags or {},
                online=online,
                last_seen=now if seen else None,
                model_name=model[0] if model else None,
                model_version=model[1] if model else None,
                previous_version=None,
                install_state="committed" if model else None,
                health="ok",
                status_sequence=0,
                directive_sequence=0,
            )
        )


def add_bundle(
    db: Database,
    *,
    name: str = "demo",
    version: str = "2.0.0",
    profiles: Iterable[str] = (PROFILE,),
    now: dt.datetime = START,
) -> int:
    with db.session() as session:
        row = BundleRow(
            name=name,
            version=version,
            sha256=(name + version).encode().hex().ljust(64, "0")[:64],
            length=123_456,
            release_counter=1,
            profiles=list(profiles),
            min_agent_version=None,
            manifest={"name": name, "version": version},
            pushed_by="tests",
            pushed_at=now,
        )
        session.add(row)
        session.flush()
        return row.id


def existing_or_new_bundle(
    db: Database, *, name: str = "model", version: str = "1.0.0", now: dt.datetime = START
) -> int:
    """The id of the bundle `name` (any version), adding `name@version` when there is none."""
    with db.session() as session:
        found = session.scalar(select(BundleRow.id).where(BundleRow.name == name))
    return found if found is not None else add_bundle(db, name=name, version=version, now=now)


@dataclass
class SimDevice:
    """How one simulated device answers: "ok", "fail", "silent" (never answers) or "idle"
    (commits, but no traffic came to check the new version: the agent's note says so)."""

    behaviour: str = "ok"
    last_sequence: int = 0
    status_sequence: int = 0
    inbox: list[bytes] = field(default_factory=list)
    received: list[Directive] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class DeviceSimulator:
    """Answers the directives a `RecordingPublisher` holds, writing what ingestion would."""

    def __init__(
        self, db: Database, publisher: RecordingPublisher, trust: TrustRoot, clock: ManualClock
    ) -> None:
        self.db = db
        self.publisher = publisher
        self.trust = trust
        self.clock = clock
        self.devices: dict[str, SimDevice] = {}
        self._seen = 0

    def device(self, device_id: str) -> SimDevice:
        return self.devices.setdefault(device_id, SimDevice())

    def set_behaviour(self, device_id: str, behaviour: str) -> None:
        self.device(device_id).behaviour = behaviour

    def set_online(self, device_id: str, online: bool, *, lose_session: bool = False) -> None:
        """Presence changes; `lose_session` drops what the broker queued for the device."""
        if lose_session:
            self._collect()
            self.device(device_id).inbox.clear()
        with self.db.session() as session:
            device = session.get(Device, device_id)
            assert device is not None
            device.online = online
            device.last_seen = self.clock()

    def _collect(self) -> None:
        """Move newly published directives into their devices' inboxes (the broker's queue)."""
        calls = self.publisher.calls[self._seen :]
        self._seen = len(self.publisher.calls)
        for call in calls:
            if "/devices/" not in call.topic or not call.topic.endswith("/directive"):
                continue
            device_id, _ = parse_device_topic(call.topic)
            self.device(str(device_id)).inbox.append(call.payload)

    def step(self) -> None:
        """Deliver new directives to their devices' inboxes and let online devices act."""
        self._collect()
        for device_id, sim in self.devices.items():
            if not sim.inbox:
                continue
            with self.db.session() as session:
                device = session.get(Device, device_id)
                assert device is not None
                if not device.online:
                    continue  # the broker keeps them in the persistent session
                inbox, sim.inbox = sim.inbox, []
                for payload in inbox:
                    self._act(session, device, sim, payload)

    def _act(self, session: Any, device: Device, sim: SimDevice, payload: bytes) -> None:
        try:
            directive = verify_directive(
                payload,
                self.trust,
                device_id=device.id,
                last_sequence=sim.last_sequence,
                now=self.clock(),
            )
        except EdgefleetError as exc:
            sim.refused.append(type(exc).__name__)
            return
        sim.last_sequence = directive.sequence
        sim.received.append(directive)
        if sim.behaviour == "silent":
            return
        if directive.action == "rollback":
            self._report(session, device, sim, "rolling_back", directive, None)
            # As the agent: a rollback names the bundle it undoes; a device not serving it
            # keeps what it serves.
            named = directive.bundle
            serves = named is None or (device.model_name, device.model_version) == (
                named.name,
                named.version,
            )
            if serves and device.previous_version is not None:
                device.model_version = device.previous_version
                device.previous_version = None
            self._report(session, device, sim, "committed", directive, None)
            return
        bundle = directive.bundle
        assert bundle is not None
        self._report(session, device, sim, "downloading", directive, bundle.version)
        if sim.behaviour == "fail":
            self._report(session, device, sim, "failed", directive, bundle.version, "smoke test")
            return
        already = (device.model_name, device.model_version) == (bundle.name, bundle.version)
        if not directive.shadow and not already:
            device.previous_version = device.model_version
            device.model_name = bundle.name
            device.model_version = bundle.version
        note = IDLE_NOTE if sim.behaviour == "idle" else None
        self._report(session, device, sim, "committed", directive, bundle.version, note)

    def _report(
        self,
        session: Any,
        device: Device,
        sim: SimDevice,
        state: str,
        directive: Directive,
        version: str | None,
        reason: str | None = None,
    ) -> None:
        sim.status_sequence += 1
        now = self.clock()
        session.add(
            StatusReportRow(
                device_id=device.id,
                sequence=sim.status_sequence,
                received_at=now,
                sent_at=now,
                install_state=state,
                bundle_name=directive.bundle.name if directive.bundle else device.model_name,
                bundle_version=version,
                directive_sequence=directive.sequence,
                reason=reason,
            )
        )
        device.install_state = state
        device.status_sequence = sim.status_sequence
        device.last_seen = now

    def telemetry(
        self,
        device_ids: Iterable[str],
        *,
        name: str = "demo",
        version: str = "2.0.0",
        requests: int = 100,
        errors: int = 0,
        fallbacks: int = 0,
        latency_counts: list[int] | None = None,
        shadow: tuple[int, int] | None = None,
        labelled: tuple[int, int] | None = None,
        at: dt.datetime | None = None,
    ) -> None:
        """Add one telemetry bucket per device, as the ingestor's flush writes it."""
        when, ids = at or self.clock(), list(device_ids)
        with self.db.session() as session:
            existing = session.scalars(
                select(TelemetryBucket.device_id).where(
                    TelemetryBucket.device_id.in_(ids),
                    TelemetryBucket.bundle_name == name,
                    TelemetryBucket.bundle_version == version,
                    TelemetryBucket.bucket_start == when,
                )
            ).all()
            assert not existing, "one bucket per device and time in these tests"
            store_buckets(
                session,
                {
                    (device_id, name, version, when): TelemetryAggregate(
                        windows=1,
                        requests=requests,
                        errors=errors,
                        fallbacks=fallbacks,
                        shadow_requests=shadow[0] if shadow else 0,
                        shadow_agreements=shadow[1] if shadow else 0,
                        labelled_count=labelled[0] if labelled else 0,
                        labelled_correct=labelled[1] if labelled else 0,
                        latency={
                            "bounds_ms": LATENCY_BOUNDS,
                            "counts": latency_counts or [requests, 0, 0, 0, 0, 0],
                        },
                    )
                    for device_id in ids
                },
                lock=False,
            )
