"""Leases and counters: one holder at a time, take-over after expiry, no value handed out twice."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter as Tally

import pytest

from edgefleet.server.db.database import Database
from edgefleet.server.leases import acquire_lease, lease_holder, next_counter, release_lease

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.timezone.utc)
TTL = dt.timedelta(seconds=30)


def acquire(db: Database, owner: str, now: dt.datetime, name: str = "rollout:1") -> bool:
    with db.session() as session:
        return acquire_lease(session, name, owner, TTL, now=now)


def test_a_lease_has_one_holder_until_it_expires(database: Database) -> None:
    assert acquire(database, "replica-a", NOW)
    assert not acquire(database, "replica-b", NOW + dt.timedelta(seconds=10))
    # The holder renews: the lease now runs 30 s from the renewal.
    assert acquire(database, "replica-a", NOW + dt.timedelta(seconds=20))
    assert not acquire(database, "replica-b", NOW + dt.timedelta(seconds=40))
    with database.session() as session:
        assert lease_holder(session, "rollout:1", now=NOW + dt.timedelta(seconds=40)) == "replica-a"
        assert lease_holder(session, "rollout:1", now=NOW + dt.timedelta(seconds=51)) is None
    # Not renewed: another replica takes over, and the old holder is out.
    assert acquire(database, "replica-b", NOW + dt.timedelta(seconds=51))
    assert not acquire(database, "replica-a", NOW + dt.timedelta(seconds=52))


def test_leases_are_independent_by_name(database: Database) -> None:
    assert acquire(database, "replica-a", NOW, name="rollout:1")
    assert acquire(database, "replica-b", NOW, name="rollout:2")
    assert acquire(database, "replica-b", NOW, name="fleet-timestamp")
    assert not acquire(database, "replica-a", NOW, name="fleet-timestamp")


def test_a_released_lease_is_free_and_only_the_holder_releases(database: Database) -> None:
    assert acquire(database, "replica-a", NOW)
    with database.session() as session:
        assert not release_lease(session, "rollout:1", "replica-b")
    assert not acquire(database, "replica-b", NOW)
    with database.session() as session:
        assert release_lease(session, "rollout:1", "replica-a")
        assert lease_holder(session, "rollout:1", now=NOW) is None
    assert acquire(database, "replica-b", NOW)


def test_a_lease_acquired_in_a_failed_unit_of_work_is_not_held(database: Database) -> None:
    with pytest.raises(RuntimeError), database.session() as session:
        assert acquire_lease(session, "rollout:1", "replica-a", TTL, now=NOW)
        raise RuntimeError("crashed before commit")
    assert acquire(database, "replica-b", NOW)


def test_a_non_positive_ttl_is_refused(sqlite_database: Database) -> None:
    with sqlite_database.session() as session, pytest.raises(ValueError, match="positive"):
        acquire_lease(session, "x", "replica-a", dt.timedelta(0), now=NOW)


def test_replicas_racing_for_a_lease_get_one_winner(database: Database) -> None:
    replicas = 6
    barrier = threading.Barrier(replicas)
    results: dict[str, bool] = {}

    def race(owner: str) -> None:
        barrier.wait()
        results[owner] = acquire(database, owner, NOW)

    threads = [threading.Thread(target=race, args=(f"replica-{i}",)) for i in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [owner for owner, held in results.items() if held]
    assert len(results) == replicas
    assert len(winners) == 1
    with database.session() as session:
        assert lease_holder(session, "rollout:1", now=NOW) == winners[0]


def test_counters_start_at_one_and_count_per_name(database: Database) -> None:
    with database.session() as session:
        assert [next_counter(session, "fleet-timestamp") for _ in range(3)] == [1, 2, 3]
        assert next_counter(session, "other") == 1
    with database.session() as session:
        assert next_counter(session, "fleet-timestamp") == 4


def test_a_rolled_back_increment_is_handed_out_again(database: Database) -> None:
    with database.session() as session:
        assert next_counter(session, "c") == 1
    with pytest.raises(RuntimeError), database.session() as session:
        assert next_counter(session, "c") == 2
        raise RuntimeError("publish failed")
    with database.session() as session:
        assert next_counter(session, "c") == 2


def test_concurrent_increments_never_repeat_a_value(database: Database) -> None:
    workers, rounds = 4, 15
    barrier = threading.Barrier(workers)
    values: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        barrier.wait()
        for _ in range(rounds):
            with database.session() as session:
                value = next_counter(session, "seq")
            with lock:
                values.append(value)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(values) == list(range(1, workers * rounds + 1))
    assert max(Tally(values).values()) == 1
