"""A cap on request bodies, so a huge JSON body is refused (413) before it is parsed.

Bodies of every route but the file uploads (`exempt`: bundles, a device's raw
inputs) are read by this middleware, at most `limit` bytes, then replayed to
the app; a declared Content-Length above the limit is refused without reading
anything. The uploads stream to disk under their own, larger limits
(`routes/bundles.py`, `routes/samples.py`).
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgefleet.wire import error_body

MAX_JSON_BODY = 1024 * 1024


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes with 413, except for `exempt` (method, path
    pattern; `*` stands for a path segment such as a device id)."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int = MAX_JSON_BODY,
        exempt: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope["method"], scope["path"].rstrip("/")):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    def _exempt(self, method: str, path: str) -> bool:
        return any(
            method == exempt_method and fnmatchcase(path, pattern)
            for exempt_method, pattern in self.exempt
        )

    async def _refuse(self, send: Send) -> None:
        detail = f"the request body exceeds {self.limit} bytes"
        body = json.dumps(error_body("too-large", detail)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
