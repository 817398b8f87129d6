"""The demo's processes: the fleet server and the agents, each in its own process group.

Every process is started with `python -m edgefleet`, as a user would type the
command; `stop` ends them all (SIGTERM, then SIGKILL after a grace period), the
server's embedded broker with the server's group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.errors import EdgefleetError

STOP_GRACE_S = 20.0


class DemoError(EdgefleetError):
    """A step of the demo failed; the message names it and where its log is."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (held open together so that they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for held in sockets:
            held.bind(("127.0.0.1", 0))
        return [held.getsockname()[1] for held in sockets]
    finally:
        for held in sockets:
            held.close()


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, processes: Processes) -> None:
    """Poll `check` until it holds; DemoError when time runs out or a child stopped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        processes.check_running()
        if check():
            return
        time.sleep(0.5)
    raise DemoError(f"no {what} after {timeout_s:.0f} s")


class Processes:
    """The long-lived children, stopped together on any exit."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[subprocess.Popen[bytes]] = []
        self.started: dict[int, tuple[str, Path]] = {}  # pid -> its command, its output
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def command(self, *args: str | Path) -> str:
        """Run `edgefleet ARGS` to its end; its output, or DemoError with its last line."""
        result = subprocess.run(
            [sys.executable, "-m", "edgefleet", *map(str, args)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.work,
            timeout=300,
        )
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
            raise DemoError(f"`edgefleet {args[0]} {args[1]}` failed: {' '.join(last)}")
        return result.stdout

    def start(self, log: Path, *args: str | Path) -> subprocess.Popen[bytes]:
        """Start `edgefleet ARGS` in a new process group, its output in `log`."""
        with log.open("wb") as output:
            child = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", *map(str, args)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.work,
                start_new_session=True,
            )
        self.children.append(child)
        self.started[child.pid] = (f"edgefleet {args[0]} {args[1]}", log)
        return child

    def check_running(self) -> None:
        """DemoError naming the first child that stopped, with the last line it wrote."""
        for child in self.children:
            if child.poll() is not None:
                command, log = self.started[child.pid]
                last = log.read_text(errors="replace").strip().splitlines()[-1:]
                raise DemoError(
                    f"`{command}` ({log.stem}) stopped with status {child.returncode}: "
                    f"{' '.join(last) or 'no output'}"
                )

    def stop(self) -> None:
        """SIGTERM every group (agents first, the server last), wait, SIGKILL what is left."""
        for child in reversed(self.children):
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(max(0.1, deadline - time.monotonic()))
            _signal_group(child, signal.SIGKILL)  # the group's other processes too
            child.wait()
        self.children.clear()


def _signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signum)


class Api:
    """The fleet server's HTTP API with an operator token (urllib: no client dependency)."""

    def __init__(self, url: str, token: str = "") -> None:
        self.url = url
        self.token = token

    def get(self, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.url}/api/v1{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def healthy(self) -> bool:
        try:
            self.get("/health")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return True
