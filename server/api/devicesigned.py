"""Requests a device signs with its enrolled key instead of an API token.

A device-signed request (`edgefleet.samplewire`: an upload of raw inputs;
`edgefleet.certwire`: a certificate renewal) carries signed metadata in a
header. Checked in this order, before the body is read: the device (404 when
it is not enrolled), the signature (401 when it is missing or does not verify),
the metadata (422), its date against the replay window (401).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from anyio import to_thread
from fastapi import Request
from pydantic import ValidationError
from sqlalchemy import select

from edgefleet.errors import DeviceSignatureError, UsageError
from edgefleet.mqtt import is_valid_device_id
from edgefleet.samplewire import MAX_META_BYTES, META_HEADER, SIGNATURE_HEADER, verify_request
from edgefleet.server.context import ServerContext
from edgefleet.server.db.models import Device
from edgefleet.server.errors import AuthError, InvalidRequestError, NotFoundError
from edgefleet.timefmt import parse_time
from edgefleet.validation import describe_validation_error


class SignedMeta(Protocol):
    @property
    def device_id(self) -> str: ...

    @property
    def sent_at(self) -> str: ...


Meta = TypeVar("Meta", bound=SignedMeta)


def _public_key(context: ServerContext, device_id: str) -> str | None:
    with context.db.session() as session:
        return session.scalar(select(Device.public_key).where(Device.id == device_id))


async def verified_meta(
    request: Request,
    context: ServerContext,
    device_id: str,
    path: str,
    parse: Callable[[bytes], Meta],
) -> Meta:
    """The request's metadata, once the device's signature over it for `path` and its date
    are checked."""
    public_key = None
    if is_valid_device_id(device_id):
        public_key = await to_thread.run_sync(_public_key, context, device_id)
    if public_key is None:
        raise NotFoundError(f"no enrolled device {device_id[:128]!r}")
    meta = request.headers.get(META_HEADER, "").encode("utf-8", "replace")
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not meta or not signature:
        raise AuthError(f"this request needs the {META_HEADER} and {SIGNATURE_HEADER} headers")
    if len(meta) > MAX_META_BYTES:
        raise InvalidRequestError(f"{META_HEADER} exceeds {MAX_META_BYTES} bytes")
    try:
        verify_request(path, meta, signature, public_key)
    except (DeviceSignatureError, UsageError) as exc:
        raise AuthError(f"the request's signature does not verify: {exc}") from exc
    try:
        parsed = parse(meta)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc, META_HEADER)) from exc
    if parsed.device_id != device_id:
        raise InvalidRequestError(f"the request names device {parsed.device_id}, not {device_id}")
    now = context.clock()
    sent = parse_time(parsed.sent_at)
    settings = context.settings
    if not now - settings.sample_replay_window <= sent <= now + settings.max_clock_ahead:
        raise AuthError(
            f"the request is dated {parsed.sent_at}, outside this server's replay window "
            f"({settings.sample_replay_window} back): send it again, newly signed, or set "
            "the device's clock"
        )
    return parsed


__all__ = ["verified_meta"]
