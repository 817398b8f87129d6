"""Talking to the running agent's local API from the CLI on the same device.

Reads go to its TCP address. Changes (`change`: install, rollback) go through
its Unix socket, or else over TCP with the token from its state directory;
both take the rights of root or of the agent's user (edgefleet.agent.localapi).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.agent import statelock
from edgefleet.agent.errors import AgentError
from edgefleet.agent.layout import StateLayout
from edgefleet.errors import UsageError

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


def _recorded(layout: StateLayout) -> tuple[dict[str, Any], int] | None:
    """localapi.json and its pid; None when there is none to read."""
    try:
        record = json.loads(layout.local_api_file.read_text())
        return record, int(record["pid"])
    except PermissionError:
        raise UsageError(_not_allowed(layout, f"cannot read {layout.local_api_file}")) from None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(layout: StateLayout, pid: int) -> bool:
    """Whether the agent `pid` still runs: it holds the state directory's lock
    (`edgefleet.agent.statelock`; after a reboot or a SIGKILL nobody does, even when
    another process now has that pid). With no lock file to ask (an older agent
    wrote localapi.json), whether a process `pid` exists."""
    try:
        held = statelock.holder(layout)
    except OSError:
        held = None
    else:
        return held is not None and held.pid == pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs as another user (the service's): it exists
    return True


def stale_pid(layout: StateLayout) -> int | None:
    """The pid a localapi.json records of an agent that no longer runs (it was killed,
    or the machine rebooted); None when there is no such file or its agent runs."""
    recorded = _recorded(layout)
    if recorded is None or _alive(layout, recorded[1]):
        return None
    return recorded[1]


def running_agent(layout: StateLayout) -> RunningAgent | None:
    """The agent running on this state directory, or None when none is (a stale
    localapi.json, `stale_pid`, counts as none).

    Raises:
        UsageError: the state directory cannot be read by this user.
    """
    recorded = _recorded(layout)
    if recorded is None:
        return None
    record, pid = recorded
    if not _alive(layout, pid):
        return None
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


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the agent's Unix socket."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=TIMEOUT_SECONDS)
        self.socket_path = path

    def connect(self) -> None:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.settimeout(self.timeout)
            connection.connect(str(self.socket_path))
        except OSError:
            connection.close()
            raise
        self.sock = connection


def change(layout: StateLayout, url: str, path: str, bundle: Path | None = None) -> Any:
    """POST a change to the running agent (`bundle`: an install of that file's bytes),
    through its Unix socket, or, when that cannot be reached, over TCP at `url` with its
    token; the agent's JSON answer.

    Raises:
        UsageError: neither the socket nor the token is open to this user.
        AgentRequestError: the agent answered with an error.
        OSError: the agent cannot be reached.
    """
    headers: dict[str, str] = {}
    connection: http.client.HTTPConnection = _UnixConnection(layout.local_api_socket)
    try:
        connection.connect()
    except OSError as exc:
        try:
            token = layout.local_api_token.read_text().strip()
        except OSError as token_exc:
            raise UsageError(
                _not_allowed(
                    layout,
                    f"cannot connect to {layout.local_api_socket} ({exc.strerror}) nor read "
                    f"{layout.local_api_token} ({token_exc.strerror})",
                )
            ) from None
        address = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(
            str(address.hostname), address.port, timeout=TIMEOUT_SECONDS
        )
        headers["Authorization"] = f"Bearer {token}"
    try:
        if bundle is None:
            connection.request("POST", path, headers=headers)
        else:
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(bundle.stat().st_size)
            # The agent may refuse before reading it all: its answer says why.
            refused_early = contextlib.suppress(BrokenPipeError, ConnectionResetError)
            with bundle.open("rb") as body, refused_early:
                connection.request("POST", path, body, headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    if response.status >= 400:
        try:
            detail: dict[str, Any] = json.loads(data)
        except ValueError:
            detail = {"error": response.reason, "code": "http"}
        raise AgentRequestError(str(detail.get("error")), str(detail.get("code")), response.status)
    return json.loads(data)


def _not_allowed(layout: StateLayout, what: str) -> str:
    return (
        f"{what}: only root and the agent's user may reach the agent on {layout.root}; run "
        "this as root (sudo) or as the agent's user (sudo -u edgefleet)"
    )
