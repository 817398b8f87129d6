"""Benchmarks: an operator uploads a signed benchmark request for devices of its profile
(audited `benchmark.request`); devices download it (no token) and upload their results
signed with their key; viewers read the results."""

from __future__ import annotations

import hashlib
from pathlib import Path as FilePath
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from edgefleet.benchwire import MAX_RESULTS_BYTES, BenchmarkResults, ResultsUpload, results_path
from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.devicesigned import verified_meta
from edgefleet.server.api.errors import BodyTooLargeError, errors
from edgefleet.server.api.routes.blobs import FILE_RESPONSES, RangeHeader, ranged_file_response
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.api.schemas.benchmarks import BenchmarkPublic
from edgefleet.server.api.uploads import receive_upload
from edgefleet.server.benchmarks import (
    Target,
    create_benchmark,
    get_benchmark,
    record_results,
    request_file,
)
from edgefleet.server.context import ServerContext
from edgefleet.server.errors import ConflictError, InvalidRequestError
from edgefleet.server.principals import Principal
from edgefleet.validation import describe_validation_error
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=API_PREFIX, tags=["benchmarks"])

BenchmarkId = Annotated[int, Path(ge=1, le=MAX_ID)]

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _target(device: str | None, tag: str | None) -> Target:
    if (device is None) == (tag is None):
        raise InvalidRequestError("name where to measure: device=ID or tag=KEY=VALUE, one of them")
    if tag is not None:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"tag {tag[:80]!r}: expected KEY=VALUE")
        return Target(tag=(key, value))
    return Target(device_id=device)


def _create(
    context: ServerContext, upload: FilePath, target: Target, operator: Principal
) -> BenchmarkPublic:
    issuer = context.issuer
    assert issuer is not None
    with context.db.session() as session:
        now = context.clock()
        benchmark = create_benchmark(
            session,
            context.settings.data_dir,
            context.bundles.trust,
            issuer,
            context.publisher,
            upload,
            target,
            operator,
            now,
        )
        _, results = get_benchmark(session, benchmark.id)
        return BenchmarkPublic.of(benchmark, results, now)


@router.post(
    "/benchmarks",
    response_model=BenchmarkPublic,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Measure the candidates of a signed benchmark request on devices of its profile",
    description=(
        "The body is the request the converter built (`edgefleet convert --measure-on`), "
        "signed by the release key; `device` or `tag` names where to measure it: online "
        "devices of the request's profile. Each gets a signed benchmark directive; read the "
        "results with GET."
    ),
    responses=errors(404, 409, 413),
    openapi_extra=_UPLOAD_BODY,
)
async def post_benchmark(
    request: Request,
    context: ContextDep,
    operator: OperatorDep,
    device: Annotated[str | None, Query(max_length=128)] = None,
    tag: Annotated[str | None, Query(max_length=256)] = None,
) -> BenchmarkPublic:
    target = _target(device, tag)
    if context.issuer is None:
        raise ConflictError("this server holds no server key: it cannot sign directives")
    limit = context.settings.max_bundle_bytes
    upload = await receive_upload(request, context, limit, "benchmark request", allow_empty=False)
    return await to_thread.run_sync(_create, context, upload, target, operator)


@router.get(
    "/benchmarks/{benchmark_id}",
    response_model=BenchmarkPublic,
    summary="A benchmark and what each device measured",
    responses=errors(404),
)
def get_benchmark_results(
    benchmark_id: BenchmarkId, context: ContextDep, session: SessionDep, _viewer: ViewerDep
) -> BenchmarkPublic:
    benchmark, results = get_benchmark(session, benchmark_id)
    return BenchmarkPublic.of(benchmark, results, context.clock())


@router.get(
    "/benchmarks/{benchmark_id}/request",
    response_class=StreamingResponse,
    summary="Download a benchmark request (devices; no token, Range supported)",
    responses=FILE_RESPONSES,
)
def get_benchmark_request(
    benchmark_id: BenchmarkId,
    context: ContextDep,
    session: SessionDep,
    range_header: RangeHeader = None,
) -> StreamingResponse:
    # No token, as for bundles: the device verifies the release signature and the digest
    # the signed directive names; the request holds models, which are not secret.
    benchmark, _ = get_benchmark(session, benchmark_id)
    path = request_file(context.settings.data_dir, benchmark)
    return ranged_file_response(path, range_header, benchmark.sha256)


def _record(
    context: ServerContext, benchmark_id: int, device_id: str, results: BenchmarkResults
) -> None:
    with context.db.session() as session:
        record_results(session, benchmark_id, device_id, results, context.clock())


@router.post(
    "/devices/{device_id}/benchmarks/{benchmark_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="A device uploads what it measured (JSON), signed with its key",
    responses=errors(404, 409, 413),
)
async def post_benchmark_results(
    request: Request,
    context: ContextDep,
    device_id: Annotated[str, Path(max_length=128)],
    benchmark_id: BenchmarkId,
) -> None:
    meta = await verified_meta(
        request,
        context,
        device_id,
        results_path(device_id, benchmark_id),
        ResultsUpload.model_validate_json,
    )
    if meta.benchmark_id != benchmark_id:
        raise InvalidRequestError(f"the upload names benchmark {meta.benchmark_id}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_RESULTS_BYTES:
            raise BodyTooLargeError(f"the results exceed {MAX_RESULTS_BYTES} bytes")
    if len(body) != meta.size_bytes or hashlib.sha256(body).hexdigest() != meta.sha256:
        raise InvalidRequestError("the body is not the one the signed metadata names")
    try:
        results = BenchmarkResults.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc, "results")) from exc
    if results.device_id != device_id:
        raise InvalidRequestError(f"the results name device {results.device_id}")
    await to_thread.run_sync(_record, context, benchmark_id, device_id, results)
