"""API and enrollment tokens: shown once, stored hashed, refused when unknown, used or expired."""

from __future__ import annotations

import datetime as dt
import hashlib
import re

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.server.audit import list_audit
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import ApiToken, EnrollToken
from edgefleet.server.errors import AuthError, EnrollmentError, InvalidRequestError, NotFoundError
from edgefleet.server.principals import Principal, Role
from edgefleet.server.tokens import (
    authenticate,
    count_enroll_token_use,
    create_api_token,
    create_enroll_token,
    find_enroll_token,
    list_api_tokens,
    revoke_api_token,
)
from tests.server.racing import race_to_enroll

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)
ADMIN = Principal("alice", Role.ADMIN)
OPERATOR = Principal("ops-bot", Role.OPERATOR)


def consume_enroll_token(
    session: Session, secret: str, device_id: str, now: dt.datetime
) -> EnrollToken:
    """One use of the token of `secret`, found and counted as an enrollment does; the token
    read again."""
    token = find_enroll_token(session, secret, now)
    count_enroll_token_use(session, token, device_id, now)
    session.refresh(token)
    return token


# --- API tokens


def test_an_api_token_is_shown_once_and_stored_as_its_sha256(database: Database) -> None:
    with database.session() as session:
        secret, created = create_api_token(session, "ci", Role.OPERATOR, now=NOW)
        created_id = created.id
    assert re.fullmatch(r"efa_[A-Za-z0-9_-]{43}", secret)
    with database.session() as session:
        (row,) = session.scalars(select(ApiToken)).all()
        assert row.id == created_id  # the row returned is the one stored
        stored = [str(getattr(row, column.key)) for column in ApiToken.__table__.columns]
        assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert not any(secret[4:] in value for value in stored)
        assert row.created_at == NOW and row.revoked_at is None
        assert authenticate(session, secret) == Principal("ci", Role.OPERATOR)


def test_each_token_secret_is_new(sqlite_database: Database) -> None:
    with sqlite_database.session() as session:
        secrets = {create_api_token(session, "same-name", "viewer")[0] for _ in range(20)}
    assert len(secrets) == 20


@pytest.mark.parametrize(
    "presented",
    [
        "efa_" + "A" * 43,  # well-formed, unknown
        "efe_" + "A" * 43,  # an enrollment-token shape
        "",
        "Bearer efa_x",
    ],
)
def test_an_unknown_secret_is_refused(sqlite_database: Database, presented: str) -> None:
    with sqlite_database.session() as session:
        create_api_token(session, "ci", Role.ADMIN)
    with sqlite_database.session() as session, pytest.raises(AuthError, match="unknown"):
        authenticate(session, presented)


def test_a_revoked_token_is_refused_and_revoking_again_keeps_the_time(
    database: Database,
) -> None:
    with database.session() as session:
        secret, token = create_api_token(session, "laptop", Role.ADMIN, now=NOW)
        token_id = token.id
    with database.session() as session:
        revoked = revoke_api_token(session, token_id, now=NOW, actor=ADMIN)
        assert revoked.revoked_at == NOW
    with database.session() as session:
        again = revoke_api_token(session, token_id, now=NOW + dt.timedelta(hours=1))
        assert again.revoked_at == NOW
        with pytest.raises(AuthError, match="revoked"):
            authenticate(session, secret)
        assert [(e.action, e.actor, e.target) for e in list_audit(session)] == [
            ("token.revoke", "alice", f"token {token_id}")
        ]


def test_revoking_an_unknown_token_is_not_found(sqlite_database: Database) -> None:
    with sqlite_database.session() as session, pytest.raises(NotFoundError, match="42"):
        revoke_api_token(session, 42)


