"""Scale-out: two `edgefleet server run` replicas on one PostgreSQL and one mosquitto.

Both replicas get the same --db, --mqtt and --data: the database holds the
fleet's state and the leases, the broker spreads device messages over the
replicas through the shared subscriptions `$share/edgefleet-server.<kind>/...`, and
the data directory holds the pushed bundle files (a bundle pushed through one
replica is stored under data/bundles/<sha256>.efb and served by either; in a
real deployment that directory is a shared volume).

What the test proves, with 20 simulated devices (`FleetSimulator`, each with
its own enrolled key, signing every message):

- telemetry is shared: each replica's own counter of accepted telemetry
  (GET /metrics) is above zero, their sum is exactly what was sent, and the
  merged buckets in the database add up to exactly the requests sent (nothing
  lost, nothing counted twice);
- one rollout started through replica A completes with every device receiving
  exactly one install directive, and exactly one replica published them (its
  `edgefleet_directives_published_total` is 20, the other's 0);
- when the replica driving a second rollout is killed (SIGKILL, its lease
  left to expire), the other takes the lease over once it expired (TTL 15 s)
  and completes the rollout; still one install directive per device. This
  holds because a replica's MQTT session expires no later than its leases
  (`mqtt_session_expiry`, the lease TTL): mosquitto keeps handing a dead
  member of a shared subscription its round-robin share until that session
  expires, and device answers sent there would never reach the replica
  taking over.

Each replica has its own `--replica-name` (both run on this host, whose name
is the default): the name keeps its MQTT session.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from edgefleet.bundle import build_bundle
from edgefleet.mqtt.topics import TopicKind
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Lease, RolloutDevice, TelemetryBucket
from edgefleet.server.principals import Role
from edgefleet.server.rollouts.driver import lease_name
from edgefleet.server.tokens import create_api_token
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, mosquitto_or_skip
from tests.conftest import PROFILE, KeySet, write_model_dir
from tests.server.fleet import FleetSimulator, SimDevice, make_devices, telemetry_window
from tests.server.serverproc import ServerProcess, json_of, wait_until, write_server_keys

DEVICES = 20
WINDOWS = 5  # telemetry windows per device
REQUESTS = 100  # per window
LEASE_TTL_S = 15  # the server's default `lease_ttl`
ACCEPTED = "edgefleet_mqtt_messages_accepted_total"
DIRECTIVES = "edgefleet_directives_published_total"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    mosquitto_or_skip()
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


def build_release(directory: Path, keyset: KeySet, version: str) -> Path:
    """A signed bundle for the simulated devices' profile (its model is never run)."""
    output = directory / f"demo-{version}.efb"
    build_bundle(
        write_model_dir(directory / f"src-{version}"),
        output,
        name="demo",
        version=version,
        keys=[keyset.release],
        profiles=[PROFILE],
    )
    return output


def installs_of(fleet: FleetSimulator, device: SimDevice, version: str) -> int:
    return sum(
        d.action == "install" and d.bundle is not None and d.bundle.version == version
        for d in fleet.directives_for(device.id)
    )


def wait_for_state(replica: ServerProcess, token: str, rollout_id: int, timeout: float) -> Any:
    with replica.api(token) as api:
        status: Any = None

        def reached() -> bool:
            nonlocal status
            status = json_of(api.get(f"/rollouts/{rollout_id}"), 200)
            return bool(status["state"] in ("completed", "aborted"))

        wait_until(reached, timeout, interval=0.5)
        return status


