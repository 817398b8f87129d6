"""The trust root: which keys may sign what, and how a device comes to trust a new one.

The trust root is a document signed by the root key(s). It lists every public
key and three roles: `root` (signs trust roots), `release` (signs bundle
manifests) and `server` (signs directives and fleet timestamps). A device gets
version 1 at flash time and accepts version N+1 only when it is signed by a
threshold of the root keys of version N *and* of version N+1 (as in TUF's
root rotation, 5.3.4-5.3.5), one version at a time; expiry is checked on the
newest trusted version only, since intermediate versions may have expired long
ago on a device that was offline.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.errors import (
    MalformedDocumentError,
    SignatureError,
    TrustRootExpiredError,
    TrustRootSignatureError,
    TrustRootVersionError,
    UsageError,
)
from edgefleet.keys import PublicKey, SigningKey
from edgefleet.signing import Envelope, Role, parse_envelope, sign_document, verify_role_signatures
from edgefleet.timefmt import format_time, parse_time, utcnow
from edgefleet.validation import Timestamp, describe_validation_error

TRUST_ROOT_TYPE = "trust-root"
ROLE_NAMES: tuple[str, ...] = ("root", "release", "server")
MAX_TRUST_ROOT_BYTES = 256 * 1024

RoleName = Literal["root", "release", "server"]


class TrustRootSigned(BaseModel):
    """The signed part of a trust root."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    type_: Literal["trust-root"] = Field(alias="_type")
    spec_version: Literal[1] = 1
    version: int = Field(ge=1)
    expires: Timestamp
    keys: dict[str, PublicKey]
    roles: dict[RoleName, Role]

    @model_validator(mode="after")
    def _consistent(self) -> TrustRootSigned:
        for keyid, key in self.keys.items():
            if key.keyid != keyid:
                raise ValueError(f"key id {keyid[:12]} does not match its key")
        missing = set(ROLE_NAMES) - set(self.roles)
        if missing:
            raise ValueError(f"roles missing: {', '.join(sorted(missing))}")
        for name, role in self.roles.items():
            for keyid in role.keyids:
                if keyid not in self.keys:
                    raise ValueError(f"role {name} names key {keyid[:12]}, which is not listed")
            if len(set(role.keyids)) < role.threshold:
                raise ValueError(f"role {name}: threshold {role.threshold} above its key count")
        return self


@dataclass(frozen=True)
class TrustRoot:
    """A trust root whose signatures have been checked, with the bytes it came from."""

    signed: TrustRootSigned
    raw: bytes

    @property
    def version(self) -> int:
        return self.signed.version

    @property
    def expires(self) -> dt.datetime:
        return parse_time(self.signed.expires)

    def is_expired(self, now: dt.datetime | None = None) -> bool:
        return (now or utcnow()) >= self.expires

    def verify_not_expired(self, now: dt.datetime | None = None) -> None:
        """Raises: TrustRootExpiredError."""
        if self.is_expired(now):
            raise TrustRootExpiredError(
                f"trust root version {self.version} expired at {self.signed.expires}: "
                "the root key holders must sign a renewed one (edgefleet keys rotate --expires-in)"
            )

    def key_roles(self) -> dict[str, list[str]]:
        holders: dict[str, list[str]] = {}
        for name, role in self.signed.roles.items():
            for keyid in role.keyids:
                holders.setdefault(keyid, []).append(name)
        return holders

    def verify_signed_by(self, envelope: Envelope, role: RoleName) -> None:
        """Check that `role` of this trust root signed `envelope`.

        Raises:
            SignatureError: see `verify_role_signatures`.
        """
        verify_role_signatures(
            envelope, role, self.signed.roles[role], self.signed.keys, self.key_roles()
        )


def _parse(data: bytes, what: str) -> tuple[Envelope, TrustRootSigned]:
    if len(data) > MAX_TRUST_ROOT_BYTES:
        raise MalformedDocumentError(f"{what} is larger than {MAX_TRUST_ROOT_BYTES} bytes")
    envelope = parse_envelope(data, what, TRUST_ROOT_TYPE)
    try:
        signed = TrustRootSigned.model_validate(envelope.signed)
    except ValidationError as exc:
        raise MalformedDocumentError(
            f"{what} is not a valid trust root: {describe_validation_error(exc)}"
        ) from exc
    return envelope, signed


def _verify_self_signed(envelope: Envelope, signed: TrustRootSigned, what: str) -> TrustRoot:
    root = TrustRoot(signed=signed, raw=envelope.to_bytes())
    try:
        root.verify_signed_by(envelope, "root")
    except SignatureError as exc:
        raise TrustRootSignatureError(
            f"{what} (version {signed.version}) is not signed by its own root keys: {exc}"
        ) from exc
    return root


def parse_trust_root(data: bytes, what: str) -> TrustRoot:
    """A locally trusted trust root from its bytes (the device's anchor, or the operator's copy).

    Its root signatures are checked; its expiry is not (see `verify_not_expired`).

    Raises:
        MalformedDocumentError, TrustRootSignatureError.
    """
    envelope, signed = _parse(data, what)
    return _verify_self_signed(envelope, signed, what)


