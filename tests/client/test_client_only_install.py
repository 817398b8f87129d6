"""An operator's laptop installs the wheel with `[client]` alone and drives a running server.

The server runs from the test environment (every extra); the client runs from a
fresh virtual environment holding the core and the client extra only, and must
find none of the server's dependencies there.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from edgefleet.server.db.migrate import open_database
from edgefleet.server.principals import Role
from edgefleet.server.settings import sqlite_url
from edgefleet.server.tokens import create_api_token
from edgefleet.trust import TrustRoot
from tests.agent.broker import free_port
from tests.conftest import KeySet
from tests.server.serverproc import ServerProcess, write_server_keys
from tests.wheelenv import build_wheel, fresh_venv

SERVER_DEPENDENCIES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "paho",
)
FIND = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"


@pytest.mark.slow
def test_the_client_extra_alone_drives_a_running_server(
    tmp_path: Path, keyset: KeySet, trust: TrustRoot, bundle_file: Path
) -> None:
    wheel, _ = build_wheel(tmp_path / "build")
    python = fresh_venv(tmp_path / "laptop", f"{wheel}[client]")
    found = subprocess.run(
        [python, "-c", FIND, *SERVER_DEPENDENCIES], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"

    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    data = tmp_path / "data"
    server = ServerProcess.start(
        tmp_path / "server.log", trust_path, key_path,
        "--data", data, "--embedded-broker", "--mqtt-port", str(free_port()),
    )  # fmt: skip
    try:
        server.wait_healthy()
        db = open_database(sqlite_url(data))  # the server's own SQLite file
        try:
            with db.session() as session:
                token, _ = create_api_token(session, "laptop", Role.OPERATOR)
        finally:
            db.dispose()
        env = {**os.environ, "EDGEFLEET_SERVER": server.url, "EDGEFLEET_TOKEN": token}

        def edgefleet(*args: str | Path) -> str:
            result = subprocess.run(
                [python, "-m", "edgefleet", *map(str, args)],
                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            return result.stdout

        assert edgefleet("bundles", "push", bundle_file).startswith("pushed: demo@1.2.3")
        (listed,) = json.loads(edgefleet("bundles", "list", "--json"))
        assert (listed["name"], listed["version"]) == ("demo", "1.2.3")
        assert json.loads(edgefleet("devices", "list", "--json")) == {"items": [], "total": 0}
        assert edgefleet("devices", "enroll-token", "--ttl", "1h").startswith("efe_")
        assert json.loads(edgefleet("alerts", "list", "--open", "--json")) == []
    finally:
        log = server.stop()
    assert "Traceback" not in log