def test_two_replicas_share_telemetry_and_one_drives_each_rollout(
    tmp_path: Path, broker: MosquittoBroker, postgres_url: str, keyset: KeySet, trust: TrustRoot
) -> None:
    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    shared = ("--db", postgres_url, "--mqtt", broker.url, "--data", tmp_path / "data")
    # Started together: both migrate the fresh database at once (an advisory lock orders them).
    replicas = [
        ServerProcess.start(tmp_path / f"replica-{name}.log", trust_path, key_path,
                            *shared, "--open-enrollment", "--replica-name", name)
        for name in "ab"
    ]  # fmt: skip
    a, b = replicas
    fleet: FleetSimulator | None = None
    try:
        for replica in replicas:
            replica.wait_healthy()
        db = Database(postgres_url)
        try:
            with db.session() as session:
                token, _ = create_api_token(session, "ops", Role.OPERATOR)
        finally:
            db.dispose()

        devices = make_devices(DEVICES, "rep")
        for index, device in enumerate(devices):  # through both APIs
            with replicas[index % 2].api() as api:
                body = {
                    "device_id": device.id,
                    "public_key": device.public_key,
                    "profile": PROFILE,
                    "arch": "x86_64",
                    "runtimes": ["onnxruntime"],
                    "agent_version": "1.0.0",
                    "tags": {"site": "lab"},
                }
                json_of(api.post("/devices/enroll", json=body), 201)
        releases = [build_release(tmp_path / "bundles", keyset, v) for v in ("1.0.0", "1.1.0")]
        for release, replica in zip(releases, replicas, strict=True):
            with replica.api(token) as api:
                pushed = api.post(
                    "/bundles",
                    content=release.read_bytes(),
                    headers={"Content-Type": "application/octet-stream"},
                )
                json_of(pushed, 201)

        fleet = FleetSimulator(broker.url, devices, trust=trust, clients=2)

        # -- telemetry: shared between the replicas, nothing lost, nothing twice ------------
        start = utcnow().replace(second=0, microsecond=0) - dt.timedelta(minutes=WINDOWS)
        sent = []
        for window in range(WINDOWS):
            for device in devices:
                sent.append(
                    fleet.send(
                        device.id,
                        TopicKind.TELEMETRY,
                        telemetry_window(
                            device.id, start + dt.timedelta(minutes=window), requests=REQUESTS
                        ),
                    )
                )
        for info in sent:
            info.wait_for_publish(10)

        def accepted() -> list[float]:
            return [r.metric(ACCEPTED, kind="telemetry") for r in replicas]

        total = DEVICES * WINDOWS
        assert wait_until(lambda: sum(accepted()) >= total, 20), accepted()
        time.sleep(1.5)  # a late duplicate would show now
        shares = accepted()
        assert sum(shares) == total, shares
        assert all(share > 0 for share in shares), f"one replica got nothing: {shares}"

        db = Database(postgres_url)
        try:

            def stored_requests() -> int:
                with db.session() as session:
                    return int(session.scalar(select(func.sum(TelemetryBucket.requests))) or 0)

            # Ingestion flushes every second (`telemetry_flush_s`).
            assert wait_until(lambda: stored_requests() >= total * REQUESTS, 10)
            time.sleep(1.5)
            assert stored_requests() == total * REQUESTS

            # -- rollout 1 through replica A: completed, driven by exactly one replica ------
            plan = {"stages": [{"percent": 34}, {"percent": 100}], "gates": {"bake_s": 1}}
            with a.api(token) as api:
                started = {"bundle": "demo@1.0.0", "plan": plan}
                first = json_of(api.post("/rollouts", json=started), 201)["id"]
            status = wait_for_state(b, token, first, 30)
            assert status["state"] == "completed", status
            assert all(installs_of(fleet, d, "1.0.0") == 1 for d in devices), fleet.directives
            published = [r.metric(DIRECTIVES) for r in replicas]
            assert sorted(published) == [0, DEVICES], published
            with db.session() as session:
                attempts = list(
                    session.scalars(
                        select(RolloutDevice.attempts).where(RolloutDevice.rollout_id == first)
                    )
                )
            assert attempts == [1] * DEVICES, attempts

            # -- rollout 2: its driver dies, the other replica takes over --------------------
            plan = {"stages": [{"count": 1}, {"percent": 100}], "gates": {"bake_s": 5}}
            with b.api(token) as api:
                started = {"bundle": "demo@1.1.0", "plan": plan}
                second = json_of(api.post("/rollouts", json=started), 201)["id"]

            def canary_committed() -> bool:
                return sum(installs_of(fleet, d, "1.1.0") for d in devices) == 1

            assert fleet.wait_for(canary_committed, 20), fleet.directives

            def canary_recorded() -> bool:  # its answer stored, not in a batch in memory
                with b.api(token) as api:
                    found = json_of(api.get(f"/rollouts/{second}"), 200)
                return bool(found["devices"].get("succeeded") == 1)

            assert wait_until(canary_recorded, 10)
            with db.session() as session:
                owner = session.scalar(select(Lease.owner).where(Lease.name == lease_name(second)))
            assert owner is not None
            driving = next(r for r in replicas if f"-{r.pid}-" in owner)
            other = b if driving is a else a
            driven_before = other.metric(DIRECTIVES)
            killed_at = time.monotonic()
            driving.kill()  # within the 5 s bake: the next stage has not begun

            status = wait_for_state(other, token, second, LEASE_TTL_S + 25)
            took = time.monotonic() - killed_at
            assert status["state"] == "completed", (status, other.log)
            assert all(installs_of(fleet, d, "1.1.0") == 1 for d in devices), fleet.directives
            # The survivor sent the other stage's directives: all but the canary's.
            assert other.metric(DIRECTIVES) - driven_before == DEVICES - 1
            assert took >= LEASE_TTL_S - 3, (
                f"taken over after {took:.1f} s, before the lease expired"
            )
            assert not fleet.refused, fleet.refused
        finally:
            db.dispose()
    finally:
        if fleet is not None:
            fleet.close()
        logs = [replica.stop() for replica in replicas]
        for replica, log in zip(replicas, logs, strict=True):
            if replica.process.returncode != -9:  # a killed replica wrote no orderly end
                assert "Traceback" not in log, log