def test_listing_tokens_can_leave_out_revoked_ones(sqlite_database: Database) -> None:
    with sqlite_database.session() as session:
        create_api_token(session, "a", Role.VIEWER, now=NOW)
        create_api_token(session, "b", Role.OPERATOR, now=NOW, actor=ADMIN)
        first = list_api_tokens(session)[0]
        revoke_api_token(session, first.id, now=NOW)
    with sqlite_database.session() as session:
        assert [t.name for t in list_api_tokens(session)] == ["a", "b"]
        assert [t.name for t in list_api_tokens(session, include_revoked=False)] == ["b"]
        # Audited only when an actor (an admin through the API) created it.
        assert [(e.action, e.details) for e in list_audit(session)] == [
            ("token.create", {"name": "b", "role": "operator"})
        ]


@pytest.mark.parametrize(
    ("name", "role", "match"),
    [("", Role.ADMIN, "name"), ("x" * 129, Role.ADMIN, "name"), ("ok", "root", "role")],
)
def test_a_bad_name_or_role_is_refused(
    sqlite_database: Database, name: str, role: str, match: str
) -> None:
    with pytest.raises(InvalidRequestError, match=match), sqlite_database.session() as session:
        create_api_token(session, name, role)
    with sqlite_database.session() as session:
        assert list_api_tokens(session) == []


# --- enrollment tokens


def make_enroll_token(db: Database, ttl: dt.timedelta = dt.timedelta(hours=1)) -> str:
    with db.session() as session:
        secret, _ = create_enroll_token(session, OPERATOR, {"site": "lab"}, ttl, now=NOW)
    return secret


def test_an_enroll_token_is_consumed_once(database: Database) -> None:
    secret = make_enroll_token(database)
    assert re.fullmatch(r"efe_[A-Za-z0-9_-]{43}", secret)
    with database.session() as session:
        token = consume_enroll_token(session, secret, "dev-1", now=NOW + dt.timedelta(minutes=5))
        assert token.tags == {"site": "lab"}
        assert token.created_by == "ops-bot"
    with database.session() as session:
        row = session.scalars(select(EnrollToken)).one()
        assert (row.used_by, row.used_at) == ("dev-1", NOW + dt.timedelta(minutes=5))
        with pytest.raises(EnrollmentError, match="already used"):
            consume_enroll_token(session, secret, "dev-2", now=NOW + dt.timedelta(minutes=6))
        (entry,) = list_audit(session)
        assert (entry.action, entry.actor, entry.target) == (
            "enroll-token.create",
            "ops-bot",
            f"enroll-token {row.id}",
        )
        assert entry.details["tags"] == {"site": "lab"}


def test_an_expired_enroll_token_is_refused(sqlite_database: Database) -> None:
    secret = make_enroll_token(sqlite_database, dt.timedelta(minutes=10))
    with sqlite_database.session() as session, pytest.raises(EnrollmentError, match="expired"):
        consume_enroll_token(session, secret, "dev-1", now=NOW + dt.timedelta(minutes=10))


@pytest.mark.parametrize("presented", ["efe_" + "B" * 43, "efa_" + "B" * 43, "nonsense"])
def test_an_unknown_enroll_token_is_refused(sqlite_database: Database, presented: str) -> None:
    make_enroll_token(sqlite_database)
    with sqlite_database.session() as session, pytest.raises(EnrollmentError, match="unknown"):
        consume_enroll_token(session, presented, "dev-1", now=NOW)


def test_an_api_token_is_not_an_enroll_token(sqlite_database: Database) -> None:
    with sqlite_database.session() as session:
        api_secret, _ = create_api_token(session, "ci", Role.ADMIN)
    with sqlite_database.session() as session, pytest.raises(EnrollmentError, match="unknown"):
        consume_enroll_token(session, api_secret, "dev-1", now=NOW)


def test_a_failed_enrollment_leaves_the_token_unused(database: Database) -> None:
    secret = make_enroll_token(database)
    with pytest.raises(RuntimeError, match="enrollment failed"), database.session() as session:
        consume_enroll_token(session, secret, "dev-1", now=NOW)
        raise RuntimeError("enrollment failed after the token was consumed")
    with database.session() as session:
        assert consume_enroll_token(session, secret, "dev-2", now=NOW).used_by == "dev-2"


