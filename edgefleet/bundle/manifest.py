"""The bundle manifest: the signed list of what a bundle holds and where it may run.

Invariants a parsed `Manifest` guarantees: every path is a plain relative path
that stays inside the bundle and appears once, and no file's path is a
directory of another's; the manifest's own name is not among them; version and
minimum agent version are semantic versions; the release counter is at most
2**63-1 (`MAX_RELEASE_COUNTER`); a stated security floor is at or below it.

`security_floor` is optional and written into the signed manifest only when
set, so agents that predate it keep accepting bundles that do not state one.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgefleet.errors import (
    DuplicateFileError,
    MalformedDocumentError,
    PathConflictError,
    UnsafePathError,
    UsageError,
)
from edgefleet.semver import MAX_RELEASE_COUNTER, SEMVER_PATTERN, Version
from edgefleet.signing import Envelope, parse_envelope
from edgefleet.timefmt import parse_time
from edgefleet.validation import Timestamp, describe_validation_error

MANIFEST_TYPE = "bundle-manifest"
MANIFEST_NAME = "manifest.json"
MAX_PATH_LENGTH = 255
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
PROFILE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
NAME_RULE = (
    "1 to 64 of lowercase letters, digits, '.', '_' and '-', starting with a letter or digit "
    f"({NAME_PATTERN})"
)
VERSION_RULE = "MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD], e.g. 1.4.0 or 2.0.0-rc.1"


def check_bundle_name(name: str, what: str = "name") -> str:
    """`name` itself when a manifest may carry it as the model name.

    Raises: UsageError naming `what`, the value and the rule.
    """
    if not re.match(NAME_PATTERN, name):
        raise UsageError(f"{what} {name!r} is not a bundle name: use {NAME_RULE}")
    return name


def check_version_text(text: str, what: str = "version") -> Version:
    """`text` parsed, when it is a semantic version.

    Raises: UsageError naming `what`, the value and the form.
    """
    try:
        return Version.parse(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a semantic version: {VERSION_RULE}") from None


def check_bundle_path(path: str) -> None:
    """Refuse any path that is not a plain relative path inside the bundle.

    Raises:
        UnsafePathError: absolute, `..` or `.` components, empty components,
            backslashes, control characters, or too long.
    """
    reason = None
    if not path:
        reason = "is empty"
    elif path.startswith("/"):
        reason = "is absolute"
    elif "\\" in path:
        reason = "contains a backslash"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        reason = "contains a control character"
    elif len(path.encode("utf-8")) > MAX_PATH_LENGTH:
        reason = f"is longer than {MAX_PATH_LENGTH} bytes"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        reason = "has an empty, '.' or '..' component"
    if reason:
        raise UnsafePathError(f"path {path!r} {reason}: bundle paths must stay inside the bundle")


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    length: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """The signed part of a bundle manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    type_: Literal["bundle-manifest"] = Field(default="bundle-manifest", alias="_type")
    spec_version: Literal[1] = 1
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    # At most a signed 64-bit integer: what the server stores and every agent compares.
    release_counter: int = Field(ge=0, le=MAX_RELEASE_COUNTER)
    created: Timestamp
    profiles: list[str] = Field(min_length=1)
    min_agent_version: str = Field(pattern=SEMVER_PATTERN)
    files: list[FileEntry]
    lineage: dict[str, Any] = Field(default_factory=dict)
    # The lowest release counter of this model name a device accepts once this
    # release has committed there (the release key's decision; None: unchanged).
    security_floor: int | None = Field(default=None, ge=0, le=MAX_RELEASE_COUNTER)

    @field_validator("profiles")
    @classmethod
    def _profiles_named(cls, value: list[str]) -> list[str]:
        for profile in value:
            if not re.match(PROFILE_PATTERN, profile):
                raise ValueError(f"profile {profile!r} is not a profile name")
        return value

    @model_validator(mode="after")
    def _floor_at_or_below_counter(self) -> Manifest:
        if self.security_floor is not None and self.security_floor > self.release_counter:
            raise ValueError(
                f"security_floor {self.security_floor} is above the release counter "
                f"{self.release_counter}: a release cannot refuse itself"
            )
        return self

    @property
    def created_at(self) -> dt.datetime:
        return parse_time(self.created)

    @property
    def total_length(self) -> int:
        return sum(entry.length for entry in self.files)

    def files_by_path(self) -> dict[str, FileEntry]:
        return {entry.path: entry for entry in self.files}

    def to_signed(self) -> dict[str, Any]:
        unset = {"security_floor"} if self.security_floor is None else None
        return self.model_dump(by_alias=True, exclude=unset)


def check_manifest_paths(manifest: Manifest) -> None:
    """Raises: UnsafePathError, DuplicateFileError, PathConflictError."""
    seen: set[str] = set()
    directories: dict[str, str] = {}  # every parent directory -> a path below it
    for entry in manifest.files:
        check_bundle_path(entry.path)
        if entry.path == MANIFEST_NAME:
            raise UnsafePathError(f"path {MANIFEST_NAME!r} is reserved for the manifest")
        if entry.path in seen:
            raise DuplicateFileError(f"the manifest lists {entry.path!r} twice")
        seen.add(entry.path)
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            directories.setdefault("/".join(parts[:depth]), entry.path)
    conflicts = sorted(seen & directories.keys())
    if conflicts:
        raise PathConflictError(
            f"the manifest lists {conflicts[0]!r} as a file and {directories[conflicts[0]]!r} "
            "inside it: a path cannot be both a file and a directory"
        )


def parse_manifest_envelope(data: bytes) -> tuple[Envelope, Manifest]:
    """Parse (without checking signatures) the bytes of a bundle's manifest.

    Raises:
        MalformedDocumentError: not a manifest.
        UnsafePathError, DuplicateFileError: a listed path is unsafe or repeated.
    """
    envelope = parse_envelope(data, "bundle manifest", MANIFEST_TYPE)
    try:
        manifest = Manifest.model_validate(envelope.signed)
    except ValidationError as exc:
        raise MalformedDocumentError(
            f"bundle manifest is not valid: {describe_validation_error(exc)}"
        ) from exc
    check_manifest_paths(manifest)
    return envelope, manifest
