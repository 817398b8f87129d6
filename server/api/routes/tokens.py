"""API tokens (admin): create (the secret is shown once), list, revoke.

Creation and revocation are audited by `edgefleet.server.tokens` in the same
unit of work.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from edgefleet.server.api.deps import AdminDep, ContextDep, SessionDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.base import MAX_ID
from edgefleet.server.api.schemas.tokens import TokenCreate, TokenCreated, TokenPublic
from edgefleet.server.tokens import create_api_token, list_api_tokens, revoke_api_token
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/tokens", tags=["tokens"])

TokenId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.post(
    "",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an API token; its secret is in this answer only",
    responses=errors(),
)
def create_token(
    body: TokenCreate, session: SessionDep, context: ContextDep, admin: AdminDep
) -> TokenCreated:
    secret, row = create_api_token(session, body.name, body.role, context.clock(), actor=admin)
    return TokenCreated(**TokenPublic.model_validate(row).model_dump(), token=secret)


@router.get(
    "",
    response_model=list[TokenPublic],
    summary="Every API token (never their secrets)",
    responses=errors(),
)
def list_tokens(session: SessionDep, _admin: AdminDep) -> list[TokenPublic]:
    return [TokenPublic.model_validate(row) for row in list_api_tokens(session)]


@router.delete(
    "/{token_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Revoke an API token (from now on it is refused with 401)",
    responses=errors(404),
)
def revoke_token(
    token_id: TokenId, session: SessionDep, context: ContextDep, admin: AdminDep
) -> Response:
    revoke_api_token(session, token_id, context.clock(), actor=admin)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
