"""GET /audit: who pushed, started, paused, resumed or aborted what (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from edgefleet.server.api.deps import AdminDep, SessionDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.audit import AuditPublic
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.audit import list_audit
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/audit", tags=["audit"])


@router.get(
    "",
    response_model=list[AuditPublic],
    summary="The audit log, newest first",
    responses=errors(),
)
def get_audit(
    session: SessionDep,
    _admin: AdminDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="page back")] = None,
) -> list[AuditPublic]:
    entries = list_audit(session, limit=limit, before_id=before_id)
    return [AuditPublic.model_validate(entry) for entry in entries]
