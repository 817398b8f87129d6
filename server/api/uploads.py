"""A request body streamed to a fresh file of the upload area, bounded, removed on any failure."""

from __future__ import annotations

from pathlib import Path

from anyio import to_thread
from fastapi import Request
from starlette.requests import ClientDisconnect

from edgefleet.server.api.errors import BodyTooLargeError
from edgefleet.server.context import ServerContext
from edgefleet.server.errors import InvalidRequestError


async def receive_upload(
    request: Request, context: ServerContext, limit: int, what: str, *, allow_empty: bool = True
) -> Path:
    """The body in a new upload file (the caller stores or removes it).

    Raises:
        BodyTooLargeError: more than `limit` bytes ("the `what` exceeds ...").
        InvalidRequestError: the client went away, or an empty body when not `allow_empty`.
    """
    upload = await to_thread.run_sync(context.bundles.new_upload_path)
    try:
        received = 0
        with open(upload, "wb") as out:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise BodyTooLargeError(f"the {what} exceeds this server's {limit} bytes")
                out.write(chunk)
        if received == 0 and not allow_empty:
            raise InvalidRequestError(
                f"empty body: send the {what} file (application/octet-stream)"
            )
    except ClientDisconnect as exc:
        upload.unlink(missing_ok=True)
        raise InvalidRequestError("the upload was interrupted") from exc
    except BaseException:
        upload.unlink(missing_ok=True)
        raise
    return upload


__all__ = ["receive_upload"]
