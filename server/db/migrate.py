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

What is refused rather than touched, before anything is written (`check_database`):
a database whose revision this code does not know (migrated by a newer server);
one with tables but no schema revision (not made by this server, or its version
table was dropped); an SQLite file that is empty (0 bytes: emptied or
truncated, never a fresh database), not an SQLite database, or damaged (its
`PRAGMA quick_check` finds faults). Only a missing SQLite file, or a database
with no tables at all, is new and gets the whole schema.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from edgefleet.server.db.database import Database, describe_database_error
from edgefleet.server.errors import StorageError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# pg_advisory_xact_lock key shared by every edgefleet replica: b"efmigr" as an integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"efmigr", "big")

# What to do with a database that is refused.
RESTORE = (
    "restore it from a backup, or move it away to start an empty fleet "
    "(every device then enrolls again)"
)


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


def describe_database(db: Database) -> str:
    """The database for messages: the SQLite file's path, or the URL without its password."""
    url = db.engine.url
    if db.is_sqlite and url.database not in (None, "", ":memory:"):
        return str(Path(url.database or "").resolve())
    return url.render_as_string(hide_password=True)


def check_sqlite_file(db: Database) -> None:
    """Refuse an SQLite file that exists but is empty, not a database, or damaged.

    A missing file passes: it is a first start.

    Raises:
        StorageError: naming the file, what is wrong and what to do.
    """
    url = db.engine.url
    if not db.is_sqlite or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database or "")
    where = describe_database(db)
    try:
        if not path.exists():
            return
        if path.stat().st_size == 0:
            raise StorageError(
                f"database {where} is empty (0 bytes): it was emptied or cut short, and "
                f"starting on it would lose every token, device and rollout; {RESTORE}"
            )
        with db.engine.connect() as conn:
            faults = [str(row[0]) for row in conn.execute(text("PRAGMA quick_check"))]
    except OSError as exc:
        raise StorageError(f"cannot read database {where}: {exc.strerror or exc}") from exc
    except SQLAlchemyError as exc:
        raise StorageError(
            f"database {where} is damaged or not an SQLite database "
            f"({describe_database_error(exc)}); {RESTORE}"
        ) from exc
    if faults != ["ok"]:
        raise StorageError(f"database {where} is damaged (integrity check: {faults[0]}); {RESTORE}")


def _check_schema(connection: Connection, where: str) -> None:
    """Refuse a schema at a revision this server does not know, or tables without a revision."""
    known = {
        script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    }
    heads = MigrationContext.configure(connection).get_current_heads()
    for revision in heads:
        if revision not in known:
            raise StorageError(
                f"database {where} is at schema revision {revision!r}, which this server "
                "does not know (a newer server migrated it): run that server version, "
                "or upgrade this one"
            )
    if not heads:
        # A downgrade to base leaves Alembic's version table, empty: that is a fresh schema.
        tables = sorted(set(inspect(connection).get_table_names()) - {"alembic_version"})
        if tables:
            shown = ", ".join(tables[:3]) + (", ..." if len(tables) > 3 else "")
            raise StorageError(
                f"database {where} has tables ({shown}) but no schema revision: it was not "
                f"made by an edgefleet server, or was emptied and recreated; {RESTORE}"
            )


def upgrade_database(db: Database) -> None:
    """Apply the migrations `db` lacks, up to `head_revision()`.

    Raises:
        StorageError: the database cannot be reached, is at a revision this
            server does not know, has tables but no revision, or a migration
            failed (on PostgreSQL nothing of the upgrade is kept).
    """
    try:
        # One transaction: the lock, the check and every migration (Alembic
        # joins a transaction it finds open and leaves the commit to us).
        with db.engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            _check_schema(conn, describe_database(db))
            command.upgrade(alembic_config(conn), "head")
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot migrate the database: {describe_database_error(exc)}") from exc
    except CommandError as exc:
        raise StorageError(f"cannot migrate the database: {exc}") from exc


def open_database(url: str) -> Database:
    """A `Database` on `url`, checked (`check_sqlite_file`) and migrated to head.

    Raises:
        StorageError: the URL is not usable, the database is refused, or the upgrade failed.
    """
    db = Database(url)
    try:
        check_sqlite_file(db)
        upgrade_database(db)
    except BaseException:
        db.dispose()
        raise
    return db


__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "check_sqlite_file",
    "current_revision",
    "describe_database",
    "head_revision",
    "open_database",
    "upgrade_database",
]
