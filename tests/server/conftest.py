"""Fixtures of the fleet server's tests: migrated databases on SQLite and PostgreSQL.

`database` runs a test twice, on a fresh SQLite file and on a fresh PostgreSQL
database; `sqlite_database` once, on SQLite only; `postgres_url` hands out an
empty PostgreSQL database (not migrated) for tests that open it themselves,
e.g. two replicas starting at once.

PostgreSQL comes from EDGEFLEET_TEST_POSTGRES (an SQLAlchemy URL of a role
allowed to CREATE DATABASE; default: role edgefleet/edgefleet on 127.0.0.1).
When it cannot be reached the PostgreSQL cases are skipped, unless
EDGEFLEET_REQUIRE_POSTGRES=1 (CI), which makes that a failure.

`keyset`, `trust`, `trust_file` and `bundle_file` come from tests/conftest.py
unchanged; `KeySet`, `PROFILE` and `make_trust_root` are re-exported here for
annotations and for building other trust roots.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from tests.conftest import PROFILE, KeySet, make_trust_root

__all__ = ["PROFILE", "KeySet", "PostgresServer", "make_trust_root"]

DEFAULT_POSTGRES = "postgresql+psycopg://edgefleet:edgefleet@127.0.0.1:5432/postgres"
TEST_DB_PREFIX = "edgefleet_test_"


@dataclass
class PostgresServer:
    """The PostgreSQL server of this test session (or why there is none)."""

    admin_url: URL | None
    unavailable: str | None = None
    _admin: Engine | None = None
    _template: str | None = None

    def require(self) -> None:
        """Skip (or fail under EDGEFLEET_REQUIRE_POSTGRES=1) when there is no server."""
        if self.unavailable is None:
            return
        message = f"PostgreSQL is not reachable: {self.unavailable}"
        if os.environ.get("EDGEFLEET_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message} and EDGEFLEET_REQUIRE_POSTGRES=1")
        pytest.skip(message)

    @property
    def admin(self) -> Engine:
        assert self._admin is not None, "require() first"
        return self._admin

    def url_of(self, name: str) -> str:
        assert self.admin_url is not None
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def create_database(self, *, template: str | None = None) -> str:
        """A new database, empty or a copy of `template`; returns its name."""
        name = f"{TEST_DB_PREFIX}{uuid.uuid4().hex[:16]}"
        clause = f" TEMPLATE {template}" if template else ""
        with self.admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}{clause}"))
            # Test data need not survive a crash of the server: commits (and this
            # CREATE, via the admin connection's setting) do not wait for the disk.
            conn.execute(text(f"ALTER DATABASE {name} SET synchronous_commit = off"))
        return name

    def drop_database(self, name: str) -> None:
        # FORCE ends the test's leftover connections; it gives up when one does
        # not end within seconds, so try again before failing the teardown.
        for attempt in range(3):
            try:
                with self.admin.connect() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                return
            except SQLAlchemyError:
                if attempt == 2:
                    raise
                time.sleep(1)

    def migrated_template(self) -> str:
        """A database migrated once per session; tests get copies (faster than migrating)."""
        if self._template is None:
            name = self.create_database()
            db = open_database(self.url_of(name))
            db.dispose()  # CREATE DATABASE ... TEMPLATE needs it without connections
            self._template = name
        return self._template

    def close(self) -> None:
        if self._admin is None:
            return
        if self._template is not None:
            self.drop_database(self._template)
        self._admin.dispose()


def _connect_postgres() -> PostgresServer:
    raw = os.environ.get("EDGEFLEET_TEST_POSTGRES", DEFAULT_POSTGRES)
    try:
        url = make_url(raw)
        engine = create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": 5, "options": "-c synchronous_commit=off"},
        )
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        return PostgresServer(None, unavailable=f"{raw}: {exc.__class__.__name__}: {exc}")
    return PostgresServer(url, _admin=engine)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = _connect_postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    postgres_server.require()
    name = postgres_server.create_database()
    try:
        yield postgres_server.url_of(name)
    finally:
        postgres_server.drop_database(name)


def _sqlite_database(tmp_path: Path) -> Iterator[Database]:
    db = open_database(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    """A migrated database in a fresh SQLite file."""
    yield from _sqlite_database(tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server: PostgresServer
) -> Iterator[Database]:
    """A migrated database: a fresh SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield from _sqlite_database(tmp_path)
        return
    postgres_server.require()
    name = postgres_server.create_database(template=postgres_server.migrated_template())
    db = Database(postgres_server.url_of(name))
    try:
        yield db
    finally:
        db.dispose()
        postgres_server.drop_database(name)
