"""API tokens and enrollment tokens (one device's, or a claim for many).

A token is a random secret shown once, when it is created; the database keeps
only its SHA-256 (hex), so a copy of the database grants nothing. A presented
secret is hashed and looked up by that hash (an indexed, unique column): the
work does not depend on how much of the secret matches a stored one, so there
is no timing to learn from, and no secret is ever compared in Python.

Formats: `efa_` (API) or `efe_` (enrollment) + 43 URL-safe characters (32
random bytes). The prefix lets scanners and people recognise a leaked token.

An enrollment token may be used by `max_uses` devices (1: one device's token;
more: a claim baked into a golden image). Each use is counted by a guarded
UPDATE (`... SET uses = uses + 1 WHERE uses < max_uses AND expires_at > now`)
in the enrolling unit of work, so devices racing with one token never enroll
more than `max_uses` of them, on SQLite or PostgreSQL. The UPDATE comes after
the device's row and audit entry (only a device certificate, when one is asked
for, follows it): on PostgreSQL it holds the token's row until the commit, and
every device enrolling with the same claim waits for that row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from edgefleet.server.audit import record_audit
from edgefleet.server.db.models import ApiToken, EnrollToken
from edgefleet.server.errors import AuthError, EnrollmentError, InvalidRequestError, NotFoundError
from edgefleet.server.principals import Principal, Role
from edgefleet.server.tags import check_tags
from edgefleet.timefmt import utcnow

API_PREFIX = "efa_"
ENROLL_PREFIX = "efe_"
SECRET_BYTES = 32  # 43 URL-safe characters
MAX_NAME = 128
MAX_ENROLL_TTL = dt.timedelta(days=365)
MAX_TOKEN_USES = 100_000


def hash_secret(secret: str) -> str:
    """The SHA-256 (hex) of a token secret, as stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(SECRET_BYTES)


# --- API tokens


def create_api_token(
    session: Session,
    name: str,
    role: Role | str,
    now: dt.datetime | None = None,
    *,
    actor: Principal | None = None,
) -> tuple[str, ApiToken]:
    """Add a token named `name` with `role`.

    Returns its secret (shown once, never stored) and the stored row.

    With `actor` (an admin through the API) the creation is audited; without
    (the `server token create` bootstrap) it is not.

    Raises:
        InvalidRequestError: the name is empty or longer than 128 characters,
            or `role` is not admin, operator or viewer.
    """
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidRequestError(f"token name must be 1 to {MAX_NAME} characters")
    try:
        role = Role(role)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise InvalidRequestError(f"role must be one of {roles}, not {role!r}") from None
    secret = _new_secret(API_PREFIX)
    token = ApiToken(
        name=name, role=role.value, token_hash=hash_secret(secret), created_at=now or utcnow()
    )
    session.add(token)
    session.flush()
    if actor is not None:
        record_audit(
            session,
            actor,
            "token.create",
            f"token {token.id}",
            {"name": name, "role": role.value},
            now,
        )
    return secret, token


def authenticate(session: Session, secret: str) -> Principal:
    """The principal of an API token's secret.

    Raises:
        AuthError: no such token, or it was revoked (one message for both).
    """
    token = None
    if secret.startswith(API_PREFIX):
        token = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret)))
    if token is None or token.revoked_at is not None:
        raise AuthError("unknown or revoked API token")
    return Principal(token.name, Role(token.role))


