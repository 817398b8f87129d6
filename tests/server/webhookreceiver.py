"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 (a thread).

It records every request and answers the statuses a test queues (200 once
they run out).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


@dataclass
class Receiver:
    """A webhook receiver: answers the queued statuses in turn (200 once they run out)."""

    url: str
    statuses: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    during_request: Callable[[], None] | None = None  # run before answering

    def events(self) -> list[tuple[int, str]]:
        """(alert id, event) of every request received, in order."""
        return [(r.payload["alert"]["id"], r.payload["event"]) for r in self.requests]


@contextlib.contextmanager
def running_receiver() -> Iterator[Receiver]:
    """A receiver listening on 127.0.0.1 until the block ends."""
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(Received(dict(self.headers.items()), body))
            if state.during_request is not None:
                state.during_request()
            self.send_response(state.statuses.pop(0) if state.statuses else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/edgefleet"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


__all__ = ["Received", "Receiver", "running_receiver"]
