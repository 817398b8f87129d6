"""GET /blobs/{sha256}: bundle bytes by digest, for devices (no token; Range resume).

No token is needed: a device downloads what a signed directive names by
SHA-256 and length, and verifies the bytes and the release signature itself,
so serving them to anyone reveals only bundles (which are not secret) to
someone who already knows their digest. Only digests of stored bundles (a
`BundleRow`) are served: a file a failed push left behind is a 404.

Answers: 200 with the whole file, 206 with `Content-Range: bytes a-b/len` for
one satisfiable range, 416 with `Content-Range: bytes */len` otherwise
(`edgefleet.server.ranges`). Every answer says `Accept-Ranges: bytes`.
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path
from fastapi.responses import StreamingResponse

from edgefleet.server.api.deps import ContextDep, SessionDep
from edgefleet.server.api.errors import ErrorBody
from edgefleet.server.errors import NotFoundError, StorageError
from edgefleet.server.ranges import content_range, iter_file, parse_range
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/blobs", tags=["bundles"])

FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "the whole file",
    },
    206: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "the requested range (Content-Range says which)",
    },
    404: {"model": ErrorBody},
    422: {"model": ErrorBody, "description": "not a SHA-256"},
    416: {"model": ErrorBody, "description": "the Range cannot be satisfied"},
}

RangeHeader = Annotated[
    str | None,
    Header(alias="Range", description="one byte range: bytes=a-b, bytes=a- or bytes=-n"),
]


def ranged_file_response(
    path: FilePath, range_header: str | None, sha256: str
) -> StreamingResponse:
    """The file at `path` (or the one range asked for) as a streamed answer.

    Raises:
        RangeNotSatisfiableError: a malformed or unsatisfiable Range (416).
        StorageError: the file cannot be read (503).
    """
    try:
        length = path.stat().st_size
    except OSError as exc:
        raise StorageError(f"cannot read bundle {sha256}: {exc}") from exc
    span = parse_range(range_header, length)
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
    if span is None:
        start, end, status = 0, length - 1, 200
    else:
        (start, end), status = span, 206
        headers["Content-Range"] = content_range(start, end, length)
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(
        iter_file(path, start, end),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )


@router.get(
    "/{sha256}",
    response_class=StreamingResponse,
    summary="Download a stored bundle by its SHA-256 (no token; Range supported)",
    responses=FILE_RESPONSES,
)
def get_blob(
    sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
    context: ContextDep,
    session: SessionDep,
    range_header: RangeHeader = None,
) -> StreamingResponse:
    path = context.bundles.open_blob(session, sha256)
    if path is None:
        raise NotFoundError(f"no bundle with SHA-256 {sha256}")
    return ranged_file_response(path, range_header, sha256)
