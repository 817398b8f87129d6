"""Rollout service: starting (selection, refusals), operator actions, audit, status."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from edgefleet.server.audit import list_audit
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow, Device, Rollout, RolloutDevice
from edgefleet.server.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    RolloutStateError,
)
from edgefleet.server.principals import Principal, Role
from edgefleet.server.rollouts.machine import RolloutEvent, apply_event
from edgefleet.server.rollouts.plan import plan_from_dict
from edgefleet.server.rollouts.selection import order_selection
from edgefleet.server.rollouts.service import (
    abort_rollout,
    add_stage_devices,
    get_rollout,
    list_rollouts,
    pause_rollout,
    resume_rollout,
    rollout_status,
    select_devices,
    start_rollout,
)
from tests.server.rolloutsim import START, add_bundle, add_device

OPERATOR = Principal("alice", Role.OPERATOR)
SMALLEST = {"stages": [{"name": "canary", "percent": 34}, {"percent": 100}]}


def _fleet(db: Database) -> None:
    add_bundle(db)
    add_bundle(db, name="other", version="1.0.0")
    for i in range(6):
        add_device(db, f"dev-{i}", tags={"site": "berlin" if i < 4 else "paris"})
    add_device(db, "arm-1", tags={"site": "berlin"}, profile="arm64-generic")


def _start(
    db: Database,
    plan: dict[str, Any] = SMALLEST,
    selector: dict[str, str] | None = None,
    bundle: str = "demo",
) -> int:
    with db.session() as session:
        row = session.scalars(select(BundleRow).where(BundleRow.name == bundle)).one()
        rollout = start_rollout(
            session,
            bundle=row,
            selector=selector or {},
            plan=plan_from_dict(plan),
            actor=OPERATOR,
            now=START,
        )
        return rollout.id


def _assigned(db: Database, rollout_id: int) -> dict[str, str]:
    with db.session() as session:
        rows = session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id))
        return {rd.device_id: rd.state for rd in rows}


def test_start_selects_by_tags_and_profile_and_records_the_first_stage(
    database: Database,
) -> None:
    _fleet(database)
    rid = _start(database, selector={"site": "berlin"})
    assigned = _assigned(database, rid)
    # 4 berlin devices of the bundle's profile (arm-1 is not): ceil(34% of 4) = 2.
    assert len(assigned) == 2 and set(assigned.values()) == {"pending"}
    assert set(assigned) <= {"dev-0", "dev-1", "dev-2", "dev-3"}
    with database.session() as session:
        rollout = get_rollout(session, rid)
        assert rollout.state == "running" and rollout.stage_index == 0
        assert rollout.stage_started_at == START and rollout.created_by == "alice"
        assert rollout.selector == {"site": "berlin"}
        assert rollout.plan["gates"]["bake_s"] == 60  # defaults stored
        (entry,) = list_audit(session)
        assert (entry.actor, entry.action, entry.target) == (
            "alice",
            "rollout.start",
            f"rollout {rid}",
        )
        assert entry.details["selected"] == 4 and entry.details["bundle"] == "demo@2.0.0"


def test_start_refuses_an_empty_selection(database: Database) -> None:
    _fleet(database)
    with pytest.raises(InvalidRequestError, match="no enrolled device matches site=rome"):
        _start(database, selector={"site": "rome"})


def test_start_refuses_a_named_device_outside_the_selection_and_stores_nothing(
    database: Database,
) -> None:
    _fleet(database)
    plan = {"stages": [{"devices": ["dev-5"]}, {"percent": 100}]}
    with pytest.raises(InvalidRequestError, match="dev-5"):
        _start(database, plan, selector={"site": "berlin"})
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Rollout)) == 0
        assert list_audit(session) == []


def test_named_canaries_come_first(database: Database) -> None:
    _fleet(database)
    rid = _start(database, {"stages": [{"devices": ["dev-3", "dev-1"]}, {"percent": 100}]})
    assert _assigned(database, rid) == {"dev-1": "pending", "dev-3": "pending"}


def test_second_active_rollout_of_a_bundle_name_is_refused(database: Database) -> None:
    _fleet(database)
    rid = _start(database, selector={"site": "berlin"})
    add_bundle(database, version="2.1.0")
    with database.session() as session:
        newer = session.scalars(select(BundleRow).where(BundleRow.version == "2.1.0")).one()
        with pytest.raises(
            ConflictError,
            match=rf"rollout {rid} of demo@2.0.0 is still active; .* another rollout of the "
            r"model demo \(here demo@2.1.0\)",
        ):
            start_rollout(
                session,
                bundle=newer,
                selector={"site": "paris"},
                plan=plan_from_dict(SMALLEST),
                actor=OPERATOR,
                now=START,
            )


def test_start_refuses_a_bundle_below_a_selected_devices_floor_for_its_name(
    database: Database,
) -> None:
    _fleet(database)  # demo@2.0.0 has release counter 1
    floors = {
        "dev-1": {"demo": 5},
        "dev-3": {"demo": 9},
        "dev-0": {"m2": 50},  # another name's floor holds nothing back
        "dev-4": {"demo": 1},  # at the floor: accepted
        "dev-5": {"demo": 7},  # in paris: not selected below
    }
    with database.session() as session:
        for device_id, floor in floors.items():
            row = session.get(Device, device_id)
            assert row is not None
            row.security_floors = floor
    with pytest.raises(ConflictError) as refused:
        _start(database, selector={"site": "berlin"})
    assert str(refused.value).startswith(
        "2 selected device(s) have a security floor for demo above demo@2.0.0 "
        "(release counter 1), e.g. dev-1 at 5"
    )
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Rollout)) == 0
        session.get(Device, "dev-5").security_floors = None  # type: ignore[union-attr]
    _start(database, selector={"site": "paris"})  # dev-4 at its floor, dev-5 reports none


def test_devices_in_another_active_rollout_are_refused(database: Database) -> None:
    _fleet(database)
    rid = _start(database, {"stages": [{"percent": 100}]}, selector={"site": "berlin"})
    with pytest.raises(ConflictError, match=f"active rollout {rid}"):
        _start(database, bundle="other")
    # Disjoint devices are fine.
    _start(database, bundle="other", selector={"site": "paris"})


def test_a_later_stage_skips_devices_of_another_active_rollout(database: Database) -> None:
    _fleet(database)
    # Rollout 1 covers dev-0..3 in two stages; its first stage holds two of them.
    plan = {"stages": [{"percent": 50}, {"percent": 100}]}
    first = _start(database, plan, selector={"site": "berlin"})
    free = sorted({"dev-0", "dev-1", "dev-2", "dev-3"} - set(_assigned(database, first)))
    with database.session() as session:  # rollout 2 takes one of the others meanwhile
        device = session.get(Device, free[0])
        assert device is not None
        device.tags = {"site": "berlin", "line": "2"}
    second = _start(database, {"stages": [{"percent": 100}]}, {"line": "2"}, "other")
    with database.session() as session:  # stage 2 begins (the driver does this)
        rollout = get_rollout(session, first)
        bundle = session.scalars(select(BundleRow).where(BundleRow.name == "demo")).one()
        selection = order_selection(first, select_devices(session, bundle, rollout.selector))
        added = add_stage_devices(session, rollout, plan_from_dict(plan), 1, selection, START)
    assert added == [free[1]]
    assigned = _assigned(database, first)
    assert (assigned[free[0]], assigned[free[1]]) == ("skipped", "pending")
    with database.session() as session:
        status = rollout_status(session, first, START)
    assert status.stages[1].states["skipped"] == 1 and status.stages[1].assigned == 1
    # A device a rollout skipped is not part of it: once rollout 2 ends, another may take it.
    with database.session() as session:
        rollout = abort_rollout(session, second, OPERATOR)
        apply_event(
            session, rollout, RolloutEvent.ROLLED_BACK, actor="driver", reason="", now=START
        )
    third = _start(database, {"stages": [{"percent": 100}]}, {"line": "2"}, "other")
    assert _assigned(database, third) == {free[0]: "pending"}


def test_simultaneous_starts_of_overlapping_selections_are_serialised(
    database: Database,
) -> None:
    # Without the membership lock the second start would read the devices as free
    # (PostgreSQL reads what is committed; SQLite reads before taking its write lock)
    # and commit an overlap once the first committed.
    _fleet(database)
    outcome: list[BaseException | int] = []

    def start_other() -> None:
        try:
            outcome.append(_start(database, bundle="other"))
        except BaseException as exc:
            outcome.append(exc)

    with database.session() as session:
        row = session.scalars(select(BundleRow).where(BundleRow.name == "demo")).one()
        start_rollout(
            session,
            bundle=row,
            selector={"site": "berlin"},
            plan=plan_from_dict(SMALLEST),
            actor=OPERATOR,
            now=START,
        )
        racer = threading.Thread(target=start_other)
        racer.start()
        time.sleep(0.3)
        assert racer.is_alive() and not outcome  # waiting for this start to commit
    racer.join(10)
    (result,) = outcome
    assert isinstance(result, ConflictError), result
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Rollout)) == 1


def test_pause_resume_abort_follow_the_state_machine_and_are_audited(
    database: Database,
) -> None:
    _fleet(database)
    rid = _start(database)
    with database.session() as session, pytest.raises(RolloutStateError, match="cannot resume"):
        resume_rollout(session, rid, OPERATOR)
    with database.session() as session:
        assert pause_rollout(session, rid, OPERATOR, "night shift").state == "paused"
    with database.session() as session, pytest.raises(RolloutStateError, match="is paused"):
        pause_rollout(session, rid, OPERATOR)
    with database.session() as session:
        assert resume_rollout(session, rid, OPERATOR).reason is None
        assert pause_rollout(session, rid, OPERATOR).reason == "pause by alice"
        assert abort_rollout(session, rid, OPERATOR, "bad model").state == "aborting"
    with database.session() as session:
        with pytest.raises(RolloutStateError, match="is aborting; cannot resume"):
            resume_rollout(session, rid, OPERATOR)
        with pytest.raises(NotFoundError):
            pause_rollout(session, rid + 100, OPERATOR)
    with database.session() as session:
        actions = [e.action for e in reversed(list_audit(session))]
        assert actions == [
            "rollout.start",
            "rollout.pause",
            "rollout.resume",
            "rollout.pause",
            "rollout.abort",
        ]
        status = rollout_status(session, rid, START)
    assert [t.to_state for t in status.transitions] == [
        "running",
        "paused",
        "running",
        "paused",
        "aborting",
    ]
    assert status.reason == "bad model"


def test_list_rollouts_filters_by_state(database: Database) -> None:
    _fleet(database)
    first = _start(database, selector={"site": "berlin"})
    second = _start(database, bundle="other", selector={"site": "paris"})
    with database.session() as session:
        pause_rollout(session, second, OPERATOR)
    with database.session() as session:
        assert [r.id for r in list_rollouts(session)] == [second, first]
        assert [r.id for r in list_rollouts(session, "paused")] == [second]
        assert list_rollouts(session, "completed") == []
        with pytest.raises(InvalidRequestError, match="'done' is not one of"):
            list_rollouts(session, "done")


def test_status_shows_stages_counts_and_the_current_verdict(database: Database) -> None:
    _fleet(database)
    rid = _start(database, selector={"site": "berlin"})
    with database.session() as session:
        status = rollout_status(session, rid, START)
    assert status.bundle == "demo@2.0.0" and status.state == "running"
    assert (status.stage_index, status.stage_count) == (0, 2)
    canary, rest = status.stages
    assert (canary.name, rest.name) == ("canary", "stage 2")
    assert canary.assigned == 2 and canary.states["pending"] == 2
    assert canary.decision == "wait" and canary.reasons == [
        "waiting: 0 of 2 devices installed (2 needed)"
    ]
    assert {c.name for c in canary.checks} >= {"min_success_share", "max_error_rate", "bake_s"}
    assert rest.assigned == 0 and rest.decision is None
    assert status.devices["pending"] == 2 and status.devices["succeeded"] == 0
    assert status.transitions[0].from_state == "created"
    assert json.loads(status.model_dump_json())["id"] == rid
    with database.session() as session, pytest.raises(NotFoundError):
        rollout_status(session, rid + 1, START)
