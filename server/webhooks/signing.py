"""How an event is signed: HMAC-SHA256 of "<timestamp>.<body>" under the webhook secret.

The timestamp is signed with the body, so a receiver that refuses old
timestamps refuses replayed requests too (docs/server.md shows a receiver).
"""

from __future__ import annotations

import hashlib
import hmac

EVENT_HEADER = "X-Edgefleet-Event"
DELIVERY_HEADER = "X-Edgefleet-Delivery"
SIGNATURE_HEADER = "X-Edgefleet-Signature"
TIMESTAMP_HEADER = "X-Edgefleet-Timestamp"


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: "sha256=" and the hex HMAC of "<timestamp>.<body>"."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def signed_headers(
    secret: bytes, event: str, delivery_id: int, timestamp: int, body: bytes
) -> dict[str, str]:
    """Every header of one delivery's POST."""
    return {
        "Content-Type": "application/json",
        EVENT_HEADER: event,
        DELIVERY_HEADER: str(delivery_id),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        TIMESTAMP_HEADER: str(timestamp),
    }


__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "signature",
    "signed_headers",
]