def load_trust_root(path: Path) -> TrustRoot:
    """`parse_trust_root` of a file.

    Raises:
        MalformedDocumentError, TrustRootSignatureError; OSError when unreadable.
    """
    return parse_trust_root(Path(path).read_bytes(), str(path))


def update_trust_root(trusted: TrustRoot, data: bytes, what: str = "new trust root") -> TrustRoot:
    """Accept trust root version N+1 on top of `trusted` (version N), or raise.

    Raises:
        MalformedDocumentError: not a trust root.
        TrustRootVersionError: not exactly version N+1.
        TrustRootSignatureError: not signed by the root keys of version N and of version N+1.
    """
    envelope, signed = _parse(data, what)
    if signed.version != trusted.version + 1:
        raise TrustRootVersionError(
            f"{what} is version {signed.version}, but the next after trusted version "
            f"{trusted.version} must be {trusted.version + 1}: apply trust roots one "
            "version at a time"
        )
    try:
        trusted.verify_signed_by(envelope, "root")
    except SignatureError as exc:
        raise TrustRootSignatureError(
            f"{what} (version {signed.version}) is not signed by the root keys of trusted "
            f"version {trusted.version}: {exc}"
        ) from exc
    return _verify_self_signed(envelope, signed, what)


def load_trust_chain(
    anchor: Path, newer: Sequence[Path] = (), now: dt.datetime | None = None
) -> TrustRoot:
    """Start from the trusted `anchor`, apply each newer trust root in order, check expiry.

    Raises:
        MalformedDocumentError, TrustRootError: see `update_trust_root`.
        TrustRootExpiredError: the newest version has expired.
    """
    root = load_trust_root(anchor)
    for path in newer:
        root = update_trust_root(root, Path(path).read_bytes(), str(path))
    root.verify_not_expired(now)
    return root


def _role(keys: Sequence[PublicKey], threshold: int, name: str) -> Role:
    keyids = list(dict.fromkeys(key.keyid for key in keys))
    if not keyids:
        raise UsageError(f"role {name} would have no keys")
    if threshold > len(keyids):
        raise UsageError(f"role {name}: threshold {threshold} above its {len(keyids)} key(s)")
    return Role(keyids=keyids, threshold=threshold)


def build_trust_root_signed(
    *,
    version: int,
    expires: dt.datetime,
    root: Sequence[PublicKey],
    release: Sequence[PublicKey],
    server: Sequence[PublicKey],
    thresholds: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The signed part of a trust root listing exactly these keys."""
    thresholds = thresholds or {}
    members = {"root": root, "release": release, "server": server}
    roles = {name: _role(members[name], thresholds.get(name, 1), name) for name in ROLE_NAMES}
    all_keys = {key.keyid: key for group in members.values() for key in group}
    signed = TrustRootSigned.model_validate(
        {
            "_type": TRUST_ROOT_TYPE,
            "version": version,
            "expires": format_time(expires),
            "keys": all_keys,
            "roles": roles,
        }
    )
    return signed.model_dump(by_alias=True)


def sign_trust_root(signed: dict[str, Any], signers: Iterable[SigningKey]) -> TrustRoot:
    """Sign a trust root and check that the signatures satisfy its own root role.

    Raises:
        UsageError: the signers do not meet the root threshold.
    """
    envelope = sign_document(signed, signers)
    try:
        return _verify_self_signed(envelope, TrustRootSigned.model_validate(signed), "trust root")
    except TrustRootSignatureError as exc:
        raise UsageError(str(exc)) from exc


def public_keys(root: TrustRoot, role: RoleName) -> list[PublicKey]:
    """The public keys of `role`, in the order the trust root lists them."""
    return [root.signed.keys[keyid] for keyid in root.signed.roles[role].keyids]


def rotate_trust_root(
    current: TrustRoot,
    *,
    signers: Sequence[SigningKey],
    expires: dt.datetime,
    root: Sequence[PublicKey] | None = None,
    release: Sequence[PublicKey] | None = None,
    server: Sequence[PublicKey] | None = None,
) -> TrustRoot:
    """Make version N+1 of `current` with the given keys per role (None keeps a role's keys).

    `signers` must hold enough root keys of both version N and version N+1; the
    result is checked exactly as a device will check it.

    Raises:
        UsageError: the signers would not satisfy a device.
    """
    signed = build_trust_root_signed(
        version=current.version + 1,
        expires=expires,
        root=root if root is not None else public_keys(current, "root"),
        release=release if release is not None else public_keys(current, "release"),
        server=server if server is not None else public_keys(current, "server"),
        thresholds={name: role.threshold for name, role in current.signed.roles.items()},
    )
    envelope = sign_document(signed, signers)
    try:
        return update_trust_root(current, envelope.to_bytes())
    except TrustRootSignatureError as exc:
        raise UsageError(f"a device would refuse this trust root: {exc}") from exc
