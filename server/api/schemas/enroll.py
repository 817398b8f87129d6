"""Enrollment: what a device sends to enroll and gets back (with its client certificate),
its certificate renewals, and the enrollment tokens operators mint."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.fleetca import MAX_CSR_BYTES
from edgefleet.mqtt.devicesig import is_valid_public_key
from edgefleet.mqtt.topics import DEVICE_ID_PATTERN
from edgefleet.semver import SEMVER_PATTERN
from edgefleet.server.api.schemas.base import RequestBody
from edgefleet.server.api.schemas.devices import DevicePublic
from edgefleet.server.tags import MAX_TAGS, TagName, TagValue
from edgefleet.server.tokens import MAX_TOKEN_USES

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
    # A PEM certificate signing request for the device's TLS key; a server with a
    # fleet CA answers with a client certificate for it.
    csr: Annotated[str, Field(min_length=1, max_length=MAX_CSR_BYTES)] | None = None

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


class CertificateAnswer(BaseModel):
    """A client certificate the fleet CA issued (all None: the server has no CA, or no
    signing request was sent)."""

    certificate: str | None = Field(default=None, description="PEM, subject CN = device id")
    certificate_not_after: dt.datetime | None = None
    ca_certificate: str | None = Field(default=None, description="The fleet CA's, PEM")


class EnrollAnswer(DevicePublic, CertificateAnswer):
    """The enrolled device, and its client certificate when one was issued."""


class CertificateRenewalRequest(RequestBody):
    """The body of a device's certificate renewal (signed: `edgefleet.certwire`)."""

    csr: str = Field(min_length=1, max_length=MAX_CSR_BYTES)


class EnrollTokenCreate(RequestBody):
    tags: dict[TagName, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    ttl_s: int = Field(default=86_400, ge=1, le=365 * 86_400)
    max_uses: int = Field(
        default=1,
        ge=1,
        le=MAX_TOKEN_USES,
        description="How many devices may enroll with it (a claim for a golden image: many).",
    )


class EnrollTokenCreated(BaseModel):
    id: int
    token: str = Field(description="The secret: shown this once, never stored.")
    tags: dict[str, str]
    expires_at: dt.datetime
    max_uses: int


__all__ = [
    "CertificateAnswer",
    "CertificateRenewalRequest",
    "EnrollAnswer",
    "EnrollRequest",
    "EnrollTokenCreate",
    "EnrollTokenCreated",
]
