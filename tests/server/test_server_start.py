"""A server database that is not what it should be is refused at start, never recreated.

Each case is a real SQLite file on disk, met by the real commands (`server token
create` and `server run`): one line, exit status 2, naming the file and what to
do, and the file left as it was. A missing file is a first start and still gets
a fresh database.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from edgefleet.server.db.migrate import head_revision, open_database
from edgefleet.server.principals import Role
from edgefleet.server.settings import sqlite_url
from edgefleet.server.tokens import create_api_token
from edgefleet.trust import TrustRoot
from tests.agent.broker import free_port
from tests.clirun import Cli
from tests.conftest import KeySet
from tests.server.serverproc import ServerProcess, json_of, wait_until, write_server_keys

RESTORE = "restore it from a backup, or move it away to start an empty fleet"


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def served_database(data: Path) -> Path:
    """A server.db as a server leaves it: migrated, with a token, checkpointed into one file."""
    data.mkdir(parents=True, exist_ok=True)
    db = open_database(sqlite_url(data))
    try:
        with db.session() as session:
            create_api_token(session, "ops", Role.ADMIN)
    finally:
        db.dispose()
    path = data / "server.db"
    checkpoint(path)
    return path


def checkpoint(path: Path) -> None:
    """Everything of the write-ahead log into the file itself, so its bytes say it all."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def emptied(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def damaged(path: Path) -> None:
    """Pages past the first overwritten: the header still says SQLite."""
    data = bytearray(path.read_bytes())
    for page in range(4096 * 2, len(data), 4096):
        data[page + 8 : page + 600] = b"\xa5" * 592
    path.write_bytes(bytes(data))


def recreated(path: Path) -> None:
    """Emptied, then tables made anew by something else: no schema revision."""
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE devices (id TEXT PRIMARY KEY)")
    checkpoint(path)


def newer(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
    checkpoint(path)


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "emptied": (emptied, "is empty (0 bytes)"),
    "garbage": (garbage, "is damaged or not an SQLite database"),
    "damaged": (damaged, "is damaged"),
    "recreated": (recreated, "has tables (devices) but no schema revision"),
    "newer": (newer, "is at schema revision 'f00dfeedbeef', which this server does not know"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_token_create_refuses_a_database_that_is_not_the_servers(
    run: Cli, tmp_path: Path, case: str
) -> None:
    data = tmp_path / "data"
    path = served_database(data)
    spoil, expected = CASES[case]
    spoil(path)
    before = path.read_bytes()
    _, err = run("server", "token", "create", "--role", "admin", "--name", "x", "--data", data,
                 status=2)  # fmt: skip
    [line] = err.splitlines()
    assert line.startswith(f"error [storage]: database {path.resolve()} {expected}"), line
    if case != "newer":
        assert line.endswith(RESTORE + " (every device then enrolls again)"), line
    else:
        assert line.endswith("run that server version, or upgrade this one"), line
    assert path.read_bytes() == before  # refused, not repaired or recreated


def test_server_run_refuses_an_emptied_database_and_starts_nothing(
    run: Cli, tmp_path: Path
) -> None:
    run("keys", "init", tmp_path / "keys")
    data = tmp_path / "data"
    path = served_database(data)
    emptied(path)
    _, err = run(
        "server", "run", "--embedded-broker", "--mqtt-port", str(free_port()),
        "--port", "0", "--data", data, "--trust", tmp_path / "keys" / "trust.json",
        "--server-key", tmp_path / "keys" / "server.key", status=2,
    )  # fmt: skip
    assert err.splitlines() == [
        f"error [storage]: database {path.resolve()} is empty (0 bytes): it was emptied or "
        "cut short, and starting on it would lose every token, device and rollout; "
        f"{RESTORE} (every device then enrolls again)"
    ]
    assert path.stat().st_size == 0


def test_a_missing_database_is_a_first_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = open_database(sqlite_url(data))
    try:
        with db.session() as session:
            revision = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        db.dispose()
    assert revision == head_revision()


def test_a_copy_of_a_good_database_opens(tmp_path: Path) -> None:
    path = served_database(tmp_path / "data")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(path, copy / "server.db")
    open_database(sqlite_url(copy)).dispose()


@pytest.mark.parametrize("data_exists", [False, True])
def test_a_refused_server_run_leaves_no_database_behind(
    run: Cli, tmp_path: Path, data_exists: bool
) -> None:
    """A server key the trust root does not list refuses the start (exit 1: refused input)
    after the database was opened; what the start created is removed, so `server token
    create` still finds no database."""
    run("keys", "init", tmp_path / "keys")
    run("keys", "init", tmp_path / "other")
    data = tmp_path / "data"
    if data_exists:
        data.mkdir()
        (data / "notes.txt").write_text("mine")
    _, err = run(
        "server", "run", "--embedded-broker", "--mqtt-port", str(free_port()),
        "--port", "0", "--data", data, "--trust", tmp_path / "keys" / "trust.json",
        "--server-key", tmp_path / "other" / "server.key", status=1,
    )  # fmt: skip
    assert err.startswith("refused [server-key-not-listed]: trust root version 1 does not list")
    if data_exists:
        assert sorted(p.name for p in data.iterdir()) == ["notes.txt"]
    else:
        assert not data.exists()
    _, err = run("server", "token", "create", "--role", "admin", "--name", "me", "--data", data,
                 status=2)  # fmt: skip
    assert err.startswith("error [usage]: no server database at ")


def test_a_replica_whose_data_directory_lacks_the_stored_bundles_says_so(
    tmp_path: Path, trust: TrustRoot, keyset: KeySet, bundle_file: Path
) -> None:
    """A replica on the shared database with a data directory of its own: the start
    warns (count, an example, that replicas share the data directory), and a download
    it cannot serve is logged as an error, not only answered 404."""
    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    shared = tmp_path / "shared"
    db_url = sqlite_url(shared)
    first = ServerProcess.start(
        tmp_path / "first.log", trust_path, key_path, "--data", shared,
        "--embedded-broker", "--mqtt-port", str(free_port()),
    )  # fmt: skip
    try:
        first.wait_healthy()
        token = tokens_of(shared)
        with first.api(token) as api:
            pushed = json_of(
                api.post(
                    "/bundles",
                    content=bundle_file.read_bytes(),
                    headers={"Content-Type": "application/octet-stream"},
                ),
                201,
            )
    finally:
        assert "bundle(s) the database lists are missing" not in first.stop()

    own = tmp_path / "own"
    second = ServerProcess.start(
        tmp_path / "second.log", trust_path, key_path, "--data", own, "--db", db_url,
        "--embedded-broker", "--mqtt-port", str(free_port()),
    )  # fmt: skip
    try:
        second.wait_healthy()
        assert (
            "1 of the 1 bundle(s) the database lists are missing from the data directory "
            f"{own.resolve()} (e.g. demo@1.2.3, {pushed['sha256']}.efb)"
        ) in second.log
        assert "Replicas must share one data directory" in second.log
        assert "is --data the directory the other replicas use?" in second.log
        assert httpx.get(f"{second.url}/api/v1/blobs/{pushed['sha256']}").status_code == 404
        assert wait_until(lambda: "file" in second.log and "is missing: devices" in second.log, 5)
        line = next(line for line in second.log.splitlines() if "is missing: devices" in line)
        assert " ERROR " in line and "demo@1.2.3" in line
    finally:
        second.stop()


def tokens_of(data: Path) -> str:
    db = open_database(sqlite_url(data))
    try:
        with db.session() as session:
            return create_api_token(session, "ops", Role.OPERATOR)[0]
    finally:
        db.dispose()
