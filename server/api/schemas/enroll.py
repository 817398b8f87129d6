"""Enrollment: what a device sends to enroll, and the enrollment tokens operators mint."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.mqtt.devicesig import is_valid_public_key
from edgefleet.mqtt.topics import DEVICE_ID_PATTERN
from edgefleet.semver import SEMVER_PATTERN
from edgefleet.server.api.schemas.base import RequestBody
from edgefleet.server.tags import MAX_TAGS, TagName, TagValue

MAX_RUNTIMES = 16
RuntimeName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")]


class EnrollRequest(BaseModel):
    """What a device sends to enroll (`POST /api/v1/devices/enroll`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    device_id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
    public_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    profile: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    arch: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]
    runtimes: list[RuntimeName] = Field(default_factory=list, max_length=MAX_RUNTIMES)
    agent_version: Annotated[str, Field(max_length=64, pattern=SEMVER_PATTERN)]
    tags: dict[TagName, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    enroll_token: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    @field_validator("public_key")
    @classmethod
    def _usable_key(cls, value: str) -> str:
        if not is_valid_public_key(value):
            raise ValueError("not a usable Ed25519 public key (not on the curve, or small order)")
        return value

    @field_validator("runtimes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("runtimes repeat")
        return value


class EnrollTokenCreate(RequestBody):
    tags: dict[TagName, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    ttl_s: int = Field(default=86_400, ge=1, le=365 * 86_400)


class EnrollTokenCreated(BaseModel):
    id: int
    token: str = Field(description="The secret: shown this once, never stored.")
    tags: dict[str, str]
    expires_at: dt.datetime


__all__ = ["EnrollRequest", "EnrollTokenCreate", "EnrollTokenCreated"]
