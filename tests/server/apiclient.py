"""A fleet server API on a real migrated database, for the test_api_* modules.

`make_api(database, tmp_path, trust)` builds a `ServerContext` (a real
`BundleStore` in tmp_path, a `RecordingPublisher`), the app, a TestClient and
one API token per role. Devices are enrolled through the API itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from fastapi.testclient import TestClient
from nacl.signing import SigningKey as NaclSigningKey

from edgefleet.server.api.app import create_app
from edgefleet.server.bundles import BundleStore
from edgefleet.server.context import ServerContext
from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.server.settings import ServerSettings
from edgefleet.server.tokens import create_api_token
from edgefleet.server.trustroots import open_trust_roots
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot
from edgefleet.wire import API_PREFIX
from tests.agent.broker import free_port
from tests.conftest import PROFILE

API = API_PREFIX  # the paths below are relative to it


@dataclass
class RecordingPublisher:
    """A `Publisher` that keeps what it was given."""

    calls: list[tuple[str, bytes, int, bool]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        self.calls.append((topic, payload, qos, retain))


class MovableClock:
    """A clock tests move by hand (aware UTC)."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self.now = start or utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@dataclass
class Api:
    client: TestClient
    context: ServerContext
    publisher: RecordingPublisher
    clock: MovableClock
    tokens: dict[Role, str]

    def auth(self, role: Role | str) -> dict[str, str]:
        """The Authorization header of the `role` token (or of a raw secret)."""
        secret = self.tokens[role] if isinstance(role, Role) else role
        return {"Authorization": f"Bearer {secret}"}

    def get(self, path: str, role: Role | str | None = Role.ADMIN, **kw: Any) -> Any:
        headers = {**(self.auth(role) if role else {}), **kw.pop("headers", {})}
        return self.client.get(API + path, headers=headers, **kw)

    def post(self, path: str, role: Role | str | None = Role.ADMIN, **kw: Any) -> Any:
        headers = {**(self.auth(role) if role else {}), **kw.pop("headers", {})}
        return self.client.post(API + path, headers=headers, **kw)

    def delete(self, path: str, role: Role | str | None = Role.ADMIN, **kw: Any) -> Any:
        headers = {**(self.auth(role) if role else {}), **kw.pop("headers", {})}
        return self.client.delete(API + path, headers=headers, **kw)

    def push(self, bundle: Path, role: Role = Role.OPERATOR) -> Any:
        return self.post(
            "/bundles",
            role,
            content=bundle.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )

    def enroll(self, device_id: str, **overrides: Any) -> Any:
        return self.post("/devices/enroll", None, json=enroll_body(device_id, **overrides))


def enroll_body(device_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": device_id,
        "public_key": NaclSigningKey.generate().verify_key.encode().hex(),
        "profile": PROFILE,
        "arch": "x86_64",
        "runtimes": ["onnxruntime"],
        "agent_version": "1.0.0",
        "tags": {},
        "enroll_token": None,
    }
    body.update(overrides)
    return body


def make_api(database: Database, tmp_path: Path, trust: TrustRoot, **settings: Any) -> Api:
    """An app on `database` with admin, operator and viewer tokens (open enrollment)."""
    base = ServerSettings(
        data_dir=tmp_path / "data",
        trust_path=tmp_path / "trust.json",
        server_key_path=tmp_path / "server.key",
        open_enrollment=True,
        api_rate_per_minute=10_000,
    )
    clock = MovableClock()
    publisher = RecordingPublisher()
    context = ServerContext(
        settings=replace(base, **settings),
        db=database,
        trust=open_trust_roots(database, trust, None, now=clock()),
        bundles=BundleStore(tmp_path / "data", trust, clock),
        publisher=publisher,
        clock=clock,
    )
    tokens = {}
    with database.session() as session:
        for role in Role:
            tokens[role], _ = create_api_token(
                session, f"{role.value}-{secrets.token_hex(2)}", role
            )
    client = TestClient(create_app(context))
    return Api(client, context, publisher, clock, tokens)


@contextlib.contextmanager
def serve(api: Api, config: uvicorn.Config | None = None) -> Iterator[str]:
    """Serve `api`'s app with uvicorn (on a free port unless `config` says otherwise,
    in a thread); yields its base URL."""
    if config is None:
        config = uvicorn.Config(
            api.client.app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="off"
        )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(10)
