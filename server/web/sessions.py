"""Browser sessions: an API token exchanged for a cookie at /login.

The cookie holds a random session id; the database keeps only its SHA-256
(`WebSession.id_hash`), like API tokens, so a copy of the database opens no
session. A session lasts `SESSION_LIFETIME` and speaks for the API token it was
opened with: once that token is revoked, its sessions are refused (and
deleted when next presented). Each session has its own CSRF token, which
every form of the pages sends back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from edgefleet.server.db.models import ApiToken, WebSession
from edgefleet.server.principals import Principal, Role
from edgefleet.server.tokens import authenticate, hash_secret

SESSION_LIFETIME = dt.timedelta(hours=12)
_ID_BYTES = 32


@dataclass(frozen=True)
class SignedIn:
    """A live session: who it speaks for and the CSRF token its forms carry."""

    principal: Principal
    csrf_token: str


def _hash_id(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()


def open_session(session: Session, secret: str, now: dt.datetime) -> tuple[str, SignedIn]:
    """A new session for the API token `secret`: the cookie value (never stored) and who.

    Expired sessions are deleted on the way.

    Raises:
        AuthError: unknown or revoked API token.
    """
    principal = authenticate(session, secret)
    token_id = session.scalar(select(ApiToken.id).where(ApiToken.token_hash == hash_secret(secret)))
    assert token_id is not None  # authenticate found it
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    session_id = secrets.token_urlsafe(_ID_BYTES)
    csrf_token = secrets.token_urlsafe(_ID_BYTES)
    session.add(
        WebSession(
            id_hash=_hash_id(session_id),
            token_id=token_id,
            csrf_token=csrf_token,
            created_at=now,
            expires_at=now + SESSION_LIFETIME,
        )
    )
    return session_id, SignedIn(principal, csrf_token)


def find_session(session: Session, session_id: str, now: dt.datetime) -> SignedIn | None:
    """The live session of a cookie value; None when unknown, expired or its token revoked."""
    row = session.execute(
        select(WebSession, ApiToken)
        .join(ApiToken, ApiToken.id == WebSession.token_id)
        .where(WebSession.id_hash == _hash_id(session_id))
    ).one_or_none()
    if row is None:
        return None
    web_session, token = row
    if web_session.expires_at <= now or token.revoked_at is not None:
        session.delete(web_session)
        return None
    return SignedIn(Principal(token.name, Role(token.role)), web_session.csrf_token)


def close_session(session: Session, session_id: str) -> None:
    """End a session (nothing happens for an unknown one)."""
    session.execute(delete(WebSession).where(WebSession.id_hash == _hash_id(session_id)))


__all__ = ["SESSION_LIFETIME", "SignedIn", "close_session", "find_session", "open_session"]
