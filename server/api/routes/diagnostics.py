"""Diagnostics on request: an operator asks a device for its recent log lines and status
(audited `device.diagnose`); viewers read the device's recent requests and answers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from edgefleet.mqtt import is_valid_device_id
from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.diagnostics import DiagnosticsList, DiagnosticsRequestPublic
from edgefleet.server.devices import get_device
from edgefleet.server.diagnostics import MAX_LISTED, diagnostics_for, request_diagnostics
from edgefleet.server.errors import ConflictError, NotFoundError
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/devices", tags=["devices"])

DeviceIdPath = Annotated[str, Path(max_length=128)]


@router.post(
    "/{device_id}/diagnostics",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DiagnosticsRequestPublic,
    summary="Ask a device for its recent log lines and status",
    description=(
        "Sends the device a signed diagnostics directive. The answer arrives over MQTT "
        "and is read with GET; a device offline gets the directive from its broker "
        "session when it connects, until the request expires (`diagnostics_ttl`). "
        "`state` is `failed` when the broker did not take the directive."
    ),
    responses=errors(404, 409),
)
def post_diagnostics(
    device_id: DeviceIdPath,
    context: ContextDep,
    session: SessionDep,
    operator: OperatorDep,
) -> DiagnosticsRequestPublic:
    if not is_valid_device_id(device_id):
        raise NotFoundError(f"no device {device_id[:128]!r}")
    if context.issuer is None:
        raise ConflictError("this server holds no server key: it cannot sign directives")
    now = context.clock()
    request = request_diagnostics(
        session, context.issuer, context.publisher, device_id, operator, now
    )
    return DiagnosticsRequestPublic.of(request, now)


@router.get(
    "/{device_id}/diagnostics",
    response_model=DiagnosticsList,
    summary="A device's recent diagnostics requests, with their answers",
    responses=errors(404),
)
def get_diagnostics(
    device_id: DeviceIdPath,
    context: ContextDep,
    session: SessionDep,
    _viewer: ViewerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LISTED)] = 5,
) -> DiagnosticsList:
    if not is_valid_device_id(device_id):
        raise NotFoundError(f"no device {device_id[:128]!r}")
    get_device(session, device_id)
    now = context.clock()
    return DiagnosticsList(
        items=[
            DiagnosticsRequestPublic.of(r, now) for r in diagnostics_for(session, device_id, limit)
        ]
    )
