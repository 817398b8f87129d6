"""Storage: migrations equal the models, replicas migrate at once, units of work are atomic."""

from __future__ import annotations

import datetime as dt
import sys
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text

from edgefleet.server.audit import list_audit, record_audit
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import (
    MIGRATIONS_DIR,
    alembic_config,
    current_revision,
    head_revision,
    open_database,
    upgrade_database,
)
from edgefleet.server.db.models import ApiToken, AuditEntry, Base, Device
from edgefleet.server.errors import StorageError
from edgefleet.server.principals import SYSTEM
from tests.agent.broker import free_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)
REPO = Path(__file__).resolve().parents[2]


def make_device(device_id: str, **overrides: object) -> Device:
    fields: dict[str, object] = {
        "id": device_id,
        "public_key": "ab" * 32,
        "enrolled_at": NOW,
        "profile": "x86_64-avx2",
        "arch": "x86_64",
        "runtimes": ["onnxruntime"],
        "agent_version": "0.4.0",
        "tags": {"site": "lab"},
    }
    fields.update(overrides)
    return Device(**fields)


def schema_differences(db: Database) -> list[object]:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


# --- migrations


def test_migrated_schema_equals_the_models(database: Database) -> None:
    assert schema_differences(database) == []
    assert current_revision(database) == head_revision()


def test_migrating_an_empty_postgresql_database_matches_the_models(postgres_url: str) -> None:
    db = open_database(postgres_url)
    try:
        assert schema_differences(db) == []
        assert set(inspect(db.engine).get_table_names()) == {
            *Base.metadata.tables,
            "alembic_version",
        }
    finally:
        db.dispose()


def test_upgrade_twice_changes_nothing(sqlite_database: Database) -> None:
    with sqlite_database.session() as session:
        session.add(make_device("dev-1"))
    upgrade_database(sqlite_database)
    with sqlite_database.session() as session:
        assert session.scalar(select(func.count()).select_from(Device)) == 1
    assert current_revision(sqlite_database) == head_revision()


def test_downgrade_to_base_then_upgrade(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(db.engine).get_table_names()) == {"alembic_version"}
        upgrade_database(db)
        assert schema_differences(db) == []
    finally:
        db.dispose()


def test_two_replicas_starting_at_once_migrate_once(postgres_url: str) -> None:
    replicas = 4
    barrier = threading.Barrier(replicas)
    errors: list[BaseException] = []
    opened: list[Database] = []

    def start_replica() -> None:
        db = Database(postgres_url)
        opened.append(db)
        barrier.wait()
        try:
            upgrade_database(db)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start_replica) for _ in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        with opened[0].engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        assert versions == [(head_revision(),)]
        assert schema_differences(opened[0]) == []
    finally:
        for db in opened:
            db.dispose()


def test_a_schema_from_a_newer_server_is_refused_untouched(sqlite_database: Database) -> None:
    with sqlite_database.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
        conn.execute(text("DROP TABLE counters"))  # so an upgrade would show
    with pytest.raises(StorageError, match=r"9999_future.*does not know"):
        upgrade_database(sqlite_database)
    assert current_revision(sqlite_database) == "9999_future"
    assert "counters" not in inspect(sqlite_database.engine).get_table_names()


def test_an_unreachable_database_is_a_storage_error() -> None:
    url = f"postgresql+psycopg://edgefleet:edgefleet@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(StorageError, match="cannot migrate"):
        open_database(url)


def test_a_bad_url_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="not valid"):
        open_database("not a url")


def test_migrations_ship_in_the_installed_package() -> None:
    """A non-editable install carries env.py, the versions and script.py.mako.

    setup.py finds the packages under server/ (the wheel's test checks that it
    holds every file of them); the data file must be declared as package data.
    """
    assert MIGRATIONS_DIR.is_relative_to(REPO / "server")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = setuptools["package-data"]["edgefleet.server.db.migrations"]
    others = [
        path.name
        for path in MIGRATIONS_DIR.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    ]
    assert others == ["script.py.mako"]
    assert "script.py.mako" in data
    assert (MIGRATIONS_DIR / "versions" / "__init__.py").is_file()


# --- units of work


def test_a_failing_unit_of_work_leaves_nothing_behind(database: Database) -> None:
    with pytest.raises(RuntimeError, match="midway"), database.session() as session:
        session.add(make_device("dev-1"))
        session.flush()  # written inside the transaction ...
        record_audit(session, SYSTEM, "device.enroll", "dev-1", now=NOW)
        session.flush()
        raise RuntimeError("failed midway")  # ... and rolled back
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Device)) == 0
        assert list_audit(session) == []


def test_a_database_error_rolls_back_the_whole_unit(database: Database) -> None:
    with database.session() as session:
        session.add(ApiToken(name="a", role="admin", token_hash="0" * 64, created_at=NOW))
    with pytest.raises(StorageError, match="IntegrityError"), database.session() as session:
        session.add(make_device("dev-1"))
        record_audit(session, SYSTEM, "token.create", "b", now=NOW)
        session.add(ApiToken(name="b", role="viewer", token_hash="0" * 64, created_at=NOW))
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Device)) == 0
        assert session.scalar(select(func.count()).select_from(AuditEntry)) == 0
        assert session.scalars(select(ApiToken.name)).all() == ["a"]


def test_timestamps_come_back_as_aware_utc(database: Database) -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    with database.session() as session:
        session.add(make_device("dev-1", last_seen=NOW.astimezone(plus_two)))
    with database.session() as session:
        device = session.get(Device, "dev-1")
        assert device is not None
        assert device.last_seen == NOW
        assert device.last_seen.utcoffset() == dt.timedelta(0)
        assert device.enrolled_at.tzinfo is not None
        # Comparisons happen in UTC on every backend.
        later = NOW.astimezone(plus_two) + dt.timedelta(seconds=1)
        found = session.scalars(select(Device.id).where(Device.last_seen < later)).all()
        assert found == ["dev-1"]


def test_a_naive_timestamp_is_refused(database: Database) -> None:
    with pytest.raises(StorageError, match="naive"), database.session() as session:
        session.add(make_device("dev-1", enrolled_at=dt.datetime(2026, 1, 1)))
    with database.session() as session:
        assert session.get(Device, "dev-1") is None
