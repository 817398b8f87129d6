"""The fleet server's tables (SQLAlchemy 2 declarative mapping).

Invariants:
- every timestamp is an aware UTC datetime (`UtcDateTime`), on SQLite too;
- nothing grows without bound: status reports and telemetry are kept as
  bounded aggregates (`StatusReportRow` keeps the last few per device,
  `TelemetryBucket` one row per device, bundle version and time bucket) and
  retention deletes old buckets;
- a rollout's state changes only through `RolloutTransition` rows written in
  the same transaction as the new state (see `edgefleet.server.rollouts.machine`);
- state columns hold `RolloutState` and `DeviceState` members, stored as their
  values in plain VARCHAR(16) columns (no native enum type, no CHECK
  constraint): writing any other value fails before it reaches the database;
- the per-device directive sequence is allocated by an UPDATE on `Device`
  inside the transaction that records the directive, so two replicas never
  hand out the same number.

The schema is created and changed only by Alembic migrations
(`edgefleet/server/db/migrations`); a test compares these models with the
migrated database.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class RolloutState(str, enum.Enum):
    """A rollout's state (`Rollout.state`); `edgefleet.server.rollouts.machine` moves it."""

    CREATED = "created"  # virtual: only the from_state of START
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"  # rollback directives out; waiting for devices to roll back
    ABORTED = "aborted"
    COMPLETED = "completed"

    def __str__(self) -> str:
        return self.value


class DeviceState(str, enum.Enum):
    """A device's part in a rollout (`RolloutDevice.state`)."""

    PENDING = "pending"  # assigned to a stage, no directive yet
    NOTIFIED = "notified"  # install directive published, no answer yet
    INSTALLING = "installing"  # the device reported a state on the way
    SUCCEEDED = "succeeded"  # the device reported committed
    FAILED = "failed"  # the device reported failed (final once retries are used up)
    TIMED_OUT = "timed_out"  # no final answer within the plan's device_timeout_s
    ROLLING_BACK = "rolling_back"  # rollback directive published (the rollout aborts)
    ROLLED_BACK = "rolled_back"  # the device reported the rollback committed
    # Left out: the device takes part in another active rollout (the reason names it);
    # it joins the current stage once that one ends. Not counted by the stage's gates.
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


