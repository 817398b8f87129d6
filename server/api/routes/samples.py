"""Raw inputs devices kept while they flagged drift: upload (the device), list (viewer),
download (operator, audited).

The upload carries no API token: the device signs its metadata with its
enrolled key (`edgefleet.samplewire`). Checked in this order, before the body
is read: the device (404 when it is not enrolled), the signature (401 when it
is missing or does not verify), the metadata (422), its date against the replay window (401), the
declared size (413); then the body is streamed to a temporary file, refused
beyond `settings.max_sample_bytes` (413), and `edgefleet.server.samples`
checks and stores it (201, or 200 for a file of this device stored already).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path as FilePath
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path, Query, Request, status
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import select

from edgefleet.errors import DeviceSignatureError, UsageError
from edgefleet.mqtt import is_valid_device_id
from edgefleet.samplewire import (
    MAX_META_BYTES,
    META_HEADER,
    SIGNATURE_HEADER,
    SampleUpload,
    verify_upload,
)
from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import BodyTooLargeError, errors
from edgefleet.server.api.routes.blobs import FILE_RESPONSES, ranged_file_response
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.api.schemas.samples import SamplePublic
from edgefleet.server.api.uploads import receive_upload
from edgefleet.server.audit import record_audit
from edgefleet.server.context import ServerContext
from edgefleet.server.db.models import Device
from edgefleet.server.errors import AuthError, InvalidRequestError, NotFoundError
from edgefleet.server.samples import (
    get_sample,
    list_samples,
    sample_path,
    store_sample,
)
from edgefleet.timefmt import parse_time
from edgefleet.validation import describe_validation_error
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=API_PREFIX, tags=["samples"])

SampleId = Annotated[int, Path(ge=1, le=MAX_ID)]

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _public_key(context: ServerContext, device_id: str) -> str | None:
    with context.db.session() as session:
        return session.scalar(select(Device.public_key).where(Device.id == device_id))


async def _verified_meta(request: Request, context: ServerContext, device_id: str) -> SampleUpload:
    """The upload's metadata, once the device's signature and its date are checked."""
    public_key = None
    if is_valid_device_id(device_id):
        public_key = await to_thread.run_sync(_public_key, context, device_id)
    if public_key is None:
        raise NotFoundError(f"no enrolled device {device_id[:128]!r}")
    meta = request.headers.get(META_HEADER, "").encode("utf-8", "replace")
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not meta or not signature:
        raise AuthError(
            f"an upload of samples needs the {META_HEADER} and {SIGNATURE_HEADER} headers"
        )
    if len(meta) > MAX_META_BYTES:
        raise InvalidRequestError(f"{META_HEADER} exceeds {MAX_META_BYTES} bytes")
    try:
        verify_upload(meta, signature, device_id, public_key)
    except (DeviceSignatureError, UsageError) as exc:
        raise AuthError(f"the upload's signature does not verify: {exc}") from exc
    try:
        upload = SampleUpload.model_validate_json(meta)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc, META_HEADER)) from exc
    if upload.device_id != device_id:
        raise InvalidRequestError(f"the upload names device {upload.device_id}, not {device_id}")
    now = context.clock()
    sent = parse_time(upload.sent_at)
    settings = context.settings
    if not now - settings.sample_replay_window <= sent <= now + settings.max_clock_ahead:
        raise AuthError(
            f"the upload is dated {upload.sent_at}, outside this server's replay window "
            f"({settings.sample_replay_window} back): send it again, newly signed, or set "
            "the device's clock"
        )
    return upload


def _store(
    context: ServerContext, upload: FilePath, meta: SampleUpload, now: dt.datetime
) -> tuple[SamplePublic, bool]:
    with context.db.session() as session:
        row, created = store_sample(session, context.settings.data_dir, upload, meta, now)
        public = SamplePublic.model_validate(row)
    return public, created


@router.post(
    "/devices/{device_id}/samples",
    response_model=SamplePublic,
    status_code=status.HTTP_201_CREATED,
    summary="A device uploads raw inputs it kept (an .npz), signed with its key",
    responses={**errors(404, 413), 200: {"model": SamplePublic, "description": "stored already"}},
    openapi_extra=_UPLOAD_BODY,
)
async def upload_samples(
    request: Request, context: ContextDep, device_id: Annotated[str, Path(max_length=128)]
) -> JSONResponse:
    meta = await _verified_meta(request, context, device_id)
    limit = context.settings.max_sample_bytes
    if meta.size_bytes > limit:
        raise BodyTooLargeError(f"the upload is {meta.size_bytes} bytes; this server takes {limit}")
    upload = await receive_upload(request, context, limit, "upload")
    public, created = await to_thread.run_sync(_store, context, upload, meta, context.clock())
    return JSONResponse(
        public.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
    )


@router.get(
    "/samples",
    response_model=list[SamplePublic],
    summary="Uploaded raw inputs, newest first (metadata only)",
    responses=errors(),
)
def get_samples(
    session: SessionDep,
    _viewer: ViewerDep,
    device: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> list[SamplePublic]:
    rows = list_samples(session, device, limit, offset)
    return [SamplePublic.model_validate(row) for row in rows]


@router.get(
    "/samples/{sample_id}",
    response_class=StreamingResponse,
    summary="Download uploaded raw inputs (.npz; operator; audited: sensitive data)",
    responses={**errors(), **FILE_RESPONSES},
)
def get_sample_file(
    sample_id: SampleId, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> StreamingResponse:
    row = get_sample(session, sample_id)
    details = {"device_id": row.device_id, "sha256": row.sha256}
    record_audit(session, operator, "samples.download", f"samples {row.id}", details)
    return ranged_file_response(sample_path(context.settings.data_dir, row), None, row.sha256)
