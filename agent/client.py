"""Talking to the running agent's local API from the CLI on the same device."""

from __future__ import annotations

import json
import os
from typing import Any

from edgefleet.agent.errors import AgentError
from edgefleet.agent.layout import StateLayout

TIMEOUT_SECONDS = 600.0  # an install through the agent includes its health check


class AgentRequestError(AgentError):
    """The running agent refused or failed the request; `code` is its error code."""

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message)
        self.code, self.status = code, status


def running_agent_url(layout: StateLayout) -> str | None:
    """The base URL of the agent serving this state directory, if one is running."""
    try:
        record = json.loads(layout.local_api_file.read_text())
        os.kill(int(record["pid"]), 0)  # raises when no such process
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"http://{record['host']}:{record['port']}"


def call(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str = "application/json",
) -> bytes:
    """One request; an error answer becomes AgentRequestError with the agent's reason.

    Raises:
        AgentRequestError: the agent answered with an error.
        OSError: the agent cannot be reached.
    """
    import urllib.error  # only the CLI on a device talks to the agent: not loaded in it
    import urllib.request

    request = urllib.request.Request(url + path, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as exc:
        try:
            detail: dict[str, Any] = json.loads(exc.read())
        except ValueError:
            detail = {"error": exc.reason, "code": "http"}
        raise AgentRequestError(
            str(detail.get("error")), str(detail.get("code")), exc.code
        ) from None


def call_json(url: str, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
    body = json.dumps(payload).encode() if payload is not None else None
    return json.loads(call(url, method, path, body))
