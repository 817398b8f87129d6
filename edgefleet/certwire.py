"""The renewal of a device's client certificate: what the agent sends and the fleet server
verifies.

    POST /api/v1/devices/{device_id}/certificate
    X-Edgefleet-Sample:    the metadata, compact JSON (`CertificateRenewal`)
    X-Edgefleet-Signature: 128 hex digits, the device's signature over the metadata
    body:                  {"csr": "<PEM signing request>"} (application/json)

Signed like an upload of raw inputs (`edgefleet.samplewire`: the same headers,
the request's path in place of a topic, the same replay window on `sent_at`).
The metadata names the body's SHA-256, so the signature covers the request too.
The answer: {"certificate", "certificate_not_after", "ca_certificate"}.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.mqtt.devicesig import DeviceKey
from edgefleet.samplewire import META_HEADER, SIGNATURE_HEADER, sign_request
from edgefleet.timefmt import format_time, utcnow
from edgefleet.validation import Timestamp
from edgefleet.wire import API_PREFIX


class CertificateRenewal(BaseModel):
    """The signed metadata of a renewal request."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    device_id: str = Field(max_length=128)
    sent_at: Timestamp
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the request body


def certificate_path(device_id: str) -> str:
    return f"{API_PREFIX}/devices/{device_id}/certificate"


def renewal_request(device_id: str, csr_pem: bytes, key: DeviceKey) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a renewal request for the signing request `csr_pem`."""
    body = json.dumps({"csr": csr_pem.decode("ascii")}).encode()
    meta = CertificateRenewal(
        device_id=device_id,
        sent_at=format_time(utcnow()),
        sha256=hashlib.sha256(body).hexdigest(),
    )
    meta_bytes = json.dumps(meta.model_dump(), separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        META_HEADER: meta_bytes.decode(),
        SIGNATURE_HEADER: sign_request(certificate_path(device_id), meta_bytes, key),
    }
    return body, headers


__all__ = ["CertificateRenewal", "certificate_path", "renewal_request"]