def list_api_tokens(session: Session, *, include_revoked: bool = True) -> list[ApiToken]:
    """Every API token (hashes only), oldest first."""
    query = select(ApiToken).order_by(ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_api_token(
    session: Session,
    token_id: int,
    now: dt.datetime | None = None,
    *,
    actor: Principal | None = None,
) -> ApiToken:
    """Revoke a token from now on; revoking it again keeps the first revocation time.

    Raises:
        NotFoundError: no token with that id.
    """
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFoundError(f"no API token {token_id}")
    if token.revoked_at is None:
        token.revoked_at = now or utcnow()
        if actor is not None:
            record_audit(
                session, actor, "token.revoke", f"token {token_id}", {"name": token.name}, now
            )
    return token


# --- enrollment tokens


def create_enroll_token(
    session: Session,
    actor: Principal,
    tags: dict[str, str],
    ttl: dt.timedelta,
    now: dt.datetime | None = None,
    *,
    max_uses: int = 1,
) -> tuple[str, EnrollToken]:
    """A token `max_uses` devices may enroll with until now + ttl; its tags go to each.

    Returns the secret (shown once) and the stored row. Audited as "enroll-token.create".

    Raises:
        InvalidRequestError: `ttl` is not within (0, 365 days], `max_uses` not within
            [1, 100000], or the tags break the rules of `edgefleet.server.tags`.
    """
    if not dt.timedelta(0) < ttl <= MAX_ENROLL_TTL:
        raise InvalidRequestError(
            f"enrollment token lifetime must be between 1 s and {MAX_ENROLL_TTL.days} days"
        )
    if not 1 <= max_uses <= MAX_TOKEN_USES:
        raise InvalidRequestError(f"an enrollment token's uses must be 1 to {MAX_TOKEN_USES}")
    now = now or utcnow()
    secret = _new_secret(ENROLL_PREFIX)
    token = EnrollToken(
        token_hash=hash_secret(secret),
        created_by=actor.name,
        created_at=now,
        expires_at=now + ttl,
        tags=check_tags(tags),
        max_uses=max_uses,
        uses=0,
    )
    session.add(token)
    session.flush()
    details: dict[str, Any] = {
        "tags": token.tags,
        "expires_at": token.expires_at.isoformat(),
        "max_uses": max_uses,
    }
    record_audit(session, actor, "enroll-token.create", f"enroll-token {token.id}", details, now)
    return secret, token


def find_enroll_token(session: Session, secret: str, now: dt.datetime) -> EnrollToken:
    """The usable enrollment token of `secret`, read without counting a use or locking it.

    Raises:
        EnrollmentError: the token is unknown, expired or (as read) used up.
    """
    token = None
    if secret.startswith(ENROLL_PREFIX):
        token = session.scalar(
            select(EnrollToken).where(EnrollToken.token_hash == hash_secret(secret))
        )
    if token is None:
        raise EnrollmentError("unknown enrollment token")
    if token.expires_at <= now:
        raise EnrollmentError(f"enrollment token {token.id} expired")
    if token.uses >= token.max_uses:
        raise EnrollmentError(_used_up(token))
    return token


def count_enroll_token_use(
    session: Session, token: EnrollToken, device_id: str, now: dt.datetime
) -> None:
    """Count one use of `token`, by `device_id`, in the caller's unit of work: the guarded
    UPDATE. If that unit of work rolls back (the enrollment failed), the use is not counted.

    On PostgreSQL the UPDATE locks the token's row until the unit of work ends, and every
    device enrolling with the same token waits for it: count as late in the unit as it can.

    Raises:
        EnrollmentError: the token was used up since it was read (also by devices
            enrolling at the same moment).
    """
    claimed = session.execute(
        update(EnrollToken)
        .where(
            EnrollToken.id == token.id,
            EnrollToken.uses < EnrollToken.max_uses,
            EnrollToken.expires_at > now,
        )
        .values(uses=EnrollToken.uses + 1, used_at=now, used_by=device_id)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise EnrollmentError(_used_up(token))


def _used_up(token: EnrollToken) -> str:
    if token.max_uses == 1:
        return f"enrollment token {token.id} was already used"
    return (
        f"enrollment token {token.id} was used by all the {token.max_uses} devices it "
        "admits; an operator makes a new one with `edgefleet devices enroll-token --uses N`"
    )


__all__ = [
    "API_PREFIX",
    "ENROLL_PREFIX",
    "MAX_TOKEN_USES",
    "authenticate",
    "count_enroll_token_use",
    "create_api_token",
    "create_enroll_token",
    "find_enroll_token",
    "hash_secret",
    "list_api_tokens",
    "revoke_api_token",
]
