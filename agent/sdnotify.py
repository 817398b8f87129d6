"""systemd's notify protocol: READY=1 when serving, WATCHDOG=1 from the main loop.

A datagram to the socket in $NOTIFY_SOCKET (see sd_notify(3)); without it,
as when not run by systemd, every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(message: str, socket_path: str | None = None) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; False when not run by systemd."""
    path = socket_path or os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval_seconds() -> float | None:
    """Half the watchdog period systemd set (WATCHDOG_USEC), the interval to pet it at."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    return int(usec) / 2_000_000
