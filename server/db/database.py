"""The database handle: one engine and session factory per server process.

`Database.session()` is the one way to talk to the database: a unit of work
that commits when the block ends and rolls back on any error, so a request
that fails leaves nothing half-written. SQLAlchemy errors are translated to
`StorageError` at this boundary (after the rollback).

SQLite runs in WAL mode with a busy timeout, so the API, the MQTT ingestion
and the rollout driver (threads of one process) can write in turn; PostgreSQL
is the choice for several replicas.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.server.errors import StorageError

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def describe_database_error(exc: SQLAlchemyError) -> str:
    """The driver's own message (one or two lines), without SQLAlchemy's statement dump and
    its "Background on this error" link: what a log line or an API answer should say."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).split("\n(Background on this error")[0]
    text = text.split("\n[SQL:")[0].strip()
    return f"{type(exc).__name__}: {text}"


def create_db_engine(url: str) -> Engine:
    """An engine for `url` (sqlite:///path or postgresql+psycopg://...).

    Raises:
        StorageError: the URL is not a database URL SQLAlchemy knows.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StorageError(f"database URL {url!r} is not valid: {exc}") from exc
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # Plain postgresql:// would pick psycopg2; psycopg 3 is the one installed.
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, connect_args={"check_same_thread": False})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=10)
    except (ArgumentError, ImportError) as exc:
        raise StorageError(f"cannot open database {parsed!r}: {exc}") from exc
    return engine


class Database:
    """An engine and its session factory."""

    def __init__(self, url: str) -> None:
        """Raises: StorageError when `url` is not a usable database URL."""
        self.url = url
        self.engine = create_db_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # What every unit of work's `Session.info` starts with (e.g. where alert events go).
        self.session_info: dict[str, Any] = {}

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commit at the end of the block, roll back on any error.

        Raises:
            StorageError: the database failed (the unit of work was rolled back).
            Any error raised inside the block, after the rollback.
        """
        session = self._sessions(info=self.session_info)
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise StorageError(f"database error: {describe_database_error(exc)}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


__all__ = ["Database", "create_db_engine"]
