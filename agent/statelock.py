"""One agent per state directory: an exclusive flock on STATE_DIR/agent.lock.

`agent run` takes it before anything else and holds it for the agent's life;
the kernel releases it when the process ends, a crash and SIGKILL included, so
a stale lock never blocks a restart. `agent install` and `agent rollback`
working in-process (no agent runs) take it too for the time of their change, so
nothing changes the installed model behind a live agent's back.

The holder writes its pid and what it is (`agent run`, `agent install`, ...) into
the file, so that the one refused can name it, and so that `agent status` can
tell a running agent from a stale localapi.json (`holder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.errors import AgentRunningError
from edgefleet.agent.layout import PRIVATE_DIR, PRIVATE_FILE, StateLayout

AGENT = "agent run"
PROBE_RETRIES = 10  # a lock held by `holder` is let go at once: so many looks before refusing
PROBE_RETRY_SECONDS = 0.05


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as the lock file records it."""

    pid: int | None
    what: str


class StateLock:
    """The held lock; `release()` (or the process's end) lets it go."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def _read_holder(path: Path) -> Holder:
    try:
        pid_text, _, what = path.read_text(encoding="utf-8").strip().partition(" ")
        return Holder(int(pid_text), what or AGENT)
    except (OSError, ValueError):
        return Holder(None, AGENT)


def refusal(layout: StateLayout, holder: Holder, doing: str) -> AgentRunningError:
    pid = f"pid {holder.pid}" if holder.pid is not None else "pid unknown"
    if holder.what == AGENT:
        who = f"another agent ({pid}) runs on this state directory ({layout.root})"
        hint = (
            "stop it first (systemctl stop edgefleet-agent), or give this one another "
            "state_dir in its agent.toml"
            if doing == AGENT
            else "go through it (it needs its local API), or stop it first "
            "(systemctl stop edgefleet-agent)"
        )
    else:
        who = f"`edgefleet {holder.what}` ({pid}) is changing this state directory ({layout.root})"
        hint = "wait until it has finished, then try again"
    return AgentRunningError(f"{who}: {hint}")


def acquire(layout: StateLayout, what: str = AGENT) -> StateLock:
    """Take the state directory's lock for `what` (`agent run`, `agent install`, ...).

    Raises:
        AgentRunningError: another process holds it (naming its pid).
        OSError: the state directory or the lock file cannot be made or opened.
    """
    layout.root.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)
    path = layout.lock_file
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        for attempt in range(PROBE_RETRIES + 1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # `holder` (agent status) holds it shared for an instant: look again.
                if attempt == PROBE_RETRIES:
                    raise refusal(layout, _read_holder(path), what) from None
                time.sleep(PROBE_RETRY_SECONDS)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
    return StateLock(fd, path)


def holder(layout: StateLayout) -> Holder | None:
    """Who holds the lock now; None when nobody does. Raises OSError when the lock file
    cannot be opened (FileNotFoundError: no agent of this version ever ran here)."""
    fd = os.open(layout.lock_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(layout.lock_file)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
