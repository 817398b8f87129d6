"""The fleet's trust root: push a newer version (admin), show the newest (viewer).

A push is checked exactly as a device checks it (`TrustRoots.push`): version N+1
of the newest stored, signed by the root keys of both versions, not expired,
and listing this server's key in its server role; else 422 with the reason
(`trust-root-version`, `trust-root-signature`, `trust-root-expired`,
`server-key-not-listed`, `malformed-document`). Accepted, it is stored,
audited (`trust-root.push`), published retained to devices, and used from then
on for everything this replica verifies; other replicas adopt it within one
fleet-timestamp period. The answer lists the stored bundles the new version no
longer accepts (`untrusted_bundles`: a release key that signed them is gone), which
devices will refuse and `POST /rollouts` refuses from then on.
"""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, Request, status

from edgefleet.server.api.deps import AdminDep, ContextDep, ViewerDep
from edgefleet.server.api.errors import errors
from edgefleet.server.api.schemas.trust import StrandedBundle, TrustRootPublic, TrustRootPushed
from edgefleet.server.context import ServerContext
from edgefleet.server.errors import InvalidRequestError
from edgefleet.trust import MAX_TRUST_ROOT_BYTES, TrustRoot, public_keys
from edgefleet.wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/trust", tags=["trust"])

_DOCUMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
        "description": "trust.json as `edgefleet keys rotate` wrote it",
    }
}


def _public(root: TrustRoot) -> TrustRootPublic:
    return TrustRootPublic(
        version=root.version,
        expires=root.expires,
        server_keyids=[key.keyid for key in public_keys(root, "server")],
    )


@router.post(
    "",
    response_model=TrustRootPushed,
    status_code=status.HTTP_201_CREATED,
    summary="Hand the server the next trust root version; it checks, stores and publishes it",
    responses=errors(413, 422),
    openapi_extra=_DOCUMENT_BODY,
)
async def push_trust_root(
    request: Request, context: ContextDep, admin: AdminDep
) -> TrustRootPushed:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise InvalidRequestError(
            f"send trust.json as application/json, not {media_type or 'no Content-Type'!r}"
        )
    data = await request.body()
    if len(data) > MAX_TRUST_ROOT_BYTES:
        raise InvalidRequestError(f"a trust root is at most {MAX_TRUST_ROOT_BYTES} bytes")
    root = await to_thread.run_sync(context.trust.push, data, admin, context.clock())
    stranded = await to_thread.run_sync(_stranded, context, root)
    return TrustRootPushed(**_public(root).model_dump(), untrusted_bundles=stranded)


def _stranded(context: ServerContext, root: TrustRoot) -> list[StrandedBundle]:
    with context.db.session() as session:
        return [
            StrandedBundle(bundle=f"{row.name}@{row.version}", reason=reason)
            for row, reason in context.bundles.untrusted(session, root)
        ]


@router.get(
    "",
    response_model=TrustRootPublic,
    summary="The newest trust root version the server holds, and its expiry",
    responses=errors(),
)
def show_trust_root(context: ContextDep, _viewer: ViewerDep) -> TrustRootPublic:
    return _public(context.trust.current)
