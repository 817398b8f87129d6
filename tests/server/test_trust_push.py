"""The server keeps the newest trust root and publishes every version to devices.

End to end: `edgefleet server run` as a child process on a real mosquitto,
`edgefleet trust push` in process. In process, on a real database: the start's
reconciliation of the --trust file with the store, and replicas adopting what
another one stored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.bundle import build_bundle
from edgefleet.errors import ServerKeyNotListedError, TrustRootExpiredError, UsageError
from edgefleet.keys import SigningKey
from edgefleet.mqtt.topics import TRUST_ROOT_FILTER, trust_root_topic
from edgefleet.server.db.database import Database
from edgefleet.server.principals import Principal, Role
from edgefleet.server.settings import sqlite_url
from edgefleet.server.tokens import create_api_token
from edgefleet.server.trustroots import open_trust_roots
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot, build_trust_root_signed, rotate_trust_root, sign_trust_root
from tests.agent.broker import MosquittoBroker, Observer, publish_once
from tests.clirun import Cli
from tests.conftest import PROFILE, KeySet, make_trust_root, write_model_dir
from tests.server.serverproc import ServerProcess, json_of, write_server_keys

ADMIN = Principal("admin", Role.ADMIN)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker.running(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def rotate(current: TrustRoot, signers: list[SigningKey], **roles: list[SigningKey]) -> TrustRoot:
    """The next version: `roles` replaces a role's keys; `signers` sign it."""
    return rotate_trust_root(
        current,
        signers=signers,
        expires=utcnow() + dt.timedelta(days=30),
        **{name: [key.public for key in keys] for name, keys in roles.items()},
    )


def write(directory: Path, root: TrustRoot) -> Path:
    path = directory / f"trust.v{root.version}.json"
    path.write_bytes(root.raw)
    return path


def release_bundle(directory: Path, key: SigningKey, version: str) -> Path:
    output = directory / f"demo-{version}.efb"
    build_bundle(
        write_model_dir(directory / f"src-{version}"),
        output,
        name="demo",
        version=version,
        keys=[key],
        profiles=[PROFILE],
    )
    return output


def tokens_of(data: Path) -> dict[Role, str]:
    db = Database(sqlite_url(data))
    try:
        with db.session() as session:
            return {role: create_api_token(session, role.value, role)[0] for role in Role}
    finally:
        db.dispose()


def retained_trust_roots(broker: MosquittoBroker, count: int) -> dict[str, bytes]:
    """What a device connecting now receives on the trust-root filter."""
    observer = Observer(broker.url, [TRUST_ROOT_FILTER])
    try:
        observer.wait_for(lambda: len(observer.messages) >= count)
        assert all(message.retain for message in observer.messages)
        return {message.topic: message.payload for message in observer.messages}
    finally:
        observer.close()


def test_pushed_roots_are_checked_stored_published_and_survive_a_restart(
    tmp_path: Path, broker: MosquittoBroker, keyset: KeySet, trust: TrustRoot, run: Cli
) -> None:
    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    data = tmp_path / "data"
    args = ("--mqtt", broker.url, "--data", data)
    new_release = SigningKey.generate()
    v2 = rotate(trust, [keyset.root], release=[new_release])
    new_root = SigningKey.generate()
    v3 = rotate(v2, [keyset.root, new_root], root=[new_root])
    v4 = rotate(v3, [new_root])
    v5 = rotate(v4, [new_root])
    stranger = SigningKey.generate()
    forged_v4 = sign_trust_root(  # signed by its own root key only, not by v3's
        build_trust_root_signed(
            version=4,
            expires=utcnow() + dt.timedelta(days=30),
            root=[stranger.public],
            release=[new_release.public],
            server=[keyset.server.public],
        ),
        [stranger],
    )
    bundle = release_bundle(tmp_path, new_release, "2.0.0")

    server = ServerProcess.start(tmp_path / "server.log", trust_path, key_path, *args)
    try:
        server.wait_healthy()
        tokens = tokens_of(data)
        cli = ("--server", server.url, "--token", tokens[Role.ADMIN])
        with server.api(tokens[Role.OPERATOR]) as operator:
            # The new release key is not trusted yet.
            refused = json_of(operator.post("/bundles", content=bundle.read_bytes()), 422)
            assert refused["error"] == "unknown-key"
            for role in (Role.VIEWER, Role.OPERATOR):
                with server.api(tokens[role]) as api:
                    denied = json_of(api.post("/trust", content=v2.raw, headers=JSON), 403)
                    assert denied["error"] == "forbidden"

            out, _ = run("trust", "push", write(tmp_path, v2), *cli)
            assert "trust root version 2" in out
            # Release signatures are checked with the newest root from now on.
            json_of(operator.post("/bundles", content=bundle.read_bytes()), 201)
            run("trust", "push", write(tmp_path, v3), *cli)

            _, err = run("trust", "push", write(tmp_path, v5), *cli, status=1)
            assert err.startswith("refused [trust-root-version]:"), err
            _, err = run("trust", "push", write(tmp_path, forged_v4), *cli, status=1)
            assert err.startswith("refused [trust-root-signature]:"), err
            _, err = run("trust", "push", write(tmp_path, v3), *cli, status=1)  # again
            assert err.startswith("refused [trust-root-version]:"), err

            shown, _ = run("trust", "show", *cli)
            assert "trust root version 3" in shown
            audit = json_of(operator.get("/audit", headers=_bearer(tokens[Role.ADMIN])), 200)
            pushes = [e["target"] for e in _items(audit) if e["action"] == "trust-root.push"]
            assert sorted(pushes) == ["trust-root/2", "trust-root/3"]

        # A device connecting after both pushes receives both versions, retained.
        expected = {trust_root_topic(2): v2.raw, trust_root_topic(3): v3.raw}
        assert retained_trust_roots(broker, 2) == expected
        assert "Traceback" not in server.stop()

        # The broker forgets them (as the embedded one does when it restarts) ...
        for topic in expected:
            publish_once(broker.url, topic, b"", retain=True)
        # ... and the server, started again with the version 1 file, uses the stored
        # version 3 and publishes every stored version again when it connects.
        server = ServerProcess.start(tmp_path / "again.log", trust_path, key_path, *args)
        server.wait_healthy()
        with server.api(tokens[Role.VIEWER]) as viewer:
            assert json_of(viewer.get("/trust"), 200)["version"] == 3
        assert "using the newest stored trust root, version 3" in server.log
        assert retained_trust_roots(broker, 2) == expected
    finally:
        server.stop()


