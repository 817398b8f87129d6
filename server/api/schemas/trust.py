"""The fleet's trust root as the server holds it."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, Field


class TrustRootPublic(BaseModel):
    """The newest trust root version the server holds (devices walk up to it)."""

    version: int = Field(description="The newest stored version.")
    expires: dt.datetime = Field(description="When that version expires.")
    server_keyids: list[str] = Field(description="The key ids of its server role.")


class StrandedBundle(BaseModel):
    """A stored bundle whose release signatures a trust root no longer accepts."""

    bundle: str = Field(description="NAME@VERSION")
    reason: str = Field(description="What a device holding the trust root says of it.")


class TrustRootPushed(TrustRootPublic):
    """The trust root version just stored, and what it strands."""

    untrusted_bundles: list[StrandedBundle] = Field(
        default_factory=list,
        description="Stored bundles devices will refuse from now on (a release key they were "
        "signed with is gone): rollouts of them are refused until they are signed again "
        "and pushed as new versions, or a trust root lists the key again.",
    )
