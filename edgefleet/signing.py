"""Signed documents: an envelope `{"signed": {...}, "signatures": [...]}`.

Each signature covers the canonical JSON of `signed`, exactly. A role is
satisfied when at least `threshold` *distinct* keys of that role produced valid
signatures; a signature repeated under the same key id counts once, and
signatures by keys outside the role are ignored when the threshold is met
anyway (so documents can carry extra signatures during a key transition).
When it is not met, the error names the most telling reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.canonical import canonical_json, parse_json
from edgefleet.errors import (
    BadSignatureError,
    MalformedDocumentError,
    ThresholdError,
    UnknownKeyError,
    UsageError,
    WrongRoleError,
)
from edgefleet.keys import PublicKey, SigningKey
from edgefleet.validation import describe_validation_error


class Signature(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keyid: str = Field(pattern=r"^[0-9a-f]{64}$")
    sig: str = Field(pattern=r"^[0-9a-f]{128}$")


class Envelope(BaseModel):
    """A signed document as it travels: the signed object and its signatures."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    signed: dict[str, Any]
    signatures: list[Signature] = Field(max_length=64)

    @property
    def signed_bytes(self) -> bytes:
        return canonical_json(self.signed)

    def to_bytes(self) -> bytes:
        return canonical_json(self.model_dump())


class Role(BaseModel):
    """The keys that may sign a kind of document, and how many must."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keyids: list[str] = Field(min_length=1)
    threshold: int = Field(ge=1)


def sign_document(signed: Mapping[str, Any], keys: Iterable[SigningKey]) -> Envelope:
    """Sign the canonical form of `signed` with each key."""
    payload = canonical_json(dict(signed))
    signatures = [Signature(keyid=key.keyid, sig=key.sign(payload).hex()) for key in keys]
    return Envelope(signed=dict(signed), signatures=signatures)


def parse_envelope(data: bytes, what: str, expected_type: str) -> Envelope:
    """Parse untrusted bytes into an envelope whose `signed._type` is `expected_type`.

    Raises:
        MalformedDocumentError: not JSON, not an envelope, or of another type.
    """
    raw = parse_json(data, what)
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        raise MalformedDocumentError(
            f"{what} is not a signed document: {describe_validation_error(exc)}"
        ) from exc
    try:
        canonical_json(envelope.signed)
    except UsageError as exc:  # a float, say: no signer of ours made this
        raise MalformedDocumentError(f"{what} has no canonical form: {exc}") from exc
    found = envelope.signed.get("_type")
    if found != expected_type:
        raise MalformedDocumentError(f"{what} is a {found!r} document, expected {expected_type!r}")
    return envelope


def verify_role_signatures(
    envelope: Envelope,
    role_name: str,
    role: Role,
    keys: Mapping[str, PublicKey],
    key_roles: Mapping[str, Sequence[str]],
) -> None:
    """Check that `role` has signed `envelope`.

    `keys` maps every key id the trust root lists to its public key;
    `key_roles` maps a key id to the roles it holds (for a clear error).

    Raises:
        ThresholdError: fewer than `role.threshold` distinct role keys signed validly.
        WrongRoleError: ... and some signature came from a key of another role.
        UnknownKeyError: ... and some signature came from a key the trust root does not list.
        BadSignatureError: ... and some role key's signature did not verify.
    """
    payload = envelope.signed_bytes
    valid: set[str] = set()
    bad, wrong_role, unknown = [], [], []
    for signature in envelope.signatures:
        if signature.keyid in role.keyids:
            key = keys.get(signature.keyid)
            if key is not None and key.is_valid_signature(bytes.fromhex(signature.sig), payload):
                valid.add(signature.keyid)
            else:
                bad.append(signature.keyid)
        elif signature.keyid in keys:
            wrong_role.append(signature.keyid)
        else:
            unknown.append(signature.keyid)
    if len(valid) >= role.threshold:
        return
    needed = f"needs {role.threshold} distinct {role_name} key(s), has {len(valid)}"
    if wrong_role:
        holders = ", ".join(sorted({r for k in wrong_role for r in key_roles.get(k, ())}))
        raise WrongRoleError(
            f"signed by a {holders} key, but only {role_name} keys may sign this ({needed})"
        )
    if unknown:
        raise UnknownKeyError(
            f"signed by key {_short(unknown[0], keys)}, which the trust root does not list "
            f"({needed})"
        )
    if bad:
        raise BadSignatureError(
            f"the signature of {role_name} key {_short(bad[0])} does not verify: "
            f"the document was changed after signing ({needed})"
        )
    repeated = len(envelope.signatures) - len({s.keyid for s in envelope.signatures})
    hint = f"; {repeated} repeated signature(s) counted once" if repeated else ""
    raise ThresholdError(f"{needed}{hint}")


def _short(keyid: str, listed: Iterable[str] = ()) -> str:
    """The first 12 characters of `keyid`, or all of it when a listed key shares them (a
    key id altered after its prefix would otherwise read as the listed key's)."""
    prefix = keyid[:12]
    if any(other != keyid and other[:12] == prefix for other in listed):
        return keyid
    return prefix