JSON = {"Content-Type": "application/json"}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _items(value: object) -> list[dict[str, str]]:
    items = value["items"] if isinstance(value, dict) else value
    assert isinstance(items, list)
    return items


def test_start_reconciles_the_file_with_the_store(
    sqlite_database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    server_keyid = keyset.server.public.keyid
    v2 = rotate(trust, [keyset.root])
    v3 = rotate(v2, [keyset.root])

    # Nothing stored: the file's root is stored.
    assert open_trust_roots(sqlite_database, trust, server_keyid).current == trust
    # Two versions ahead of the store: refused, naming both.
    with pytest.raises(
        UsageError, match="is version 3, but the newest stored trust root is version 1"
    ):
        open_trust_roots(sqlite_database, v3, server_keyid)
    # The next version: checked against the stored one, stored.
    assert open_trust_roots(sqlite_database, v2, server_keyid).current.version == 2
    # An older file: the stored newest is used.
    assert open_trust_roots(sqlite_database, trust, server_keyid).current.version == 2
    # Another document under a stored version number is refused.
    other_v1 = make_trust_root(keyset, release=[SigningKey.generate()])
    with pytest.raises(UsageError, match="differs from the stored version 1"):
        open_trust_roots(sqlite_database, other_v1, server_keyid)
    # A server key the newest root does not list cannot start.
    with pytest.raises(ServerKeyNotListedError):
        open_trust_roots(sqlite_database, trust, SigningKey.generate().public.keyid)


def test_a_push_must_keep_the_server_key_and_not_be_expired(
    sqlite_database: Database, keyset: KeySet, trust: TrustRoot
) -> None:
    roots = open_trust_roots(sqlite_database, trust, keyset.server.public.keyid)
    without_server = rotate(trust, [keyset.root], server=[SigningKey.generate()])
    with pytest.raises(ServerKeyNotListedError, match="does not list this server's key"):
        roots.push(without_server.raw, ADMIN)
    expired = rotate_trust_root(
        trust, signers=[keyset.root], expires=utcnow() - dt.timedelta(days=1)
    )
    with pytest.raises(TrustRootExpiredError):
        roots.push(expired.raw, ADMIN)
    assert roots.current.version == 1
    # Nothing refused was stored: a fresh start still sees version 1 only.
    assert open_trust_roots(sqlite_database, trust, None).current.version == 1


def test_a_replica_adopts_what_another_stored(
    sqlite_database: Database, keyset: KeySet, trust: TrustRoot
) -> None:
    server_keyid = keyset.server.public.keyid
    first = open_trust_roots(sqlite_database, trust, server_keyid)
    second = open_trust_roots(sqlite_database, trust, server_keyid)
    adopted: list[int] = []
    second.add_listener(lambda root: adopted.append(root.version))
    v2 = rotate(trust, [keyset.root])
    v3 = rotate(v2, [keyset.root])
    first.push(v2.raw, ADMIN)
    first.push(v3.raw, ADMIN)
    second.refresh()
    assert adopted == [2, 3]
    assert second.current.raw == v3.raw
    assert [topic for topic, _, _ in second.retained_messages()] == [
        trust_root_topic(2),
        trust_root_topic(3),
    ]
    # A push to a replica that has not refreshed yet is checked against the stored newest.
    v4 = rotate(v3, [keyset.root])
    assert first.current.version == 3
    third = open_trust_roots(sqlite_database, trust, server_keyid)
    third_adopted: list[int] = []
    third.add_listener(lambda root: third_adopted.append(root.version))
    second.push(v4.raw, ADMIN)
    v5 = rotate(v4, [keyset.root])
    third.push(v5.raw, ADMIN)
    assert third_adopted == [4, 5]
