"""Request and response bodies of the API that belong to no domain module.

Requests forbid unknown fields and bound every string and collection, so what
reaches the database fits its columns on every backend (no NUL or control
characters, which PostgreSQL text refuses). Devices' and rollouts' own schemas
live with their domain code (`DevicePublic`, `EnrollRequest`, `RolloutStatus`).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.server.db.models import ApiToken, AuditEntry, BundleRow
from edgefleet.server.principals import Role
from edgefleet.server.tags import MAX_TAGS, TagName, TagValue

# Printable text: no control characters (NUL included).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
MAX_ID = 2**31 - 1  # ids are 32-bit integers on PostgreSQL
Reason = Annotated[str, Field(max_length=1000, pattern=PRINTABLE)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundlePublic(BaseModel):
    """A stored bundle."""

    id: int
    name: str
    version: str
    sha256: str
    length: int
    release_counter: int
    profiles: list[str]
    min_agent_version: str | None
    manifest: dict[str, Any]
    pushed_by: str
    pushed_at: dt.datetime

    @classmethod
    def from_row(cls, row: BundleRow) -> BundlePublic:
        return cls(
            id=row.id,
            name=row.name,
            version=row.version,
            sha256=row.sha256,
            length=row.length,
            release_counter=row.release_counter,
            profiles=[str(p) for p in row.profiles],
            min_agent_version=row.min_agent_version,
            manifest=dict(row.manifest),
            pushed_by=row.pushed_by,
            pushed_at=row.pushed_at,
        )


class TokenCreate(_Request):
    name: str = Field(min_length=1, max_length=128, pattern=PRINTABLE)
    role: Role


class TokenPublic(BaseModel):
    """An API token as listed: never its secret, which only creation shows."""

    id: int
    name: str
    role: Role
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: ApiToken) -> TokenPublic:
        return cls(
            id=row.id,
            name=row.name,
            role=Role(row.role),
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret: shown this once, never stored.")


class EnrollTokenCreate(_Request):
    tags: dict[TagName, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    ttl_s: int = Field(default=86_400, ge=1, le=365 * 86_400)


class EnrollTokenCreated(BaseModel):
    id: int
    token: str = Field(description="The secret: shown this once, never stored.")
    tags: dict[str, str]
    expires_at: dt.datetime


class AuditPublic(BaseModel):
    id: int
    at: dt.datetime
    actor: str
    role: str
    action: str
    target: str
    details: dict[str, Any]

    @classmethod
    def from_row(cls, row: AuditEntry) -> AuditPublic:
        return cls(
            id=row.id,
            at=row.at,
            actor=row.actor,
            role=row.role,
            action=row.action,
            target=row.target,
            details=dict(row.details),
        )


class RolloutCreate(_Request):
    bundle: str = Field(
        max_length=200,
        pattern=r"^[^@\s]+@[^@\s]+$",
        description="name@version",
        examples=["demo@1.2.3"],
    )
    select: str = Field(
        default="", max_length=2000, pattern=PRINTABLE, description="tag=value,... (empty: all)"
    )
    plan: dict[str, Any] = Field(
        description="Stages and gates (docs/rollouts.md)",
        examples=[{"stages": [{"percent": 34}, {"percent": 100}]}],
    )


class RolloutAction(_Request):
    reason: Reason | None = None


class RolloutSummary(BaseModel):
    id: int
    bundle: str
    state: str
    stage_index: int
    stage_count: int
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    reason: str | None


class Health(BaseModel):
    status: str
    database: str


__all__ = [
    "MAX_ID",
    "PRINTABLE",
    "AuditPublic",
    "BundlePublic",
    "EnrollTokenCreate",
    "EnrollTokenCreated",
    "Health",
    "Reason",
    "RolloutAction",
    "RolloutCreate",
    "RolloutSummary",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
]
