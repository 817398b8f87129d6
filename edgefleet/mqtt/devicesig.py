"""Device signatures: how the server knows a message comes from the device it names.

Every device-to-server message (status, heartbeat, telemetry, block request)
travels in a frame signed with the device's own Ed25519 key, the one it
enrolled with the fleet server:

    b"EFS1 " + 128 lowercase hex digits of the signature + b"\\n" + message bytes

The signature covers

    b"edgefleet/v1 device-message\\n" + topic (UTF-8) + b"\\n" + message bytes

so it binds the message to its topic: a frame copied to another device's
subtree, or from the status to the telemetry topic, does not verify. The fixed
prefix keeps a device signature from ever being passed off as a signature of
another kind (the document signatures of `edgefleet.signing` cover canonical
JSON, which never starts with it).

Invariants: `verify_device_payload` returns the message bytes only when the
signature of the given public key over exactly this topic and these bytes
verifies; it raises `DeviceSignatureError` for everything else, including a
payload that is not a frame at all (an unsigned message from a device that
must sign). It does no I/O; the caller looks the key up. A signature does not
stop a replay of the device's own earlier messages by someone on the path:
status reports carry a sequence number and telemetry windows their start
time, which the server deduplicates.

PyNaCl (libsodium) only: a device signs here and never loads `cryptography`
(ADR 0004). One verification costs about 60 us.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.errors import DeviceSignatureError, KeyFileError, MessageSchemaError, UsageError
from edgefleet.fileio import atomic_write_bytes

if TYPE_CHECKING:
    import nacl.signing

FRAME_MAGIC = b"EFS1 "
SIGNING_CONTEXT = b"edgefleet/v1 device-message\n"
SIGNATURE_HEX_LENGTH = 128
# What a frame adds to a message: the magic, the signature in hex and the newline.
FRAME_OVERHEAD = len(FRAME_MAGIC) + SIGNATURE_HEX_LENGTH + 1
SEED_BYTES = 32
# Verify keys kept ready, by public key: a server checks every message of every device.
VERIFY_KEY_CACHE_SIZE = 16_384

_SIGNATURE_HEX = re.compile(rb"[0-9a-f]{128}")
_PUBLIC_HEX = re.compile(r"[0-9a-f]{64}")
_NEWLINE = ord("\n")


class DeviceKey:
    """A device's Ed25519 signing key; on disk, its raw 32-byte seed (mode 0600)."""

    __slots__ = ("_key",)

    def __init__(self, key: nacl.signing.SigningKey) -> None:
        self._key = key

    def __repr__(self) -> str:
        return f"DeviceKey(public={self.public_hex[:12]}...)"

    @classmethod
    def generate(cls) -> DeviceKey:
        """A new key from the operating system's random source."""
        from nacl.signing import SigningKey

        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> DeviceKey:
        """Raises: UsageError when `seed` is not 32 bytes."""
        from nacl.signing import SigningKey

        if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
            raise UsageError(f"a device key seed is {SEED_BYTES} bytes")
        return cls(SigningKey(bytes(seed)))

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        """Read the key at `path`.

        Raises:
            KeyFileError: missing, unreadable, not 32 bytes, or readable by others
                than its owner (a key others could read may be someone else's too).
        """
        path = Path(path)
        try:
            with open(path, "rb") as handle:
                mode = os.fstat(handle.fileno()).st_mode
                seed = handle.read(SEED_BYTES + 1)
        except OSError as exc:
            raise KeyFileError(f"cannot read device key {path}: {exc.strerror}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"device key {path} is accessible to group or others (mode "
                f"{stat.S_IMODE(mode):o}): chmod 600 it, or remove it to enroll a new key"
            )
        if len(seed) != SEED_BYTES:
            raise KeyFileError(
                f"device key {path} holds {len(seed)} bytes, not a {SEED_BYTES}-byte seed"
            )
        return cls.from_seed(seed)

    def save(self, path: Path) -> None:
        """Write the seed to `path` atomically, mode 0600 (replacing what was there)."""
        atomic_write_bytes(Path(path), bytes(self._key), mode=0o600)

    @property
    def public_hex(self) -> str:
        """The public key as 64 lowercase hex digits (what the device enrolls with)."""
        return bytes(self._key.verify_key).hex()

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature over exactly `data`."""
        return bytes(self._key.sign(bytes(data)).signature)


def device_signed_bytes(topic: str, payload: bytes) -> bytes:
    """The bytes a device signature covers: context, topic and message.

    Raises:
        UsageError: `topic` is not a string or holds a newline.
    """
    if not isinstance(topic, str) or "\n" in topic:
        raise UsageError(f"topic {topic!r} cannot be signed")
    return SIGNING_CONTEXT + topic.encode("utf-8") + b"\n" + bytes(payload)


def sign_device_payload(topic: str, payload: bytes, key: DeviceKey) -> bytes:
    """The signed frame to publish on `topic` for the message bytes `payload`.

    Raises:
        UsageError: `topic` cannot be signed (see `device_signed_bytes`).
    """
    signature = key.sign(device_signed_bytes(topic, payload))
    return FRAME_MAGIC + signature.hex().encode("ascii") + b"\n" + bytes(payload)


def is_device_frame(payload: bytes) -> bool:
    """True when `payload` starts like a signed frame (says nothing of the signature)."""
    return bytes(payload[: len(FRAME_MAGIC)]) == FRAME_MAGIC


def split_device_frame(frame: bytes) -> tuple[bytes, bytes]:
    """Split a frame into its (64-byte signature, message bytes), checking the layout only.

    Raises:
        MessageSchemaError: not bytes, no `EFS1 ` magic, a signature that is not
            128 lowercase hex digits, or no newline after it.
    """
    if not isinstance(frame, (bytes, bytearray)):
        raise MessageSchemaError(f"device frame is a {type(frame).__name__}, not bytes")
    if not frame.startswith(FRAME_MAGIC):
        raise MessageSchemaError("payload is not a signed device frame (no EFS1 prefix)")
    start = len(FRAME_MAGIC)
    end = start + SIGNATURE_HEX_LENGTH
    if len(frame) < end + 1:
        raise MessageSchemaError(f"device frame is truncated ({len(frame)} bytes)")
    if not _SIGNATURE_HEX.fullmatch(frame, start, end):
        raise MessageSchemaError("device frame signature is not 128 lowercase hex digits")
    if frame[end] != _NEWLINE:
        raise MessageSchemaError("device frame has no newline after its signature")
    return bytes.fromhex(frame[start:end].decode("ascii")), bytes(frame[end + 1 :])


def verify_device_payload(topic: str, frame: bytes, public_key_hex: str) -> bytes:
    """The message bytes of `frame`, once the device's key is shown to have signed them for
    `topic`.

    Raises:
        DeviceSignatureError: not a frame (an unsigned or cut message), or the
            signature does not verify under `public_key_hex` for this topic and
            these bytes (another device's key, another topic, changed bytes).
        UsageError: `public_key_hex` is not 64 lowercase hex digits (the caller's
            key store is broken, not the message).
    """
    if not isinstance(public_key_hex, str):
        raise UsageError("a device public key is 64 lowercase hex digits")
    key = _verify_key(public_key_hex)
    try:
        signature, payload = split_device_frame(frame)
        signed = device_signed_bytes(topic, payload)
    except (MessageSchemaError, UsageError) as exc:
        raise DeviceSignatureError(f"message on {topic!r} is not signed: {exc}") from exc
    try:
        key.verify(signed, signature)
    except Exception as exc:
        # Imported on failure only: the success path needs no more than the cached key.
        from nacl.exceptions import BadSignatureError
        from nacl.exceptions import ValueError as NaclValueError

        if not isinstance(exc, (BadSignatureError, NaclValueError)):
            raise
        raise DeviceSignatureError(
            f"the signature on {topic!r} does not verify under the device's enrolled key "
            f"{public_key_hex[:12]}: another key signed it, or it was changed or moved"
        ) from exc
    return payload


@functools.lru_cache(maxsize=VERIFY_KEY_CACHE_SIZE)
def _verify_key(public_key_hex: str) -> nacl.signing.VerifyKey:
    """The verify key of 64 lowercase hex digits (cached; a refusal is not).

    Raises:
        UsageError: not 64 lowercase hex digits.
    """
    if not _PUBLIC_HEX.fullmatch(public_key_hex):
        raise UsageError("a device public key is 64 lowercase hex digits")
    from nacl.signing import VerifyKey

    return VerifyKey(bytes.fromhex(public_key_hex))


def is_valid_public_key(public_key_hex: str) -> bool:
    """True when `public_key_hex` is 64 lowercase hex digits naming a usable Ed25519 key.

    Refuses points that are not on the curve and small-order points, whose
    signatures libsodium would refuse anyway: an enrollment with one could never
    be used.
    """
    if not isinstance(public_key_hex, str) or not _PUBLIC_HEX.fullmatch(public_key_hex):
        return False
    from nacl.bindings import crypto_core_ed25519_is_valid_point

    return bool(crypto_core_ed25519_is_valid_point(bytes.fromhex(public_key_hex)))
