"""A replica's name (its MQTT session) is claimed in the database: never two running at once.

A killed replica's claim runs out and a replica started under the same name
takes it after waiting; a name a running replica holds refuses the start; a
clean stop frees the name at once.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from edgefleet.errors import UsageError
from edgefleet.server.db.database import Database
from edgefleet.server.leases import acquire_lease, lease_holder
from edgefleet.server.replicaname import (
    claim_replica_name,
    lease_name,
    release_replica_name,
)
from edgefleet.server.settings import ServerSettings


def settings(tmp_path: Path, replica_id: str) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp_path,
        trust_path=tmp_path / "trust.json",
        server_key_path=tmp_path / "server.key",
        replica_id=replica_id,
        replica_name="edge-1",
    )


def holder(db: Database) -> str | None:
    with db.session() as session:
        return lease_holder(session, lease_name("edge-1"))


def hold(db: Database, replica_id: str, ttl: dt.timedelta) -> None:
    """The claim of another process under the name, held for `ttl` (not renewed)."""
    with db.session() as session:
        assert acquire_lease(session, lease_name("edge-1"), replica_id, ttl)


def test_a_name_held_by_a_running_replica_refuses_the_start(
    sqlite_database: Database, tmp_path: Path
) -> None:
    hold(sqlite_database, "running-process", dt.timedelta(hours=1))
    with pytest.raises(UsageError) as refused:
        claim_replica_name(sqlite_database, settings(tmp_path, "new-process"))
    assert str(refused.value) == (
        "replica name 'edge-1' is in use by a running replica (running-process): "
        "give each replica its own --replica-name"
    )
    assert holder(sqlite_database) == "running-process"


def test_a_killed_replicas_name_is_taken_once_its_claim_ran_out(
    sqlite_database: Database, tmp_path: Path
) -> None:
    hold(sqlite_database, "killed-process", dt.timedelta(seconds=1))
    claim_replica_name(sqlite_database, settings(tmp_path, "restarted-process"))
    assert holder(sqlite_database) == "restarted-process"


def test_a_clean_stop_frees_the_name(sqlite_database: Database, tmp_path: Path) -> None:
    first = settings(tmp_path, "first-process")
    claim_replica_name(sqlite_database, first)
    release_replica_name(sqlite_database, first)
    assert holder(sqlite_database) is None
    claim_replica_name(sqlite_database, settings(tmp_path, "second-process"))
    assert holder(sqlite_database) == "second-process"