def state_column(states: type[enum.Enum]) -> Enum:
    """A state column: the members of `states`, stored as their values in a VARCHAR(16)."""
    return Enum(
        states,
        native_enum=False,
        create_constraint=False,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dt.datetime: UtcDateTime,
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class ApiToken(Base):
    """An API token for a person or a script; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))  # admin | operator | viewer
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]


class EnrollToken(Base):
    """An enrollment token: one device's, or a claim that `max_uses` devices may enroll
    with (a golden image); only its SHA-256 is stored."""

    __tablename__ = "enroll_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    tags: Mapped[dict[str, Any]]  # tags given to the device that enrolls with it
    max_uses: Mapped[int] = mapped_column(Integer, server_default="1")
    uses: Mapped[int] = mapped_column(Integer, server_default="0")  # enrollments so far
    used_at: Mapped[dt.datetime | None]  # the latest use
    used_by: Mapped[str | None] = mapped_column(String(128))  # the device of the latest use


class TrustRootRow(Base):
    """A version of the fleet's trust root the server accepted (`edgefleet trust push`);
    the newest is what the server signs under and publishes to devices."""

    __tablename__ = "trust_roots"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    document: Mapped[str] = mapped_column(Text)  # the signed trust root, as pushed (UTF-8 JSON)
    pushed_at: Mapped[dt.datetime]
    pushed_by: Mapped[str] = mapped_column(String(128))


class DeviceCertificate(Base):
    """An X.509 client certificate the fleet CA issued to a device.

    No foreign key to `devices`: a removed device's certificates stay, revoked,
    so that the certificate revocation list keeps naming them until they expire.
    """

    __tablename__ = "device_certificates"
    __table_args__ = (Index("ix_device_certificates_device_id", "device_id"),)

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # hex, lower case
    device_id: Mapped[str] = mapped_column(String(128))
    issued_at: Mapped[dt.datetime]
    not_after: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]


class BundleRow(Base):
    """A pushed bundle; its file lives in the data directory under its SHA-256."""

    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_bundles_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    length: Mapped[int] = mapped_column(BigInteger)
    release_counter: Mapped[int] = mapped_column(BigInteger)
    profiles: Mapped[list[Any]]  # hardware profile names the bundle supports
    min_agent_version: Mapped[str | None] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]]  # the signed manifest's summary, for `bundles show`
    # The converter's report.json as pushed (None: the bundle has none, or it was unreadable).
    report: Mapped[dict[str, Any] | None]
    pushed_by: Mapped[str] = mapped_column(String(128))
    pushed_at: Mapped[dt.datetime]


class Device(Base):
    """An enrolled device, its inventory and its latest known state."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))  # Ed25519, hex
    enrolled_at: Mapped[dt.datetime]
    profile: Mapped[str] = mapped_column(String(64), index=True)
    arch: Mapped[str] = mapped_column(String(32))
    runtimes: Mapped[list[Any]]
    agent_version: Mapped[str] = mapped_column(String(64))
    tags: Mapped[dict[str, Any]]
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[dt.datetime | None]
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    previous_version: Mapped[str | None] = mapped_column(String(64))
    install_state: Mapped[str | None] = mapped_column(String(32))
    # ok | degraded | failing | unknown, from the recent telemetry
    health: Mapped[str] = mapped_column(String(16), default="unknown")
    heartbeat: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the last one, as received
    # Highest status sequence applied: reports at or below it are duplicates.
    status_sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    # Last directive sequence issued to this device (allocated by UPDATE ... + 1).
    directive_sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    # Per model name, the lowest release counter the device runs, from its heartbeats;
    # None until an agent that reports them sends one.
    security_floors: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class StatusReportRow(Base):
    """The last few status reports per device (older ones are deleted)."""

    __tablename__ = "status_reports"
    __table_args__ = (Index("ix_status_reports_device_sequence", "device_id", "sequence"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    sequence: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime]
    sent_at: Mapped[dt.datetime]
    install_state: Mapped[str] = mapped_column(String(32))
    bundle_name: Mapped[str | None] = mapped_column(String(128))
    bundle_version: Mapped[str | None] = mapped_column(String(64))
    directive_sequence: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    frozen_reason: Mapped[str | None] = mapped_column(Text)  # the device may be frozen out


class TelemetryBucket(Base):
    """Telemetry windows merged per device, bundle version and time bucket."""

    __tablename__ = "telemetry_buckets"
    __table_args__ = (
        UniqueConstraint(
            "device_id",
            "bundle_name",
            "bundle_version",
            "bucket_start",
            name="uq_telemetry_buckets_key",
        ),
        Index("ix_telemetry_buckets_bucket_start", "bucket_start"),
        # A device's recent buckets (the verdicts, the device page), whatever the version.
        Index("ix_telemetry_buckets_device_id_bucket_start", "device_id", "bucket_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    bucket_start: Mapped[dt.datetime]
    windows: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    fallbacks: Mapped[int] = mapped_column(BigInteger, default=0)
    schema_violations: Mapped[int] = mapped_column(BigInteger, default=0)
    dropped_windows: Mapped[int] = mapped_column(BigInteger, default=0)
    shadow_requests: Mapped[int] = mapped_column(BigInteger, default=0)
    shadow_agreements: Mapped[int] = mapped_column(BigInteger, default=0)
    labelled_count: Mapped[int] = mapped_column(BigInteger, default=0)
    labelled_correct: Mapped[int] = mapped_column(BigInteger, default=0)
    # Regression models' labelled feedback: sums of |error| and error^2 over labelled_count.
    labelled_abs_error: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    labelled_squared_error: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # {"bounds_ms": [...], "counts": [...]}: windows with other bounds are not merged in.
    latency: Mapped[dict[str, Any]]
    # {"inputs": {feature: {"counts": [...], "nan": n, "below": n, "above": n}}, "outputs": {...}}
    bins: Mapped[dict[str, Any]]
    # Running sums: the counter above over this bucket and every earlier one of the same
    # device, bundle name and version, those deleted by retention included. Any span of
    # buckets then sums in two rows, its first and its last (`edgefleet.server.spans`).
    running_requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    running_errors: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    running_fallbacks: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    running_shadow_requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    running_shadow_agreements: Mapped[int] = mapped_column(
        BigInteger, default=0, server_default="0"
    )
    running_labelled_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    running_labelled_correct: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    running_labelled_abs_error: Mapped[float] = mapped_column(
        Float, default=0.0, server_default="0"
    )
    running_labelled_squared_error: Mapped[float] = mapped_column(
        Float, default=0.0, server_default="0"
    )


class TelemetryLatest(Base):
    """The newest stored bucket of each device, bundle name and version: where its running
    sums end. Retention deletes the row with its last bucket."""

    __tablename__ = "telemetry_latest"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    bundle_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    bundle_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_start: Mapped[dt.datetime]


class DriftReferenceRow(Base):
    """The drift reference a bundle carries (`edgefleet.drift`), stored at push."""

    __tablename__ = "drift_references"

    bundle_id: Mapped[int] = mapped_column(
        ForeignKey("bundles.id", ondelete="CASCADE"), primary_key=True
    )
    reference: Mapped[dict[str, Any]]  # the reference file's JSON, as validated
    stored_at: Mapped[dt.datetime]


class DriftState(Base):
    """The drift evaluator's persistence state of one check: a feature (or the dataset)
    of one device's or one cohort's bundle version."""

    __tablename__ = "drift_states"
    __table_args__ = (
        UniqueConstraint(
            "scope",
            "subject",
            "bundle_name",
            "bundle_version",
            "kind",
            "feature",
            name="uq_drift_states_key",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))  # device | cohort
    # The device id, or the cohort ("version", "tag:K=V", ...: edgefleet.server.drift.cohorts)
    subject: Mapped[str] = mapped_column(String(256))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))  # an alert kind
    feature: Mapped[str] = mapped_column(String(256))  # "" for dataset drift
    persistence: Mapped[dict[str, Any]]  # edgefleet.driftstats.Persistence, serialised
    window_end: Mapped[dt.datetime]  # end of the last window judged
    # The last judged window's statistic and threshold (None: dataset drift)
    statistic: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    # The last judged window's verdict: the statistic beyond its threshold, or values outside
    # the reference's range (None: judged before the server kept it)
    drifted: Mapped[bool | None] = mapped_column(Boolean)


class Alert(Base):
    """A drift alert: opened and resolved by the drift evaluator, acknowledged by people."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_device_id", "device_id"),
        Index("ix_alerts_resolved_at", "resolved_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # evaluator.ALERT_KINDS, accuracy.ACCURACY_DROP
    scope: Mapped[str] = mapped_column(String(16))  # device | cohort
    device_id: Mapped[str | None] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE")
    )  # None for a cohort
    # A cohort alert's cohort: "version" (every device on the bundle version), "tag:K=V",
    # "profile:P" or "stage:ROLLOUT/INDEX"; None for a device alert.
    cohort: Mapped[str | None] = mapped_column(String(256))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    feature: Mapped[str | None] = mapped_column(String(256))  # None for dataset drift
    opened_at: Mapped[dt.datetime]
    resolved_at: Mapped[dt.datetime | None]
    acknowledged_by: Mapped[str | None] = mapped_column(String(128))
    acknowledged_at: Mapped[dt.datetime | None]
    # What opened it (statistic, threshold, window, samples, psi, js), and, once
    # resolved, the window that closed it.
    evidence: Mapped[dict[str, Any]]


class WebhookDelivery(Base):
    """One alert event waiting for, or done with, delivery to the server's webhook."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_delivered_at", "delivered_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id", ondelete="SET NULL"))
    event: Mapped[str] = mapped_column(String(32))  # alert.opened | alert.resolved | ...
    payload: Mapped[dict[str, Any]]  # the JSON body, fixed when the event happened
    created_at: Mapped[dt.datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime]
    delivered_at: Mapped[dt.datetime | None]
    last_status: Mapped[int | None] = mapped_column(Integer)  # HTTP status of the last try
    last_error: Mapped[str | None] = mapped_column(Text)


class InputSample(Base):
    """Raw inputs a device captured (its reservoir) and uploaded; the file is in the data dir."""

    __tablename__ = "input_samples"
    __table_args__ = (Index("ix_input_samples_device_id", "device_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)  # why the device captured them
    samples: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))  # of the stored file (its name too)
    captured_at: Mapped[dt.datetime]
    received_at: Mapped[dt.datetime]


class DeadLetterRow(Base):
    """One device's messages that ingestion accepted and the database refused to store,
    kept as they arrived (signed) to be inspected and replayed; the newest
    `dead_letters_kept` are kept."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_device_id", "device_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime]  # when it was set aside
    error: Mapped[str] = mapped_column(Text)  # the database's, one line
    dropped: Mapped[dict[str, Any]] = mapped_column(JSON)  # messages by kind
    # [{"topic", "payload" (base64 of the signed bytes), "received_at"}], in arrival order
    messages: Mapped[list[Any]] = mapped_column(JSON)


class HeartbeatSample(Base):
    """A device's heartbeats merged per time slot: 1 minute, coarser with age (history.py)."""

    __tablename__ = "heartbeat_samples"
    __table_args__ = (
        UniqueConstraint(
            "device_id", "resolution_s", "slot_start", name="uq_heartbeat_samples_key"
        ),
        Index("ix_heartbeat_samples_slot_start", "slot_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    slot_start: Mapped[dt.datetime]
    resolution_s: Mapped[int] = mapped_column(Integer)  # the slot's length
    samples: Mapped[int] = mapped_column(Integer)  # heartbeats merged in
    cpu_sum: Mapped[float] = mapped_column(Float)  # percent, summed over samples
    cpu_max: Mapped[float] = mapped_column(Float)
    memory_used_sum: Mapped[float] = mapped_column(Float)  # bytes, summed over samples
    memory_total: Mapped[int] = mapped_column(BigInteger)  # the latest
    disk_free_min: Mapped[int] = mapped_column(BigInteger)
    disk_total: Mapped[int] = mapped_column(BigInteger)  # the latest
    temperature_samples: Mapped[int] = mapped_column(Integer)  # heartbeats that had one
    temperature_sum: Mapped[float] = mapped_column(Float)
    temperature_max: Mapped[float | None] = mapped_column(Float)


class PresenceChange(Base):
    """A change of a device's online state, with the reason in words."""

    __tablename__ = "presence_changes"
    __table_args__ = (Index("ix_presence_changes_device_id_at", "device_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime]
    online: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)


class DiagnosticsRequest(Base):
    """An operator's request for a device's recent log lines and status, and its answer."""

    __tablename__ = "diagnostics_requests"
    __table_args__ = (Index("ix_diagnostics_requests_device_id", "device_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    requested_by: Mapped[str] = mapped_column(String(128))
    requested_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]  # unanswered after this: expired
    directive_sequence: Mapped[int | None] = mapped_column(BigInteger)
    answered_at: Mapped[dt.datetime | None]
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the device's answer, bounded
    error: Mapped[str | None] = mapped_column(Text)  # why there is no result


class Benchmark(Base):
    """An operator's benchmark request (the converter's candidates, signed by the release key)
    sent to devices of its target profile; the file is stored under `benchmarks/`."""

    __tablename__ = "benchmarks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    requested_by: Mapped[str] = mapped_column(String(128))
    requested_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]  # results arriving after this are refused
    profile: Mapped[str] = mapped_column(String(64))
    selector: Mapped[str] = mapped_column(String(256))  # `device ID` or `tag K=V`
    sha256: Mapped[str] = mapped_column(String(64))
    length: Mapped[int] = mapped_column(BigInteger)
    candidates: Mapped[list[Any]] = mapped_column(JSON)  # the candidates' names


class BenchmarkResult(Base):
    """One device's part of a benchmark: its directive, then its signed results."""

    __tablename__ = "benchmark_results"

    benchmark_id: Mapped[int] = mapped_column(
        ForeignKey("benchmarks.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    directive_sequence: Mapped[int | None] = mapped_column(BigInteger)
    answered_at: Mapped[dt.datetime | None]
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # BenchmarkResults, bounded
    error: Mapped[str | None] = mapped_column(Text)  # why there is no result


class WebSession(Base):
    """A signed-in browser: the SHA-256 of its cookie, the API token it was opened with."""

    __tablename__ = "web_sessions"
    __table_args__ = (Index("ix_web_sessions_expires_at", "expires_at"),)

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))  # sent back in every form
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]


class Rollout(Base):
    """A rollout of one bundle to a selection of devices, driven stage by stage."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"))
    selector: Mapped[dict[str, Any]]  # tag -> value; empty: every device the bundle supports
    plan: Mapped[dict[str, Any]]  # the validated plan, with defaults filled in
    state: Mapped[RolloutState] = mapped_column(state_column(RolloutState), index=True)
    stage_index: Mapped[int] = mapped_column(Integer, default=0)
    stage_started_at: Mapped[dt.datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)  # why it paused, aborted or failed
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class RolloutTransition(Base):
    """One state change of a rollout: who or what moved it, and why."""

    __tablename__ = "rollout_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[dt.datetime]
    from_state: Mapped[RolloutState] = mapped_column(state_column(RolloutState))
    to_state: Mapped[RolloutState] = mapped_column(state_column(RolloutState))
    stage_index: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(128))  # a token name, or "driver"
    reason: Mapped[str] = mapped_column(Text)


class RolloutDevice(Base):
    """One device's part in a rollout."""

    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_rollout_state", "rollout_id", "state"),)

    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    stage_index: Mapped[int] = mapped_column(Integer)
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[DeviceState] = mapped_column(state_column(DeviceState))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    directive_sequence: Mapped[int | None] = mapped_column(BigInteger)
    notified_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime]
    previous_version: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)


class Lease(Base):
    """A named lease held by one server replica until it expires (rollout driving,
    the fleet timestamp): the database decides which replica does the work."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[dt.datetime]


class Counter(Base):
    """Named monotonic counters shared by replicas (the fleet timestamp sequence)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class AuditEntry(Base):
    """Who pushed, started, paused, resumed or aborted what."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    details: Mapped[dict[str, Any]]
