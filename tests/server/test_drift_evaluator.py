"""The drift evaluator on real databases: references stored at push, windows of buckets
judged, alerts opened after persistence and resolved after recovery, one replica judging.

The reference is the digits reference of `tests.server.driftdata`, pushed in a real
signed bundle; the buckets hold what devices would send for held-out digits, as is
or shifted. The clock is moved by hand: each tick sees whole buckets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import delete, select, text

from edgefleet.server.bundles import BundleStore
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import alembic_config, open_database, upgrade_database
from edgefleet.server.db.models import (
    Alert,
    AuditEntry,
    BundleRow,
    DeviceState,
    DriftReferenceRow,
    DriftState,
    Rollout,
    RolloutDevice,
    RolloutState,
)
from edgefleet.server.drift.cohorts import (
    VERSION_COHORT,
    Member,
    profile_cohort,
    stage_cohort,
    tag_cohort,
    version_cohorts,
)
from edgefleet.server.drift.evaluator import (
    COHORT,
    DATASET_DRIFT,
    DEVICE,
    FEATURE_DRIFT,
    PREDICTION_DRIFT,
    DriftEvaluator,
    TickReport,
)
from edgefleet.server.drift.reference import load_references
from edgefleet.trust import TrustRoot
from tests.conftest import PROFILE, KeySet
from tests.server.driftdata import (
    SAMPLES_PER_BUCKET,
    START,
    Fleet,
    alerts,
    digits,
    pooled_reference,
    push,
    write_bundle,
)
from tests.server.rolloutsim import add_device, make_settings


@pytest.fixture
def store(tmp_path: Path, trust: TrustRoot) -> BundleStore:
    return BundleStore(tmp_path / "data", trust, lambda: START)


@pytest.fixture
def features_bundle(tmp_path: Path, keyset: KeySet) -> Path:
    features = digits().features
    return write_bundle(
        tmp_path,
        keyset,
        "1.0.0",
        features=features.model_dump_json().encode(),
        reference=pooled_reference(features).model_dump_json().encode(),
    )


def test_drift_opens_alerts_after_persistence_and_recovery_resolves_them(
    database: Database, store: BundleStore, features_bundle: Path, tmp_path: Path
) -> None:
    push(database, store, features_bundle)
    for device_id in ("steady", "shifted"):
        add_device(database, device_id, model=("demo", "1.0.0"))
    fleet = Fleet(database, tmp_path, "1.0.0")

    def bucket(shifted_drifts: bool) -> TickReport:
        fleet.send("steady", drifted=False)
        fleet.send("shifted", drifted=shifted_drifts)
        return fleet.tick()

    # The first window: two devices and their cohorts (the version, their profile) judged.
    first = bucket(True)
    assert first.held and first.judged == 4 and first.opened == []
    for _ in range(2):  # the next window is not complete yet
        assert bucket(True).judged == 0
    assert alerts(database) == []
    opening = bucket(True)  # the second drifted window in a row
    assert opening.judged == 4 and opening.opened

    opened = alerts(database)
    assert {a.device_id for a in opened} == {"shifted", None}  # none for the steady device
    device = [a for a in opened if a.scope == DEVICE]
    kinds = {a.kind for a in device}
    assert kinds == {FEATURE_DRIFT, DATASET_DRIFT, PREDICTION_DRIFT}
    pixels = [a for a in device if a.kind == FEATURE_DRIFT]
    assert len(pixels) >= len(digits().features.inputs) / 2
    evidence = pixels[0].evidence
    assert evidence["statistic"] > evidence["threshold"] > 0
    assert evidence["samples"] == 3 * SAMPLES_PER_BUCKET
    assert evidence["feature"] == pixels[0].feature
    assert evidence["window_end"] == "2026-12-01T12:20:00Z"
    assert evidence["window_start"] == "2026-12-01T12:05:00Z"
    assert evidence["psi"] > 0 and 0 < evidence["js"] <= 1
    assert set(evidence["outside"]) == {"below", "above", "nan", "chance", "cut"}
    with database.session() as session:
        states = list(session.scalars(select(DriftState).where(DriftState.scope == DEVICE)))
    shifted = {state.feature for state in states if state.subject == "shifted" and state.drifted}
    assert shifted >= {a.feature for a in pixels}  # the state keeps the last window's verdict
    # the steady device's values stay within the reference's range: its verdicts are its statistic's
    assert all(
        state.drifted == (state.statistic > state.threshold)
        for state in states
        if state.subject == "steady" and state.statistic is not None and state.threshold is not None
    )
    prediction = next(a for a in device if a.kind == PREDICTION_DRIFT)
    assert prediction.feature == "scores.top1"
    dataset = next(a for a in device if a.kind == DATASET_DRIFT)
    assert dataset.feature is None and set(dataset.evidence["drifted"]) >= {
        a.feature for a in pixels
    }
    cohort = [a for a in opened if a.scope == COHORT]
    assert {a.cohort for a in cohort} == {VERSION_COHORT, profile_cohort(PROFILE)}
    assert all(a.bundle_version == "1.0.0" for a in cohort)
    assert all(a.cohort is None for a in device)
    assert all(a.evidence["devices"] == 2 for a in cohort)
    assert all(a.resolved_at is None for a in opened)

    # Recovery: the first calm window keeps them open, the second resolves them.
    for _ in range(3):
        assert bucket(False).resolved == []
    assert all(a.resolved_at is None for a in alerts(database))
    for _ in range(2):
        assert bucket(False).resolved == []
    closing = bucket(False)
    assert sorted(closing.resolved) == sorted(a.id for a in opened)
    resolved = alerts(database)
    assert all(a.resolved_at == fleet.clock.now for a in resolved)
    assert all(a.evidence["resolved_by"]["window_end"] == "2026-12-01T12:50:00Z" for a in resolved)
    assert len(resolved) == len(opened)  # nothing new opened meanwhile


def test_alerts_of_a_device_that_stopped_sending_resolve_after_the_longest_window(
    sqlite_database: Database, store: BundleStore, features_bundle: Path, tmp_path: Path
) -> None:
    push(sqlite_database, store, features_bundle)
    add_device(sqlite_database, "moved", model=("demo", "1.0.0"))
    fleet = Fleet(sqlite_database, tmp_path, "1.0.0")
    for _ in range(4):
        fleet.send("moved", drifted=True)
        fleet.tick()
    opened = alerts(sqlite_database)
    assert opened and all(a.resolved_at is None for a in opened)
    # The device now serves another version: demo@1.0.0 hears nothing more from it.
    for _ in range(11):  # its last bucket is still within drift_window_max
        assert fleet.tick().resolved == []
    silent = fleet.tick()
    assert sorted(silent.resolved) == sorted(a.id for a in opened)
    for alert in alerts(sqlite_database):
        assert alert.resolved_at == fleet.clock.now
        assert alert.evidence["resolved_by"]["reason"] == "no telemetry in the window"
    with sqlite_database.session() as session:
        assert list(session.scalars(select(DriftState))) == []  # judged afresh if it returns


def test_an_undrifted_fleet_opens_nothing(
    sqlite_database: Database, store: BundleStore, features_bundle: Path, tmp_path: Path
) -> None:
    push(sqlite_database, store, features_bundle)
    add_device(sqlite_database, "steady", model=("demo", "1.0.0"))
    fleet = Fleet(sqlite_database, tmp_path, "1.0.0")
    judged = 0
    for _ in range(12):
        fleet.send("steady", drifted=False)
        judged += fleet.tick().judged
    assert judged == 4  # the device, once every three buckets (a cohort of one is not)
    assert alerts(sqlite_database) == []
    with sqlite_database.session() as session:
        states = list(session.scalars(select(DriftState)))
    assert {(s.scope, s.kind) for s in states} == {
        (DEVICE, kind) for kind in (FEATURE_DRIFT, DATASET_DRIFT, PREDICTION_DRIFT)
    }
    assert all(s.persistence["open"] is False for s in states)


def test_few_samples_widen_the_window_and_too_few_judge_nothing(
    sqlite_database: Database, store: BundleStore, features_bundle: Path, tmp_path: Path
) -> None:
    push(sqlite_database, store, features_bundle)
    add_device(sqlite_database, "quiet", model=("demo", "1.0.0"))
    add_device(sqlite_database, "silent", model=("demo", "1.0.0"))
    fleet = Fleet(sqlite_database, tmp_path, "1.0.0")
    # "quiet" sends 20 samples a bucket: 60 in 15 minutes, enough for the smallest
    # calibrated window (50) only from three buckets on; "silent" sends 2: 24 an hour.
    for _ in range(2):
        fleet.send("quiet", drifted=True, samples=20)
        fleet.send("silent", drifted=True, samples=2)
        fleet.tick()
    with sqlite_database.session() as session:
        assert list(session.scalars(select(DriftState))) == []  # nobody had enough
    for _ in range(10):
        fleet.send("quiet", drifted=True, samples=20)
        fleet.send("silent", drifted=True, samples=2)
        fleet.tick()
    with sqlite_database.session() as session:
        subjects = {s.subject for s in session.scalars(select(DriftState))}
    assert "quiet" in subjects and "silent" not in subjects
    device = [a for a in alerts(sqlite_database) if a.device_id == "quiet"]
    assert device, "the quiet device drifted and had enough samples"
    assert all(a.evidence["samples"] >= 50 for a in device if a.kind == FEATURE_DRIFT)
    assert not [a for a in alerts(sqlite_database) if a.device_id == "silent"]


def test_features_without_thresholds_are_shown_never_judged(
    sqlite_database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    reference = pooled_reference(digits().features)
    push(
        sqlite_database,
        store,
        write_bundle(tmp_path, keyset, "0.9.0", reference=reference.model_dump_json().encode()),
    )
    add_device(sqlite_database, "old-agent", model=("demo", "0.9.0"))
    fleet = Fleet(sqlite_database, tmp_path, "0.9.0")
    for _ in range(8):
        fleet.send("old-agent", drifted=True)
        assert fleet.tick().judged == 1  # looked at each time for enough samples...
    assert alerts(sqlite_database) == []  # ...and never judged: no thresholds
    with sqlite_database.session() as session:
        assert list(session.scalars(select(DriftState))) == []


def test_one_replica_evaluates_under_the_lease(
    database: Database, store: BundleStore, features_bundle: Path, tmp_path: Path
) -> None:
    push(database, store, features_bundle)
    add_device(database, "shifted", model=("demo", "1.0.0"))
    first = Fleet(database, tmp_path, "1.0.0", replica_id="replica-a")
    second = DriftEvaluator(database, make_settings(tmp_path, replica_id="replica-b"), first.clock)
    first.send("shifted", drifted=True)
    assert first.tick().held
    refused = second.tick()
    assert not refused.held and refused.judged == 0
    # The lease outlives two intervals: the holder keeps it from tick to tick.
    first.clock.advance(first.settings.drift_interval_s)
    assert not second.tick().held
    # A holder that stopped is replaced once its lease expired.
    first.clock.advance(first.evaluator.lease_ttl.total_seconds())
    assert second.tick().held


def test_the_reference_is_stored_at_push(
    database: Database, store: BundleStore, features_bundle: Path, tmp_path: Path, keyset: KeySet
) -> None:
    push(database, store, features_bundle)
    push(database, store, write_bundle(tmp_path, keyset, "0.1.0"))  # none: fine
    with database.session() as session:
        found = load_references(session, {("demo", "1.0.0"), ("demo", "0.1.0")})
    assert set(found) == {("demo", "1.0.0")}
    stored = found[("demo", "1.0.0")]
    expected = digits().features
    assert list(stored.inputs) == [f.name for f in expected.inputs]
    histogram, thresholds = stored.inputs["pixels[19]"]
    assert histogram == expected.inputs[0].histogram
    calibrated = expected.inputs[0].thresholds
    assert thresholds is not None and calibrated is not None
    assert thresholds.by_window == calibrated.by_window
    assert stored.outputs["scores.top1"][1] is not None


def test_pushing_again_stores_the_reference_a_bundle_pushed_before_lacks(
    sqlite_database: Database, store: BundleStore, features_bundle: Path
) -> None:
    push(sqlite_database, store, features_bundle)
    with sqlite_database.session() as session:
        session.execute(delete(DriftReferenceRow))  # as an older server stored it
    push(sqlite_database, store, features_bundle)
    with sqlite_database.session() as session:
        assert set(load_references(session, {("demo", "1.0.0")})) == {("demo", "1.0.0")}


def test_an_unusable_reference_file_does_not_refuse_the_bundle(
    sqlite_database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    reference = pooled_reference(digits().features)
    bundle = write_bundle(
        tmp_path,
        keyset,
        "1.1.0",
        features=b'{"schema_version": 2, "inputs": "not a list"}',
        reference=reference.model_dump_json().encode(),
    )
    push(sqlite_database, store, bundle)
    with sqlite_database.session() as session:
        found = load_references(session, {("demo", "1.1.0")})
        audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "bundle.push")).one()
    stored = found[("demo", "1.1.0")]  # the pooled file's features, without thresholds
    assert set(stored.inputs) == {f.name for f in reference.inputs}
    assert all(thresholds is None for _, thresholds in stored.inputs.values())
    note = audit.details["drift_reference"]
    assert note.startswith("stored; unusable: drift-features.json: ")


# --- cohorts


def test_a_tag_cohort_drifts_while_the_version_and_the_other_tag_do_not(
    database: Database, store: BundleStore, features_bundle: Path, tmp_path: Path
) -> None:
    push(database, store, features_bundle)
    for device_id in ("a1", "a2"):
        add_device(database, device_id, tags={"site": "a"})
    for device_id in ("b1", "b2", "b3", "b4"):
        add_device(database, device_id, tags={"site": "b"})
    fleet = Fleet(database, tmp_path, "1.0.0")
    # Site a's few samples drift; in the version's sum they are under 2% of the samples.
    for _ in range(12):
        for device_id in ("a1", "a2"):
            fleet.send(device_id, drifted=True, samples=10)
        for device_id in ("b1", "b2", "b3", "b4"):
            fleet.send(device_id, drifted=False, samples=300)
        fleet.tick()
    cohort = [a for a in alerts(database) if a.scope == COHORT]
    assert {a.cohort for a in cohort} == {tag_cohort("site", "a")}
    assert FEATURE_DRIFT in {a.kind for a in cohort}
    assert all(a.evidence["devices"] == 2 and a.device_id is None for a in cohort)
    with database.session() as session:
        judged = {s.subject for s in session.scalars(select(DriftState)) if s.scope == COHORT}
    # The calm cohorts were judged, not skipped.
    assert judged == {
        VERSION_COHORT,
        profile_cohort(PROFILE),
        tag_cohort("site", "a"),
        tag_cohort("site", "b"),
    }


def add_rollout(db: Database, stages: dict[str, int], state: RolloutState) -> int:
    """A rollout of demo@1.0.0 with its devices in the given stages (all installed)."""
    with db.session() as session:
        bundle = session.scalars(
            select(BundleRow).where(BundleRow.name == "demo", BundleRow.version == "1.0.0")
        ).one()
        rollout = Rollout(
            bundle_id=bundle.id,
            selector={},
            plan={},
            state=state,
            stage_index=1,
            stage_started_at=START,
            created_by="ops",
            created_at=START,
            updated_at=START,
        )
        session.add(rollout)
        session.flush()
        for device_id, stage_index in stages.items():
            session.add(
                RolloutDevice(
                    rollout_id=rollout.id,
                    device_id=device_id,
                    stage_index=stage_index,
                    shadow=False,
                    state=DeviceState.SUCCEEDED,
                    attempts=1,
                    directive_sequence=1,
                    updated_at=START,
                )
            )
        return rollout.id


def test_a_stage_cohort_alert_opens_for_the_stage_and_resolves_when_the_rollout_ends(
    database: Database, store: BundleStore, features_bundle: Path, tmp_path: Path
) -> None:
    push(database, store, features_bundle)
    canaries, others = ("c1", "c2"), ("d1", "d2", "d3", "d4")
    for device_id in (*canaries, *others):
        add_device(database, device_id)
    rollout_id = add_rollout(
        database, {**dict.fromkeys(canaries, 0), **dict.fromkeys(others, 1)}, RolloutState.RUNNING
    )
    fleet = Fleet(database, tmp_path, "1.0.0")
    for _ in range(12):
        for device_id in canaries:
            fleet.send(device_id, drifted=True, samples=10)
        for device_id in others:
            fleet.send(device_id, drifted=False, samples=300)
        fleet.tick()
    cohort = [a for a in alerts(database) if a.scope == COHORT]
    assert {a.cohort for a in cohort} == {stage_cohort(rollout_id, 0)}
    assert all(a.evidence["devices"] == 2 for a in cohort)
    opened = [a for a in cohort if a.resolved_at is None]
    assert opened

    with database.session() as session:
        session.get_one(Rollout, rollout_id).state = RolloutState.COMPLETED
    ended = fleet.tick()  # the stage is no cohort any more, whether a window is due or not
    assert {a.id for a in opened} <= set(ended.resolved)
    for alert in alerts(database):
        if alert.id in {a.id for a in opened}:
            assert alert.evidence["resolved_by"] == {"reason": "the cohort no longer exists"}
    with database.session() as session:
        subjects = {s.subject for s in session.scalars(select(DriftState))}
    assert stage_cohort(rollout_id, 0) not in subjects and VERSION_COHORT in subjects


def test_cohorts_below_the_minimum_are_not_judged(
    sqlite_database: Database, store: BundleStore, features_bundle: Path, tmp_path: Path
) -> None:
    push(sqlite_database, store, features_bundle)
    for device_id in ("a1", "a2"):
        add_device(sqlite_database, device_id, tags={"site": "a"})
    fleet = Fleet(sqlite_database, tmp_path, "1.0.0", drift_min_cohort_devices=3)
    for _ in range(6):
        for device_id in ("a1", "a2"):
            fleet.send(device_id, drifted=True)
        fleet.tick()
    opened = alerts(sqlite_database)
    assert {a.device_id for a in opened} == {"a1", "a2"}  # the devices' own, no cohort's
    with sqlite_database.session() as session:
        assert {s.scope for s in session.scalars(select(DriftState))} == {DEVICE}


def member(device_id: str, **tags: str) -> Member:
    return Member(device_id, PROFILE, tags)


def test_tag_cohorts_over_the_cap_are_skipped_largest_kept_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    members = [member("d1", line="1", serial="s1"), member("d2", line="1", serial="s2")]
    members += [member("d3", line="2", serial="s3"), member("d4", line="2", serial="s4")]
    members += [member("d5", line="2", serial="s5")]
    stages = {stage_cohort(7, 0): {"d1", "d9"}, stage_cohort(7, 1): {"d2", "d3", "d4"}}
    with caplog.at_level(logging.INFO, logger="edgefleet.server.drift.cohorts"):
        cohorts = version_cohorts(
            members, stages, min_devices=2, max_tag_cohorts=1, label="demo@1.0.0"
        )
    assert cohorts.judged == {
        VERSION_COHORT: ["d1", "d2", "d3", "d4", "d5"],
        profile_cohort(PROFILE): ["d1", "d2", "d3", "d4", "d5"],
        stage_cohort(7, 1): ["d2", "d3", "d4"],
        tag_cohort("line", "2"): ["d3", "d4", "d5"],
    }
    assert cohorts.skipped[tag_cohort("line", "1")] == "over the cap of 1 tag cohorts"
    assert cohorts.skipped[tag_cohort("serial", "s1")] == "fewer than 2 devices"
    assert cohorts.skipped[stage_cohort(7, 0)] == "fewer than 2 devices"  # d9 sends nothing
    assert "demo@1.0.0: 1 tag cohort(s) over the cap of 1 not judged" in caplog.text


def test_the_cohort_state_stored_before_cohorts_had_names_is_the_version_cohort(
    tmp_path: Path,
) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0003")
            conn.execute(
                text(
                    "INSERT INTO drift_states (scope, subject, bundle_name, bundle_version,"
                    " kind, feature, persistence, window_end)"
                    " VALUES ('cohort', '', 'demo', '1.0.0', 'dataset-drift', '', '{}',"
                    " '2026-12-01 12:00:00.000000')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO alerts (kind, scope, bundle_name, bundle_version, opened_at,"
                    " evidence) VALUES ('dataset-drift', 'cohort', 'demo', '1.0.0',"
                    " '2026-12-01 12:00:00.000000', '{}')"
                )
            )
        upgrade_database(db)
        with db.session() as session:
            assert session.scalars(select(DriftState.subject)).one() == VERSION_COHORT
            assert session.scalars(select(Alert.cohort)).one() == VERSION_COHORT
    finally:
        db.dispose()
