"""Talking to the running agent's local API from the CLI on the same device."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from edgefleet.agent.errors import AgentError
from edgefleet.agent.layout import StateLayout

TIMEOUT_SECONDS = 600.0  # an install through the agent includes its health check


class AgentRequestError(AgentError):
    """The running agent refused or failed the request; `code` is its error code."""

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message)
        self.code, self.status = code, status


@dataclass(frozen=True)
class RunningAgent:
    """The agent running on a state directory, as its localapi.json records it."""

    pid: int
    url: str | None  # its local API's base URL; None: the API is off


def running_agent(layout: StateLayout) -> RunningAgent | None:
    """The agent running on this state directory, or None when none is."""
    try:
        record = json.loads(layout.local_api_file.read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs as another user (the service's): it exists
    host, port = record.get("host"), record.get("port")
    url = f"http://{host}:{port}" if host is not None and port is not None else None
    return RunningAgent(pid, url)


def running_agent_url(layout: StateLayout) -> str | None:
    """The base URL of the agent serving this state directory, if one runs with its API."""
    running = running_agent(layout)
    return running.url if running is not None else None


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
