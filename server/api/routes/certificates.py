"""Devices' client certificates: renewal (the device, signed with its key), and the fleet CA's
certificate and revocation list (public: anyone may fetch them, e.g. a broker on another host).

Renewal (`edgefleet.certwire`) carries no API token: the device signs the
metadata with its enrolled key, checked like an upload of raw inputs
(`edgefleet.server.api.devicesigned`), and it is rate limited per address in
the enrollment bucket. It issues a new certificate; the older one stays valid
until it expires (the device switches on its next connection to the broker).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import ValidationError

from edgefleet.certwire import CertificateRenewal, certificate_path
from edgefleet.fleetca import FleetCa, IssuedCertificate
from edgefleet.server.api.deps import (
    ContextDep,
    EnrollLimitDep,
    LimiterDep,
    SessionDep,
    client_address,
)
from edgefleet.server.api.devicesigned import verified_meta
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.enroll import CertificateAnswer, CertificateRenewalRequest
from edgefleet.server.certificates import issue_device_certificate, revocation_list
from edgefleet.server.context import ServerContext
from edgefleet.server.db.models import Device
from edgefleet.server.errors import ConflictError, InvalidRequestError, NotFoundError
from edgefleet.validation import describe_validation_error
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=API_PREFIX, tags=["certificates"])

PEM_MEDIA_TYPE = "application/x-pem-file"
_PEM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {PEM_MEDIA_TYPE: {"schema": {"type": "string"}}}}
}


def limit_ca_reads(request: Request, limiter: LimiterDep) -> None:
    """Take a token from the caller's address bucket of CA reads (no token: throttled).

    Raises:
        RateLimitedError: the address asked too often.
    """
    limiter.check(f"ca:{client_address(request)}")


CaLimitDep = Annotated[None, Depends(limit_ca_reads)]


def certificate_answer(ca: FleetCa, issued: IssuedCertificate) -> CertificateAnswer:
    return CertificateAnswer(
        certificate=issued.pem.decode("ascii"),
        certificate_not_after=issued.not_after,
        ca_certificate=ca.certificate_pem.decode("ascii"),
    )


def _fleet_ca(context: ServerContext) -> FleetCa:
    if context.ca is None:
        raise ConflictError(
            "this server issues no certificates: it runs without a fleet CA (`server run --ca DIR`)"
        )
    return context.ca


@router.post(
    "/devices/{device_id}/certificate",
    response_model=CertificateAnswer,
    summary="A device renews its client certificate (signed with its key, no API token)",
    responses=errors(404, 409),
)
async def renew_certificate(
    request: Request,
    context: ContextDep,
    device_id: Annotated[str, Path(max_length=128)],
    _limit: EnrollLimitDep,
) -> CertificateAnswer:
    meta = await verified_meta(
        request,
        context,
        device_id,
        certificate_path(device_id),
        CertificateRenewal.model_validate_json,
    )
    ca = _fleet_ca(context)
    body = await request.body()
    if hashlib.sha256(body).hexdigest() != meta.sha256:
        raise InvalidRequestError("the request body is not the one its signed metadata names")
    try:
        renewal = CertificateRenewalRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation_error(exc, "body")) from exc
    issued = await to_thread.run_sync(_renew, context, ca, device_id, renewal.csr)
    return certificate_answer(ca, issued)


def _renew(context: ServerContext, ca: FleetCa, device_id: str, csr: str) -> IssuedCertificate:
    with context.db.session() as session:
        # Locked: a removal meanwhile waits, then revokes this certificate too.
        if session.get(Device, device_id, with_for_update=True) is None:
            raise NotFoundError(f"no enrolled device {device_id!r}")
        return issue_device_certificate(session, ca, device_id, csr, context.clock())


@router.get(
    "/ca/certificate",
    response_class=Response,
    summary="The fleet CA's certificate (PEM; public, no API token)",
    responses={**_PEM_RESPONSE, **errors(409)},
)
def get_ca_certificate(context: ContextDep, _limit: CaLimitDep) -> Response:
    return Response(_fleet_ca(context).certificate_pem, media_type=PEM_MEDIA_TYPE)


@router.get(
    "/ca/crl",
    response_class=Response,
    summary="The fleet CA's current certificate revocation list (PEM; public, no API token)",
    responses={**_PEM_RESPONSE, **errors(409)},
)
def get_crl(context: ContextDep, session: SessionDep, _limit: CaLimitDep) -> Response:
    pem = revocation_list(session, _fleet_ca(context), context.clock())
    return Response(pem, media_type=PEM_MEDIA_TYPE)
