"""Device enrollment and removal, the inventory queries and the key cache, on SQLite and
PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func, insert, select

from edgefleet.errors import DeviceSignatureError
from edgefleet.fleetca import make_key_and_csr
from edgefleet.mqtt import DeviceKey, DeviceTopics, sign_device_payload, verify_device_payload
from edgefleet.server.api.schemas.devices import DevicePublic
from edgefleet.server.api.schemas.enroll import EnrollRequest
from edgefleet.server.audit import list_audit
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import (
    Device,
    EnrollToken,
    Rollout,
    RolloutDevice,
    StatusReportRow,
    TelemetryBucket,
    TelemetryLatest,
)
from edgefleet.server.devices import (
    DeviceKeyCache,
    count_devices,
    enroll_device,
    get_device,
    list_devices,
    remove_device,
)
from edgefleet.server.errors import ConflictError, EnrollmentError, NotFoundError
from edgefleet.server.mqtt.aggregate import TelemetryAggregate
from edgefleet.server.mqtt.buckets import store_buckets
from edgefleet.server.principals import Principal, Role
from edgefleet.server.tokens import create_enroll_token
from tests.server.conftest import PostgresServer
from tests.server.racing import race_to_enroll
from tests.server.rolloutsim import existing_or_new_bundle

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
OPERATOR = Principal("ops", Role.OPERATOR)
KEY = DeviceKey.generate()
OTHER_KEY = DeviceKey.generate()


def request(device_id: str = "cam-01", **overrides: Any) -> EnrollRequest:
    fields: dict[str, Any] = {
        "device_id": device_id,
        "public_key": KEY.public_hex,
        "profile": "rpi4",
        "arch": "aarch64",
        "runtimes": ["onnxruntime"],
        "agent_version": "0.1.0",
        "tags": {"site": "berlin", "line": "3"},
        "enroll_token": None,
    }
    fields.update(overrides)
    return EnrollRequest.model_validate(fields)


def token(db: Database, tags: dict[str, str] | None = None, ttl_s: float = 3600) -> str:
    with db.session() as session:
        secret, _ = create_enroll_token(
            session, OPERATOR, tags or {}, dt.timedelta(seconds=ttl_s), now=NOW
        )
    return secret


def enroll(
    db: Database, req: EnrollRequest, *, open_enrollment: bool = False
) -> tuple[dict[str, Any], bool]:
    with db.session() as session:
        device, created = enroll_device(session, req, open_enrollment=open_enrollment, now=NOW)
        return DevicePublic.model_validate(device).model_dump(mode="json"), created


def stored(db: Database, device_id: str = "cam-01") -> Device | None:
    with db.session() as session:
        return session.get(Device, device_id)


def audit_actions(db: Database) -> list[tuple[str, str]]:
    with db.session() as session:
        return [(e.action, e.target) for e in reversed(list_audit(session))]


# --- enrollment --------------------------------------------------------------------------------


def test_new_device_enrolls_with_a_token_whose_tags_win(database: Database) -> None:
    secret = token(database, {"site": "hamburg", "fleet": "pilot"})
    public, created = enroll(database, request(enroll_token=secret))
    assert created
    assert public["tags"] == {"site": "hamburg", "line": "3", "fleet": "pilot"}
    assert public["online"] is False and public["health"] == "unknown"
    assert public["enrolled_at"] == "2030-01-02T03:04:05Z"
    row = stored(database)
    assert row is not None and row.public_key == KEY.public_hex
    with database.session() as session:
        used = session.scalar(select(EnrollToken))
        assert used is not None and used.used_by == "cam-01" and used.used_at == NOW
    assert ("device.enroll", "device cam-01") in audit_actions(database)


def test_without_a_token_only_open_enrollment_admits_a_new_device(database: Database) -> None:
    with pytest.raises(EnrollmentError, match="enrollment token only"):
        enroll(database, request())
    assert stored(database) is None
    _, created = enroll(database, request(), open_enrollment=True)
    assert created and stored(database) is not None


def test_same_key_again_is_idempotent_changes_nothing_and_keeps_the_token(
    database: Database,
) -> None:
    first, _ = enroll(database, request(), open_enrollment=True)
    secret = token(database, {"site": "elsewhere"})
    # An agent retrying after a lost answer, or anyone who knows the (public) key.
    again, created = enroll(
        database,
        request(tags={"site": "forged"}, arch="x86_64", enroll_token=secret),
        open_enrollment=False,
    )
    assert not created and again == first
    with database.session() as session:
        unused = session.scalar(select(EnrollToken))
        assert unused is not None and unused.used_at is None
    assert audit_actions(database).count(("device.enroll", "device cam-01")) == 1


@pytest.mark.parametrize("with_token", [False, True])
def test_a_new_key_for_an_enrolled_device_is_refused_token_or_not(
    database: Database, with_token: bool
) -> None:
    enroll(database, request(), open_enrollment=True)
    secret = token(database) if with_token else None
    with pytest.raises(EnrollmentError, match="another key") as refused:
        enroll(
            database,
            request(public_key=OTHER_KEY.public_hex, enroll_token=secret),
            open_enrollment=True,
        )
    # The refusal says what to do.
    assert "edgefleet devices remove cam-01" in str(refused.value)
    row = stored(database)
    assert row is not None and row.public_key == KEY.public_hex
    with database.session() as session:
        assert all(t.used_at is None for t in session.scalars(select(EnrollToken)))
    assert audit_actions(database).count(("device.enroll", "device cam-01")) == 1


def test_a_token_holder_cannot_take_over_another_device(database: Database) -> None:
    # cam-01 enrolled with its own token; the attacker holds an unused token minted
    # for some other device (tokens are not bound to a device id).
    enroll(database, request(enroll_token=token(database, {"site": "berlin"})))
    stolen = token(database, {"site": "paris"})
    attacker = DeviceKey.generate()
    with pytest.raises(EnrollmentError, match="another key"):
        enroll(database, request(public_key=attacker.public_hex, enroll_token=stolen))
    row = stored(database)
    assert row is not None and row.public_key == KEY.public_hex
    topic = DeviceTopics("cam-01").status
    with pytest.raises(DeviceSignatureError):
        verify_device_payload(topic, sign_device_payload(topic, b"{}", attacker), row.public_key)
    # The token stays unused (the refusal consumed nothing) and still enrolls a new id.
    _, created = enroll(database, request("cam-02", enroll_token=stolen))
    assert created
    assert audit_actions(database).count(("device.enroll", "device cam-01")) == 1


@pytest.mark.parametrize("problem", ["unknown", "used", "expired"])
def test_a_bad_token_enrolls_nothing(database: Database, problem: str) -> None:
    secret = token(database, ttl_s=1 if problem == "expired" else 3600)
    if problem == "unknown":
        secret = "efe_" + "x" * 43
    if problem == "used":
        enroll(database, request("cam-00", enroll_token=secret))
    when = NOW + dt.timedelta(seconds=2)
    with pytest.raises(EnrollmentError), database.session() as session:
        enroll_device(session, request(enroll_token=secret), open_enrollment=True, now=when)
    assert stored(database) is None


def test_a_failed_unit_of_work_leaves_the_token_unused(database: Database) -> None:
    secret = token(database)
    with pytest.raises(RuntimeError), database.session() as session:
        enroll_device(session, request(enroll_token=secret), open_enrollment=False, now=NOW)
        raise RuntimeError("the unit of work fails later")
    assert stored(database) is None
    with database.session() as session:
        unused = session.scalar(select(EnrollToken))
        assert unused is not None and unused.used_at is None


def test_devices_racing_with_a_claim_enroll_its_count_and_leave_no_other_row(
    database: Database,
) -> None:
    # The claim's use is counted last in the unit of work, after the device's row:
    # a device refused there must leave nothing behind.
    with database.session() as session:
        secret, _ = create_enroll_token(
            session, OPERATOR, {}, dt.timedelta(hours=1), now=NOW, max_uses=3
        )
    racers = 8

    def enroll_new(device_id: str) -> None:
        key = DeviceKey.generate().public_hex
        enroll(database, request(device_id, enroll_token=secret, public_key=key))

    enrolled, refused = race_to_enroll(enroll_new, [f"cam-{i}" for i in range(racers)])
    assert len(enrolled) == 3 and len(refused) == racers - 3
    assert all("used by all the 3 devices it admits" in reason for reason in refused)
    with database.session() as session:
        assert sorted(session.scalars(select(Device.id))) == sorted(enrolled)
        assert session.scalars(select(EnrollToken.uses)).one() == 3
    audited = [target for action, target in audit_actions(database) if action == "device.enroll"]
    assert sorted(audited) == sorted(f"device {device_id}" for device_id in enrolled)


# --- removal -----------------------------------------------------------------------------------


def make_rollout(db: Database, state: str, device_id: str = "cam-01") -> int:
    bundle_id = existing_or_new_bundle(db, now=NOW)
    with db.session() as session:
        rollout = Rollout(
            bundle_id=bundle_id,
            selector={},
            plan={},
            state=state,
            stage_index=0,
            stage_started_at=NOW,
            created_by="ops",
            created_at=NOW,
            updated_at=NOW,
        )
        session.add(rollout)
        session.flush()
        session.add(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=device_id,
                stage_index=0,
                shadow=False,
                state="succeeded",
                attempts=1,
                directive_sequence=1,
                updated_at=NOW,
            )
        )
        return rollout.id


def rows_of(db: Database, device_id: str) -> dict[str, int]:
    with db.session() as session:
        return {
            model.__tablename__: int(
                session.scalar(
                    select(func.count()).select_from(model).where(model.device_id == device_id)
                )
                or 0
            )
            for model in (StatusReportRow, TelemetryBucket, TelemetryLatest, RolloutDevice)
        }


def test_removing_a_device_deletes_its_rows_and_lets_it_enroll_with_a_new_key(
    database: Database,
) -> None:
    enroll(database, request(), open_enrollment=True)
    enroll(database, request("cam-02"), open_enrollment=True)
    rollout_id = make_rollout(database, "completed")
    make_rollout(database, "completed", device_id="cam-02")
    with database.session() as session:
        row = session.get(Device, "cam-01")
        assert row is not None
        row.status_sequence = 41
        row.directive_sequence += 3  # it took three directives
        last_directive = row.directive_sequence
        for device_id in ("cam-01", "cam-02"):
            session.add(
                StatusReportRow(
                    device_id=device_id,
                    sequence=41,
                    received_at=NOW,
                    sent_at=NOW,
                    install_state="committed",
                )
            )
            store_buckets(
                session, {(device_id, "model", "1.0.0", NOW): TelemetryAggregate()}, lock=False
            )
    assert rows_of(database, "cam-01") == {
        "status_reports": 1,
        "telemetry_buckets": 1,
        "telemetry_latest": 1,
        "rollout_devices": 1,
    }

    with database.session() as session:
        remove_device(session, "cam-01", OPERATOR, now=NOW)
    assert stored(database) is None
    # ON DELETE CASCADE took the rows that named it (SQLite: the foreign_keys pragma
    # is on; PostgreSQL: always), and nothing of the other device.
    assert rows_of(database, "cam-01") == dict.fromkeys(rows_of(database, "cam-01"), 0)
    assert set(rows_of(database, "cam-02").values()) == {1}
    with database.session() as session:
        assert session.get(Rollout, rollout_id) is not None  # the rollout's history stays
        removal = [e for e in list_audit(session) if e.action == "device.remove"]
    assert [(e.actor, e.target) for e in removal] == [("ops", "device cam-01")]
    assert removal[0].details["public_key"] == KEY.public_hex

    # The re-flashed device enrolls again with its new key, a second later: its status
    # counts from scratch, its directives above any it was sent before (an agent that
    # kept its state refuses numbers it has seen).
    again = request(public_key=OTHER_KEY.public_hex, enroll_token=token(database))
    with database.session() as session:
        _, created = enroll_device(
            session, again, open_enrollment=False, now=NOW + dt.timedelta(seconds=1)
        )
    assert created
    row = stored(database)
    assert row is not None and row.public_key == OTHER_KEY.public_hex
    assert row.status_sequence == 0
    assert row.directive_sequence > last_directive


@pytest.mark.parametrize("state", ["running", "paused", "aborting"])
def test_a_device_in_an_active_rollout_cannot_be_removed(database: Database, state: str) -> None:
    enroll(database, request(), open_enrollment=True)
    rollout_id = make_rollout(database, state)
    refused = f"rollout {rollout_id} \\({state}\\)"
    with pytest.raises(ConflictError, match=refused), database.session() as session:
        remove_device(session, "cam-01", OPERATOR, now=NOW)
    assert stored(database) is not None
    assert rows_of(database, "cam-01")["rollout_devices"] == 1
    assert ("device.remove", "device cam-01") not in audit_actions(database)


def test_removing_an_unknown_device_is_not_found(database: Database) -> None:
    with pytest.raises(NotFoundError, match="cam-404"), database.session() as session:
        remove_device(session, "cam-404", OPERATOR, now=NOW)


# --- the request schema ------------------------------------------------------------------------


def test_enroll_request_accepts_the_agents_json() -> None:
    body = {
        "device_id": "cam-017",
        "public_key": KEY.public_hex,
        "profile": "x86_64-vnni",
        "arch": "x86_64",
        "runtimes": ["onnxruntime", "tflite"],
        "agent_version": "0.1.0-rc.1+build.5",
        "tags": {"site": "berlin", "room": "B 12"},
        "enroll_token": "efe_abc",
        "csr": make_key_and_csr("cam-017")[1].decode(),
    }
    parsed = EnrollRequest.model_validate_json(json.dumps(body))
    assert parsed.model_dump() == body
    optional = ("runtimes", "tags", "enroll_token", "csr")
    minimal = {k: v for k, v in body.items() if k not in optional}
    assert EnrollRequest.model_validate(minimal).tags == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id", "cam/01"),
        ("device_id", "+"),
        ("public_key", "00" * 32),  # small order: nothing could ever verify under it
        ("public_key", KEY.public_hex.upper()),
        ("public_key", KEY.public_hex[:-2]),
        ("profile", "Bad Profile"),
        ("arch", ""),
        ("runtimes", "onnxruntime"),
        ("runtimes", ["onnxruntime", "onnxruntime"]),
        ("runtimes", [f"rt{i}" for i in range(17)]),
        ("agent_version", "1.0"),
        ("tags", {"site": "a,b"}),
        ("tags", {"si te": "a"}),
        ("tags", {"site": "x" * 129}),
        ("tags", {f"t{i}": "v" for i in range(33)}),
        ("tags", {"site": 3}),
        ("enroll_token", ""),
        ("enroll_token", 5),
        ("surprise", "field"),
    ],
)
def test_enroll_request_refuses(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        request(**{field: value})
    assert field in str(caught.value)


# --- inventory ---------------------------------------------------------------------------------


def _add(database: Database, rows: list[dict[str, Any]]) -> None:
    base = {
        "public_key": KEY.public_hex,
        "enrolled_at": NOW,
        "profile": "rpi4",
        "arch": "aarch64",
        "runtimes": ["onnxruntime"],
        "agent_version": "0.1.0",
        "tags": {},
        "online": False,
        "health": "unknown",
        "status_sequence": 0,
        "directive_sequence": 0,
    }
    with database.session() as session:
        session.execute(insert(Device), [{**base, **row} for row in rows])


def test_list_and_count_filter_by_online_tags_and_model(database: Database) -> None:
    _add(
        database,
        [
            {
                "id": "d3",
                "online": True,
                "tags": {"site": "berlin"},
                "model_name": "digits",
                "model_version": "1.1.0",
            },
            {
                "id": "d1",
                "online": True,
                "tags": {"site": "berlin", "line": "3"},
                "model_name": "digits",
                "model_version": "1.0.0",
            },
            {
                "id": "d2",
                "tags": {"site": "paris"},
                "model_name": "digits",
                "model_version": "1.1.0",
            },
            {"id": "d4", "tags": {"site": "berlin", "line": "4"}},
        ],
    )

    def ids(**filters: Any) -> list[str]:
        with database.session() as session:
            found = [d.id for d in list_devices(session, **filters)]
            paging = {k: v for k, v in filters.items() if k not in ("limit", "offset")}
            if "limit" not in filters:
                assert count_devices(session, **paging) == len(found)
            return found

    assert ids() == ["d1", "d2", "d3", "d4"]
    assert ids(online=True) == ["d1", "d3"]
    assert ids(online=False) == ["d2", "d4"]
    assert ids(tags={"site": "berlin"}) == ["d1", "d3", "d4"]
    assert ids(tags={"site": "berlin", "line": "3"}) == ["d1"]
    assert ids(tags={"line": "nowhere"}) == []
    assert ids(model="digits") == ["d1", "d2", "d3"]
    assert ids(model="digits@1.1.0") == ["d2", "d3"]
    assert ids(model="digits@1.1.0", online=True, tags={"site": "berlin"}) == ["d3"]
    assert ids(limit=2) == ["d1", "d2"]
    assert ids(limit=2, offset=3) == ["d4"]


def test_listing_ten_thousand_devices_is_one_fast_query(database: Database) -> None:
    _add(
        database,
        [
            {"id": f"dev-{i:05d}", "online": i % 2 == 0, "tags": {"site": f"s{i % 10}"}}
            for i in range(10_000)
        ],
    )
    started = time.perf_counter()
    with database.session() as session:
        page = list_devices(session, online=True, tags={"site": "s4"}, limit=100, offset=200)
        total = count_devices(session, online=True, tags={"site": "s4"})
        everyone = count_devices(session)
    elapsed = time.perf_counter() - started
    assert total == 1000 and everyone == 10_000
    assert [d.id for d in page[:2]] == ["dev-02004", "dev-02014"]
    assert elapsed < 1.0, f"{elapsed:.2f} s"


def test_get_device_and_its_public_form(database: Database) -> None:
    heartbeat = {
        "sent_at": "2030-01-02T03:04:00Z",
        "uptime_s": 5,
        "cpu_percent": 12.5,
        "memory_used_bytes": 1,
        "memory_total_bytes": 2,
        "disk_free_bytes": 3,
        "disk_total_bytes": 4,
        "agent_version": "0.1.0",
        "install_state": "idle",
    }
    _add(database, [{"id": "cam-9", "heartbeat": heartbeat, "last_seen": NOW, "online": True}])
    with database.session() as session:
        public = DevicePublic.model_validate(get_device(session, "cam-9")).model_dump(mode="json")
        with pytest.raises(NotFoundError, match="cam-8"):
            get_device(session, "cam-8")
    assert public["heartbeat"]["cpu_percent"] == 12.5
    assert public["heartbeat"]["temperature_c"] is None
    assert public["last_seen"] == "2030-01-02T03:04:05Z"
    assert set(public) >= {"id", "online", "model_name", "profile", "runtimes", "tags"}


def test_a_missing_or_unusable_heartbeat_is_shown_as_none(database: Database) -> None:
    # The heartbeat is stored as the device sent it; the public form shows its figures
    # only when they fit the summary.
    _add(
        database,
        [
            {"id": "cam-1", "heartbeat": None},
            {"id": "cam-2", "heartbeat": {"cpu_percent": "hot", "uptime_s": 5}},
            {"id": "cam-3", "heartbeat": ["not", "an", "object"]},
            {"id": "cam-4", "heartbeat": {"uptime_s": 5, "something_new": 1}},
        ],
    )
    with database.session() as session:
        shown = {d.id: DevicePublic.model_validate(d).heartbeat for d in list_devices(session)}
    assert shown["cam-1"] is None and shown["cam-2"] is None and shown["cam-3"] is None
    assert shown["cam-4"] is not None and shown["cam-4"].uptime_s == 5


# --- the key cache, with device signatures ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_key_cache_verifies_an_enrolled_devices_message_and_caches(
    sqlite_database: Database,
) -> None:
    db = sqlite_database
    clock = Clock()
    cache = DeviceKeyCache(db, check_interval_s=5, negative_ttl_s=5, monotonic=clock)
    topic = DeviceTopics("cam-01").status
    frame = sign_device_payload(topic, b"{}", KEY)

    assert cache.public_key("cam-01") is None  # not enrolled yet
    enroll(db, request(), open_enrollment=True)
    assert cache.public_key("cam-01") is None  # the negative answer is kept until a check
    clock.now += 5
    key = cache.public_key("cam-01")
    assert key == KEY.public_hex
    assert verify_device_payload(topic, frame, key) == b"{}"
    loads = cache.loads
    for _ in range(100):
        clock.now += 60
        cache.public_key("cam-01")
    assert cache.loads == loads  # kept as long as nothing changes

    # Removed and enrolled again with a new key elsewhere (another replica), before
    # the cache's next check: the old key refuses the new frames...
    with db.session() as session:
        remove_device(session, "cam-01", OPERATOR, now=NOW)
    enroll(db, request(public_key=OTHER_KEY.public_hex, enroll_token=token(db)))
    new_frame = sign_device_payload(topic, b"{}", OTHER_KEY)
    with pytest.raises(DeviceSignatureError):
        verify_device_payload(topic, new_frame, cache.public_key("cam-01") or "")
    # ... `fresh` reloads, but at most once per refresh interval per device.
    assert cache.public_key("cam-01", fresh=True) == OTHER_KEY.public_hex
    clock.now += 1
    assert cache.public_key("cam-01", fresh=True) == OTHER_KEY.public_hex
    assert cache.loads == loads + 1
    # invalidate (an enrollment on this replica) forgets at once.
    cache.invalidate("cam-01")
    assert cache.public_key("cam-01") == OTHER_KEY.public_hex
    assert cache.loads == loads + 2


def test_key_cache_is_bounded(sqlite_database: Database) -> None:
    clock = Clock()
    cache = DeviceKeyCache(sqlite_database, max_entries=3, monotonic=clock)
    enroll(sqlite_database, request(), open_enrollment=True)
    assert cache.public_key("cam-01") == KEY.public_hex
    for name in ("a", "b", "c"):
        cache.public_key(name)
    cache.public_key("cam-01")  # dropped as least recently used: loaded again
    assert cache.loads == 5
    cache.invalidate()
    cache.public_key("cam-01")
    assert cache.loads == 6


def test_key_cache_notices_enrollments_and_removals_at_its_next_check(
    database: Database,
) -> None:
    clock = Clock()
    cache = DeviceKeyCache(database, check_interval_s=5, negative_ttl_s=60, monotonic=clock)
    enroll(database, request("cam-01"), open_enrollment=True)
    assert cache.public_key("cam-01") == KEY.public_hex
    assert cache.public_key("cam-02") is None
    with database.session() as session:  # through another replica
        remove_device(session, "cam-01", OPERATOR, now=NOW)
    enroll(database, request("cam-02"), open_enrollment=True)
    clock.now += 4.9
    assert (cache.public_key("cam-01"), cache.public_key("cam-02")) == (KEY.public_hex, None)
    clock.now += 0.1
    assert (cache.public_key("cam-01"), cache.public_key("cam-02")) == (None, KEY.public_hex)
    assert cache.checks == 2


def test_key_cache_notices_a_removal_committed_after_a_later_one(
    postgres_server: PostgresServer,
) -> None:
    # PostgreSQL draws audit ids before commit: a removal may become visible after one
    # with a higher id was already read.
    postgres_server.require()
    name = postgres_server.create_database(template=postgres_server.migrated_template())
    db = Database(postgres_server.url_of(name))
    try:
        clock = Clock()
        cache = DeviceKeyCache(db, check_interval_s=5, monotonic=clock)
        for device_id in ("cam-01", "cam-02"):
            enroll(db, request(device_id), open_enrollment=True)
            assert cache.public_key(device_id) == KEY.public_hex
        with db.session() as slow:
            remove_device(slow, "cam-01", OPERATOR, now=NOW)
            slow.flush()  # its audit id is drawn, not yet committed
            with db.session() as session:
                remove_device(session, "cam-02", OPERATOR, now=NOW)
            clock.now += 5
            assert cache.public_key("cam-02") is None  # the later removal, read
            assert cache.public_key("cam-01") == KEY.public_hex
        clock.now += 5
        assert cache.public_key("cam-01") is None  # the earlier id, read once committed
    finally:
        db.dispose()
        postgres_server.drop_database(name)
