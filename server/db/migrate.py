"""Schema migrations: bring a database to the schema this server version expects.

The schema is created and changed only by the Alembic migrations shipped
inside the package (`edgefleet/server/db/migrations`, found next to this file,
so an installed, non-editable server migrates too). The server upgrades at
start, before it serves anything.

Several replicas may start at once against one PostgreSQL database: the
upgrade runs in one transaction that first takes a transaction-scoped advisory
lock, so the replicas migrate one after the other and the later ones find the
schema at head and do nothing. PostgreSQL's DDL is transactional, so a failed
upgrade leaves the schema as it was. SQLite serves one replica (one process)
only; its upgrade is not guarded against a second process.

A database whose revision this code does not know (migrated by a newer server)
is refused rather than touched.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from edgefleet.server.db.database import Database, describe_database_error
from edgefleet.server.errors import StorageError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# pg_advisory_xact_lock key shared by every edgefleet replica: b"efmigr" as an integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"efmigr", "big")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config of the shipped migrations, running on `connection`.

    For `alembic.command` calls beyond the upgrade (a downgrade in tests, a new
    revision: `command.revision(alembic_config(conn), "message", autogenerate=True)`
    drafts one to edit by hand).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # env.py runs on this connection (it never builds an engine of its own).
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this server's schema is at after `upgrade_database`."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the migrations have a single head"
    return head


def current_revision(db: Database) -> str | None:
    """The revision `db` is at (None: never migrated).

    Raises:
        StorageError: the database cannot be read.
    """
    try:
        with db.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise StorageError(
            f"cannot read the schema revision: {describe_database_error(exc)}"
        ) from exc


def _check_known(connection: Connection) -> None:
    known = {
        script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    }
    for revision in MigrationContext.configure(connection).get_current_heads():
        if revision not in known:
            raise StorageError(
                f"the database schema is at revision {revision!r}, which this server "
                "does not know (a newer server migrated it); upgrade this server"
            )


def upgrade_database(db: Database) -> None:
    """Apply the migrations `db` lacks, up to `head_revision()`.

    Raises:
        StorageError: the database cannot be reached, is at a revision this
            server does not know, or a migration failed (on PostgreSQL nothing
            of the upgrade is kept).
    """
    try:
        # One transaction: the lock, the check and every migration (Alembic
        # joins a transaction it finds open and leaves the commit to us).
        with db.engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            _check_known(conn)
            command.upgrade(alembic_config(conn), "head")
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot migrate the database: {describe_database_error(exc)}") from exc
    except CommandError as exc:
        raise StorageError(f"cannot migrate the database: {exc}") from exc


def open_database(url: str) -> Database:
    """A `Database` on `url`, migrated to head.

    Raises:
        StorageError: the URL is not usable, or the upgrade failed.
    """
    db = Database(url)
    try:
        upgrade_database(db)
    except BaseException:
        db.dispose()
        raise
    return db


__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "head_revision",
    "open_database",
    "upgrade_database",
]
