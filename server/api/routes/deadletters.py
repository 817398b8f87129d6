"""GET /dead-letters (viewer): what the database refused of a device, set aside by ingestion;
GET /dead-letters/{id} (operator): its messages; POST /dead-letters/{id}/replay and
DELETE /dead-letters/{id} (operator, audited)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from edgefleet.errors import MessageSchemaError
from edgefleet.mqtt.devicesig import split_device_frame
from edgefleet.server.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.api.schemas.deadletters import (
    DeadLetterDetail,
    DeadLetterPublic,
    KeptMessagePublic,
    ReplayPublic,
)
from edgefleet.server.audit import record_audit
from edgefleet.server.deadletters import (
    discard_dead_letter,
    get_dead_letter,
    letters_of,
    list_dead_letters,
)
from edgefleet.server.errors import ConflictError
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/dead-letters", tags=["dead letters"])

LetterId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get(
    "",
    response_model=list[DeadLetterPublic],
    summary="Messages the database refused to store, set aside per device, newest first",
    responses=errors(),
)
def get_dead_letters(
    session: SessionDep,
    _viewer: ViewerDep,
    device: Annotated[str | None, Query(max_length=128, description="only this device's")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DeadLetterPublic]:
    return [
        DeadLetterPublic.model_validate(row) for row in list_dead_letters(session, device, limit)
    ]


def _readable(frame: bytes) -> str | None:
    """A kept frame's message as text, its signature left out; None when it is not text."""
    try:
        return split_device_frame(frame)[1].decode("utf-8")
    except (MessageSchemaError, UnicodeDecodeError):
        return None


@router.get(
    "/{letter_id}",
    response_model=DeadLetterDetail,
    summary="One dead letter with its messages as the device sent them (operator)",
    responses=errors(404),
)
def get_dead_letter_detail(
    letter_id: LetterId, session: SessionDep, _operator: OperatorDep
) -> DeadLetterDetail:
    row = get_dead_letter(session, letter_id)
    messages = [
        KeptMessagePublic(topic=topic, received_at=kept["received_at"], message=_readable(frame))
        for (topic, frame), kept in zip(letters_of(row), row.messages, strict=True)
    ]
    return DeadLetterDetail(**DeadLetterPublic.model_validate(row).model_dump(), messages=messages)


@router.post(
    "/{letter_id}/replay",
    response_model=ReplayPublic,
    summary="Take a dead letter's messages again, with every check, and write them (audited)",
    responses=errors(404, 409),
)
def replay_dead_letter(
    letter_id: LetterId, session: SessionDep, context: ContextDep, operator: OperatorDep
) -> ReplayPublic:
    if context.ingest is None:
        raise ConflictError(
            "this server ingests no MQTT messages, so it cannot replay them: "
            "ask a replica that runs with MQTT"
        )
    replay = context.ingest.replay(letter_id)
    details = {
        "device_id": replay.device_id,
        "outcomes": replay.outcomes,
        "settled": replay.settled,
    }
    record_audit(session, operator, "dead-letters.replay", f"dead-letters {letter_id}", details)
    return ReplayPublic(
        outcomes=replay.outcomes,
        settled=replay.settled,
        again=replay.again.kept_id if replay.again is not None else None,
    )


@router.delete(
    "/{letter_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Discard a dead letter: its messages are not stored (audited)",
    responses=errors(404),
)
def delete_dead_letter(letter_id: LetterId, session: SessionDep, operator: OperatorDep) -> None:
    row = discard_dead_letter(session, letter_id)
    details = {"device_id": row.device_id, "dropped": row.dropped}
    record_audit(session, operator, "dead-letters.discard", f"dead-letters {letter_id}", details)