def test_devices_racing_with_one_token_enroll_once(database: Database) -> None:
    secret = make_enroll_token(database)
    racers = 6

    def enroll(device_id: str) -> None:
        with database.session() as session:
            consume_enroll_token(session, secret, device_id, now=NOW)

    winners, refusals = race_to_enroll(enroll, [f"dev-{i}" for i in range(racers)])
    assert len(winners) == 1
    assert len(refusals) == racers - 1
    assert all("already used" in refusal for refusal in refusals)
    with database.session() as session:
        assert session.scalars(select(EnrollToken.used_by)).one() == winners[0]


@pytest.mark.parametrize(
    ("tags", "ttl", "match"),
    [
        ({}, dt.timedelta(0), "lifetime"),
        ({}, dt.timedelta(days=366), "lifetime"),
        ({f"t{i}": "v" for i in range(33)}, dt.timedelta(hours=1), "at most 32 tags"),
        ({"": "v"}, dt.timedelta(hours=1), "a name is 1-64"),
        ({"site=x": "v"}, dt.timedelta(hours=1), "a name is 1-64"),
        ({"k": "v" * 129}, dt.timedelta(hours=1), "a value is 1-128"),
        ({"k": "a,b"}, dt.timedelta(hours=1), "a value is 1-128"),
        ({"k": 3}, dt.timedelta(hours=1), "strings to strings"),
    ],
)
def test_bad_enroll_token_requests_are_refused(
    sqlite_database: Database, tags: dict[str, str], ttl: dt.timedelta, match: str
) -> None:
    with pytest.raises(InvalidRequestError, match=match), sqlite_database.session() as session:
        create_enroll_token(session, OPERATOR, tags, ttl, now=NOW)
    with sqlite_database.session() as session:
        assert session.scalars(select(EnrollToken)).all() == []
        assert list_audit(session) == []


def test_a_claim_enrolls_its_count_of_devices_and_no_more(database: Database) -> None:
    with database.session() as session:
        secret, _ = create_enroll_token(
            session, OPERATOR, {"image": "pi-v3"}, dt.timedelta(days=1), now=NOW, max_uses=3
        )
    for device_id in ("dev-1", "dev-2", "dev-3"):
        with database.session() as session:
            token = consume_enroll_token(session, secret, device_id, now=NOW)
            assert token.tags == {"image": "pi-v3"}  # every device gets the claim's tags
    with (
        database.session() as session,
        pytest.raises(EnrollmentError, match="used by all the 3 devices it admits"),
    ):
        consume_enroll_token(session, secret, "dev-4", now=NOW)
    with database.session() as session:
        row = session.scalars(select(EnrollToken)).one()
        assert (row.uses, row.max_uses, row.used_by) == (3, 3, "dev-3")
        (entry,) = list_audit(session)
        assert entry.details["max_uses"] == 3


def test_devices_racing_with_a_claim_never_exceed_its_count(database: Database) -> None:
    with database.session() as session:
        secret, _ = create_enroll_token(
            session, OPERATOR, {}, dt.timedelta(days=1), now=NOW, max_uses=3
        )
    racers = 8

    def enroll(device_id: str) -> None:
        with database.session() as session:
            consume_enroll_token(session, secret, device_id, now=NOW)

    winners, refusals = race_to_enroll(enroll, [f"dev-{i}" for i in range(racers)])
    assert len(winners) == 3 and len(refusals) == racers - 3
    with database.session() as session:
        assert session.scalars(select(EnrollToken.uses)).one() == 3


@pytest.mark.parametrize("max_uses", [0, 100_001])
def test_a_claims_count_is_bounded(sqlite_database: Database, max_uses: int) -> None:
    match = "uses must be 1 to 100000"
    with pytest.raises(InvalidRequestError, match=match), sqlite_database.session() as session:
        create_enroll_token(
            session, OPERATOR, {}, dt.timedelta(hours=1), now=NOW, max_uses=max_uses
        )
