"""Bundles: push (operator), list, show and download (viewer).

A push streams the request body into an upload file (never all in memory),
refusing more than `settings.max_bundle_bytes` with 413, then hands it to
`BundleStore.push`, which verifies the release signature and every file
before anything is stored, and audits the push. 201: stored now; 200: the
identical bundle was stored already; 409: other bytes under that name and
version; 422 with the refusal code (bad-signature, tampered-file, ...): not a
bundle the trust root's release role signed.
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path, Query, Request, status
from fastapi.responses import JSONResponse, StreamingResponse

from edgefleet.bundle.manifest import NAME_PATTERN
from edgefleet.semver import SEMVER_PATTERN
from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import BodyTooLargeError, errors
from edgefleet.server.api.routes.blobs import FILE_RESPONSES, RangeHeader, ranged_file_response
from edgefleet.server.api.schemas.bundles import BundlePublic
from edgefleet.server.api.uploads import receive_upload
from edgefleet.server.context import ServerContext
from edgefleet.server.errors import InvalidRequestError
from edgefleet.server.principals import Principal
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/bundles", tags=["bundles"])

BundleName = Annotated[str, Path(pattern=NAME_PATTERN)]
BundleVersion = Annotated[str, Path(pattern=SEMVER_PATTERN, max_length=64)]

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _store(context: ServerContext, upload: FilePath, actor: Principal) -> tuple[BundlePublic, bool]:
    with context.db.session() as session:
        row, created = context.bundles.push(session, upload, actor)
        public = BundlePublic.model_validate(row)
    return public, created


def _declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise InvalidRequestError(f"Content-Length {declared[:40]!r} is not a number")
    if int(declared) > limit:
        raise BodyTooLargeError(
            f"the bundle is {declared} bytes; this server takes at most {limit}"
        )


@router.post(
    "",
    response_model=BundlePublic,
    status_code=status.HTTP_201_CREATED,
    summary="Push a signed bundle (the raw .efb file as the body)",
    responses={**errors(409, 413), 200: {"model": BundlePublic, "description": "already stored"}},
    openapi_extra=_UPLOAD_BODY,
)
async def push_bundle(request: Request, context: ContextDep, operator: OperatorDep) -> JSONResponse:
    limit = context.settings.max_bundle_bytes
    _declared_length(request, limit)
    upload = await receive_upload(request, context, limit, "bundle", allow_empty=False)
    public, created = await to_thread.run_sync(_store, context, upload, operator)
    return JSONResponse(
        public.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
    )


@router.get(
    "",
    response_model=list[BundlePublic],
    summary="Stored bundles, newest push first",
    responses=errors(),
)
def list_bundles(
    context: ContextDep,
    session: SessionDep,
    _viewer: ViewerDep,
    name: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
) -> list[BundlePublic]:
    return [BundlePublic.model_validate(row) for row in context.bundles.list(session, name)]


@router.get(
    "/{name}/{version}",
    response_model=BundlePublic,
    summary="One bundle and its manifest summary",
    responses=errors(404),
)
def get_bundle(
    name: BundleName,
    version: BundleVersion,
    context: ContextDep,
    session: SessionDep,
    _viewer: ViewerDep,
) -> BundlePublic:
    return BundlePublic.model_validate(context.bundles.get(session, name, version))


@router.get(
    "/{name}/{version}/file",
    response_class=StreamingResponse,
    summary="Download a bundle's file (Range supported)",
    responses={**errors(), **FILE_RESPONSES},
)
def get_bundle_file(
    name: BundleName,
    version: BundleVersion,
    context: ContextDep,
    session: SessionDep,
    _viewer: ViewerDep,
    range_header: RangeHeader = None,
) -> StreamingResponse:
    row = context.bundles.get(session, name, version)
    return ranged_file_response(context.bundles.path_of(row), range_header, row.sha256)
