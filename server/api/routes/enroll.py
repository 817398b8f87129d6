"""Enrollment: devices enroll themselves (no API token); operators mint enrollment tokens.

POST /devices/enroll takes no API token: a device proves it may join with a
one-time enrollment token (or nothing, when the server runs with open
enrollment), and from then on signs its MQTT messages with the key it
enrolled. It is rate limited per client address, because nothing else
throttles an unauthenticated caller, in a bucket of its own (failed logins from
the same address have theirs). 201: enrolled now; 200: the same device
and key were enrolled already (an agent retrying after a lost answer). With a
`csr` and a server with a fleet CA, the answer carries a new client certificate
(`edgefleet.server.certificates`; a 200 only within an hour of the enrollment).
An enrollment token may be a claim many devices enroll with (`max_uses`).
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from edgefleet.server.api.deps import ContextDep, EnrollLimitDep, OperatorDep, SessionDep
from edgefleet.server.api.errors import ErrorBody, errors
from edgefleet.server.api.routes.certificates import certificate_answer
from edgefleet.server.api.schemas.devices import DevicePublic
from edgefleet.server.api.schemas.enroll import (
    CertificateAnswer,
    EnrollAnswer,
    EnrollRequest,
    EnrollTokenCreate,
    EnrollTokenCreated,
)
from edgefleet.server.certificates import issue_device_certificate, may_certify
from edgefleet.server.devices import enroll_device
from edgefleet.server.tokens import create_enroll_token
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=API_PREFIX, tags=["devices"])


@router.post(
    "/devices/enroll",
    response_model=EnrollAnswer,
    status_code=status.HTTP_201_CREATED,
    summary="Enroll a device (no API token: an enrollment token in the body)",
    responses={
        200: {"model": EnrollAnswer, "description": "already enrolled with this key"},
        403: {"model": ErrorBody, "description": "enrollment token unknown, used up or expired"},
        409: {"model": ErrorBody},
        422: {"model": ErrorBody, "description": "a bad request, or a bad csr (nothing enrolled)"},
        429: {"model": ErrorBody},
    },
)
def enroll(
    body: EnrollRequest, context: ContextDep, session: SessionDep, _limit: EnrollLimitDep
) -> JSONResponse:
    now = context.clock()
    device, created = enroll_device(
        session, body, open_enrollment=context.settings.open_enrollment, now=now
    )
    certificate = CertificateAnswer()
    if context.ca is not None and body.csr is not None and may_certify(device, created, now):
        # In the enrollment's unit of work: a refused csr enrolls nothing.
        certificate = certificate_answer(
            context.ca, issue_device_certificate(session, context.ca, device.id, body.csr, now)
        )
    public = DevicePublic.model_validate(device)
    session.commit()  # before the key cache forgets: ingestion must read the new key
    if context.device_keys is not None:
        context.device_keys.invalidate(device.id)
    answer = EnrollAnswer(**public.model_dump(), **certificate.model_dump())
    return JSONResponse(
        answer.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
    )


@router.post(
    "/enroll-tokens",
    response_model=EnrollTokenCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an enrollment token (the secret is in this answer only)",
    responses=errors(),
)
def create_token(
    body: EnrollTokenCreate, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> EnrollTokenCreated:
    secret, row = create_enroll_token(
        session,
        operator,
        dict(body.tags),
        dt.timedelta(seconds=body.ttl_s),
        now=context.clock(),
        max_uses=body.max_uses,
    )
    return EnrollTokenCreated(
        id=row.id,
        token=secret,
        tags=dict(row.tags),
        expires_at=row.expires_at,
        max_uses=row.max_uses,
    )
