"""The upload of a device's raw inputs: what the agent sends and the fleet server verifies.

    POST /api/v1/devices/{device_id}/samples
    X-Edgefleet-Sample:    the metadata, compact JSON (`SampleUpload`)
    X-Edgefleet-Signature: 128 hex digits, the device's signature over the metadata
    body:                  the .npz file (application/octet-stream)

The signature is a device signature (`edgefleet.mqtt.devicesig`) over the
metadata bytes with the request's path in place of a topic, so it binds the
upload to this device's route. The metadata names the body's SHA-256 and size,
so the signature covers the file too. `sent_at` bounds a replay: the server
refuses an upload dated outside its replay window, and stores a file it has
already (same device, same SHA-256) once.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.mqtt.devicesig import (
    FRAME_MAGIC,
    DeviceKey,
    device_signed_bytes,
    verify_device_payload,
)
from edgefleet.validation import Timestamp
from edgefleet.wire import API_PREFIX

META_HEADER = "X-Edgefleet-Sample"
SIGNATURE_HEADER = "X-Edgefleet-Signature"
MAX_META_BYTES = 2048


class SampleUpload(BaseModel):
    """The metadata of one uploaded file of raw inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    device_id: str = Field(max_length=128)
    bundle_name: str = Field(max_length=128)
    bundle_version: str = Field(max_length=64)
    reason: str = Field(max_length=512)  # the device's drift verdict when it began keeping them
    samples: int = Field(ge=1)
    captured_at: Timestamp
    sent_at: Timestamp
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=1)


def samples_path(device_id: str) -> str:
    return f"{API_PREFIX}/devices/{device_id}/samples"


def sign_request(path: str, meta: bytes, key: DeviceKey) -> str:
    """The signature header's value for the metadata bytes `meta` of a request to `path`."""
    return key.sign(device_signed_bytes(path, meta)).hex()


def verify_request(path: str, meta: bytes, signature_hex: str, public_key_hex: str) -> None:
    """Raises: DeviceSignatureError when the device's key did not sign `meta` for `path`."""
    frame = FRAME_MAGIC + signature_hex.encode("ascii", "replace") + b"\n" + meta
    verify_device_payload(path, frame, public_key_hex)


def sign_upload(meta: bytes, device_id: str, key: DeviceKey) -> str:
    """The signature header's value for the metadata bytes `meta` of an upload."""
    return sign_request(samples_path(device_id), meta, key)


def verify_upload(meta: bytes, signature_hex: str, device_id: str, public_key_hex: str) -> None:
    """Raises: DeviceSignatureError when the device's key did not sign `meta` for its route."""
    verify_request(samples_path(device_id), meta, signature_hex, public_key_hex)
