"""Ed25519 keys: generation, key ids, and their files on disk.

A private key file is PKCS#8 PEM, mode 0600, optionally passphrase-encrypted.
A public key file is SubjectPublicKeyInfo PEM. A key id is the SHA-256 of the
canonical JSON of the public key's description, so it names the key itself,
not a file or a label.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from edgefleet.canonical import canonical_json
from edgefleet.errors import KeyFileError
from edgefleet.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

# Signatures are verified with PyNaCl (libsodium); keys are generated, used to
# sign and read from and written to files with `cryptography`. A device only
# verifies: it never imports `cryptography`, which costs over 6 MiB of memory
# against about 1 MiB for PyNaCl (docs/adr/0004-verification-with-libsodium.md).
# Both implement RFC 8032 Ed25519; libsodium is the stricter verifier.


class PublicKey(BaseModel):
    """The description of a public key as it appears in the trust root."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keytype: Literal["ed25519"] = "ed25519"
    scheme: Literal["ed25519"] = "ed25519"
    public: str

    @field_validator("public")
    @classmethod
    def _is_32_bytes_hex(cls, value: str) -> str:
        if len(value) != 64 or value != value.lower():
            raise ValueError("an Ed25519 public key is 64 lowercase hex digits")
        bytes.fromhex(value)
        return value

    @property
    def keyid(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump())).hexdigest()

    def is_valid_signature(self, signature: bytes, data: bytes) -> bool:
        """True when `signature` is this key's signature over exactly `data`."""
        from nacl.exceptions import BadSignatureError
        from nacl.exceptions import ValueError as NaclValueError
        from nacl.signing import VerifyKey

        try:
            VerifyKey(bytes.fromhex(self.public)).verify(data, signature)
        except (BadSignatureError, NaclValueError):
            return False
        return True

    @classmethod
    def from_cryptography(cls, key: Ed25519PublicKey) -> PublicKey:
        from cryptography.hazmat.primitives import serialization

        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(public=raw.hex())


@dataclass(frozen=True)
class SigningKey:
    """A private key with its public description and key id."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> PublicKey:
        return PublicKey.from_cryptography(self.private.public_key())

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def save_private_key(path: Path, key: SigningKey, passphrase: bytes | None = None) -> None:
    """Write `key` to `path` atomically with mode 0600, encrypted when a passphrase is given."""
    from cryptography.hazmat.primitives import serialization

    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    atomic_write_bytes(path, pem, mode=0o600)


def save_public_key(path: Path, key: PublicKey) -> None:
    """Write the public half as SubjectPublicKeyInfo PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key.public))
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(path, pem)


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc


def load_private_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Read an Ed25519 private key file.

    Raises:
        KeyFileError: unreadable, not an Ed25519 private key, or a wrong or missing passphrase.
    """
    from cryptography.hazmat.primitives import serialization

    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as exc:
        if passphrase:
            raise KeyFileError(f"{path} is not encrypted: do not pass a passphrase") from exc
        raise KeyFileError(
            f"{path} is passphrase-encrypted: pass --passphrase-env VAR naming an "
            "environment variable that holds the passphrase"
        ) from exc
    except ValueError as exc:
        if passphrase and b"ENCRYPTED" in data:
            raise KeyFileError(f"wrong passphrase for {path}") from exc
        raise KeyFileError(f"{path} is not a PEM private key") from exc
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return SigningKey(key)


def load_public_key(path: Path) -> PublicKey:
    """Read an Ed25519 public key file (a private key file is accepted too).

    Raises:
        KeyFileError: unreadable or not an Ed25519 key.
    """
    from cryptography.hazmat.primitives import serialization

    data = _read(path)
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key") from exc
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return PublicKey.from_cryptography(key)
