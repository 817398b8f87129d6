"""Raw inputs devices kept while they flagged drift: upload (the device), list (viewer),
download (operator, audited).

The upload carries no API token: the device signs its metadata with its
enrolled key (`edgefleet.samplewire`). Checked in this order, before the body
is read: the device signature, metadata and date (`edgefleet.server.api.devicesigned`), the
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

from edgefleet.samplewire import SampleUpload, samples_path
from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.devicesigned import verified_meta
from edgefleet.server.api.errors import BodyTooLargeError, errors
from edgefleet.server.api.routes.blobs import FILE_RESPONSES, ranged_file_response
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.api.schemas.samples import SamplePublic
from edgefleet.server.api.uploads import receive_upload
from edgefleet.server.audit import record_audit
from edgefleet.server.context import ServerContext
from edgefleet.server.samples import (
    get_sample,
    list_samples,
    sample_path,
    store_sample,
)
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=API_PREFIX, tags=["samples"])

SampleId = Annotated[int, Path(ge=1, le=MAX_ID)]

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


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
    meta = await verified_meta(
        request, context, device_id, samples_path(device_id), SampleUpload.model_validate_json
    )
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
