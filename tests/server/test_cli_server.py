"""`edgefleet server ...` and the client commands against the real API served by uvicorn.

The app is the real one (`create_app` on a migrated SQLite database, a real
BundleStore, a recording publisher: `tests.server.apiclient.make_api`), served
over TCP by uvicorn in a thread, so the CLI's streaming upload, its error
translation and its rendering meet the server's actual answers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import ssl
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from edgefleet.agent.enroll import enroll
from edgefleet.agent.errors import ServerUnreachableError
from edgefleet.agent.layout import StateLayout
from edgefleet.agentconfig import AgentConfig
from edgefleet.bundle import build_bundle
from edgefleet.fleetca import init_ca
from edgefleet.keys import SigningKey
from edgefleet.server.db.database import Database
from edgefleet.server.db.migrate import open_database
from edgefleet.server.db.models import Alert
from edgefleet.server.drift.alerts import open_alert
from edgefleet.server.drift.evaluator import FEATURE_DRIFT
from edgefleet.server.principals import Role
from edgefleet.server.settings import ServerSettings, sqlite_url
from edgefleet.server.tokens import authenticate
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot, rotate_trust_root
from edgefleet.wire import API_PREFIX
from tests.agent.broker import free_port
from tests.clirun import Cli
from tests.conftest import PROFILE, KeySet, write_model_dir
from tests.server.apiclient import Api, make_api, serve
from tests.server.serverproc import ServerProcess, wait_until, write_server_keys


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture
def served(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    """The real app, served; EDGEFLEET_SERVER points at it, EDGEFLEET_TOKEN is an operator's."""
    api = make_api(sqlite_database, tmp_path, trust)
    with serve(api) as url:
        monkeypatch.setenv("EDGEFLEET_SERVER", url)
        monkeypatch.setenv("EDGEFLEET_TOKEN", api.tokens[Role.OPERATOR])
        yield api


def test_push_list_show_against_the_real_server(
    served: Api, run: Cli, bundle_file: Path, tmp_path: Path
) -> None:
    out, _ = run("bundles", "push", bundle_file)
    assert out.startswith("pushed: demo@1.2.3, ")
    out, _ = run("bundles", "push", bundle_file)
    assert out.startswith("already stored (identical file): demo@1.2.3")
    out, _ = run("bundles", "list")
    assert out.splitlines()[1].startswith("demo@1.2.3")
    out, _ = run("bundles", "show", "demo@1.2.3")
    assert "model.onnx" in out and "profiles:          x86_64-avx2" in out

    tampered = tmp_path / "tampered.efb"
    data = bytearray(bundle_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside model.onnx (70 kB of the bundle's ~92 kB)
    tampered.write_bytes(bytes(data))
    _, err = run("bundles", "push", tampered, status=1)
    assert err.startswith("refused [tampered-file]: ")

    _, err = run("bundles", "show", "demo@9.9.9", status=1)
    assert err.startswith("refused [not-found]: ")


def test_roles_and_tokens_are_the_servers(
    served: Api, run: Cli, bundle_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_TOKEN", served.tokens[Role.VIEWER])
    _, err = run("bundles", "push", bundle_file, status=1)
    assert err.startswith("refused [forbidden]: ")
    monkeypatch.setenv("EDGEFLEET_TOKEN", "efa_" + "x" * 43)
    _, err = run("devices", "list", status=1)
    assert err.startswith("refused [auth]: ")
    monkeypatch.delenv("EDGEFLEET_TOKEN")
    _, err = run("devices", "list", status=1)
    assert "no API token given" in err


def test_devices_and_enroll_tokens(served: Api, run: Cli) -> None:
    for device_id in ("cam-1", "cam-2"):
        assert served.enroll(device_id, tags={"site": "berlin"}).status_code == 201
    out, _ = run("devices", "list", "--tag", "site=berlin")
    assert [line.split()[0] for line in out.splitlines()] == ["DEVICE", "cam-1", "cam-2"]
    out, _ = run("devices", "list", "--tag", "site=paris")
    assert out == "no devices match\n"
    out, _ = run("devices", "show", "cam-1")
    assert "device:           cam-1" in out and "tags:             site=berlin" in out
    out, err = run("devices", "enroll-token", "--tag", "line=3", "--ttl", "1h")
    assert out.startswith("efe_") and len(out.split()) == 1
    assert "valid until" in err


def test_devices_remove_frees_the_id_for_a_new_key(
    served: Api, run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert served.enroll("cam-1").status_code == 201
    refused = served.enroll("cam-1")  # re-flashed: a new key for an enrolled id
    assert refused.status_code == 403
    monkeypatch.setenv("EDGEFLEET_TOKEN", served.tokens[Role.VIEWER])
    _, err = run("devices", "remove", "cam-1", status=1)
    assert err.startswith("refused [forbidden]: ")
    monkeypatch.setenv("EDGEFLEET_TOKEN", served.tokens[Role.OPERATOR])
    out, _ = run("devices", "remove", "cam-1")
    assert out == "removed device cam-1\n"
    assert served.get("/devices/cam-1").status_code == 404
    assert served.enroll("cam-1").status_code == 201
    _, err = run("devices", "remove", "cam-9", status=1)
    assert err.startswith("refused [not-found]: ") and "cam-9" in err


def test_rollout_start_status_pause_resume_abort(
    served: Api, run: Cli, bundle_file: Path, tmp_path: Path
) -> None:
    for device_id in ("cam-1", "cam-2"):
        served.enroll(device_id, tags={"site": "berlin"})
    run("bundles", "push", bundle_file)
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages:\n  - percent: 50\n  - percent: 100\n")
    out, err = run(
        "rollout", "start", "--bundle", "demo@1.2.3", "--select", "site=berlin", "--plan", plan
    )
    assert out == "1\n"
    assert err.startswith("started rollout 1: demo@1.2.3 running, stage 1/2")
    out, _ = run("rollout", "status", "1")
    assert "state:     running" in out and "selection: site=berlin" in out
    out, _ = run("rollout", "pause", "1", "--reason", "night shift")
    assert out.startswith("rollout 1 paused: demo@1.2.3 paused")
    _, err = run("rollout", "pause", "1", status=1)
    assert err.startswith("refused [rollout-state]: rollout 1 is paused")
    run("rollout", "resume", "1")
    out, _ = run("rollout", "abort", "1", "--reason", "wrong bundle")
    assert "aborting" in out
    out, _ = run("rollout", "list")
    assert out.splitlines()[1].split()[:3] == ["1", "demo@1.2.3", "aborting"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - percent: 50\n")
    _, err = run("rollout", "start", "--bundle", "demo@1.2.3", "--plan", bad, status=1)
    assert err.startswith("refused [invalid-request]: ")


def test_a_trust_root_that_drops_a_release_key_names_the_bundles_it_strands(
    served: Api,
    run: Cli,
    bundle_file: Path,
    tmp_path: Path,
    keyset: KeySet,
    trust: TrustRoot,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served.enroll("cam-1")
    run("bundles", "push", bundle_file)
    new_release = SigningKey.generate()
    v2 = rotate_trust_root(
        trust,
        signers=[keyset.root],
        expires=utcnow() + dt.timedelta(days=30),
        release=[new_release.public],
    )
    v2_path = tmp_path / "trust.v2.json"
    v2_path.write_bytes(v2.raw)
    monkeypatch.setenv("EDGEFLEET_TOKEN", served.tokens[Role.ADMIN])
    out, err = run("trust", "push", v2_path)
    assert out.startswith("pushed: trust root version 2, ")
    old_key = keyset.release.public.keyid[:12]
    assert err.startswith("warning: trust root version 2 no longer accepts 1 stored bundle(s): ")
    assert "demo@1.2.3" in err and old_key in err
    answer = served.get("/trust").json()
    assert "untrusted_bundles" not in answer  # only the push's answer lists them

    plan = tmp_path / "plan.yaml"
    plan.write_text("stages:\n  - percent: 100\n")
    monkeypatch.setenv("EDGEFLEET_TOKEN", served.tokens[Role.OPERATOR])
    _, err = run("rollout", "start", "--bundle", "demo@1.2.3", "--plan", plan, status=1)
    assert err.startswith("refused [unknown-key]: bundle demo@1.2.3: trust root version 2 ")
    assert old_key in err and "push" in err and "--add-release" in err
    assert served.get("/rollouts").json() == []

    # Signed again with the listed key under a new version, it rolls out.
    fresh = tmp_path / "fresh.efb"
    build_bundle(
        write_model_dir(tmp_path / "src-fresh"), fresh, name="demo", version="1.2.4",
        keys=[new_release], profiles=[PROFILE],
    )  # fmt: skip
    _, err = run("bundles", "push", fresh)
    assert "warning" not in err
    run("rollout", "start", "--bundle", "demo@1.2.4", "--plan", plan)


def test_alerts_list_pages_and_says_how_many_there_are(served: Api, run: Cli) -> None:
    served.enroll("cam-1")
    opened = utcnow() - dt.timedelta(hours=1)
    with served.context.db.session() as session:
        for n in range(105):
            open_alert(
                session,
                Alert(
                    kind=FEATURE_DRIFT, scope="device", device_id="cam-1", cohort=None,
                    bundle_name="demo", bundle_version="1.2.3", feature=f"f{n}",
                    opened_at=opened + dt.timedelta(seconds=n), resolved_at=None,
                    acknowledged_by=None, acknowledged_at=None, evidence={},
                ),
            )  # fmt: skip
    out, _ = run("alerts", "list", "--open")
    lines = out.splitlines()
    assert len(lines) == 1 + 100 + 1
    assert lines[-1] == "alerts 1-100 of 105 (--offset for more)"
    out, _ = run("alerts", "list", "--open", "--offset", "100")
    lines = out.splitlines()
    assert [line.split()[5] for line in lines[1:-1]] == [f"f{n}" for n in range(4, -1, -1)]
    assert lines[-1] == "alerts 101-105 of 105 (--offset for more)"
    out, _ = run("alerts", "list", "--offset", "200")
    assert out == "--offset 200 is past the end: 105 alerts match (--offset 0 for the first page)\n"
    out, _ = run("alerts", "list", "--kind", "feature-drift", "--limit", "200")
    assert len(out.splitlines()) == 1 + 105  # every one shown: no footer
    assert served.get("/alerts", params={"limit": 3}).headers["X-Total-Count"] == "105"


def test_unknown_alert_kinds_and_rollout_states_are_refused_naming_the_known(
    served: Api, run: Cli
) -> None:
    answer = served.get("/alerts", params={"kind": "bogus"})
    assert answer.status_code == 422 and answer.json()["error"] == "invalid-request"
    assert "feature-drift" in answer.json()["detail"] and "accuracy-drop" in answer.json()["detail"]
    _, err = run("alerts", "list", "--kind", "bogus", status=1)
    assert err.startswith("refused [invalid-request]: kind 'bogus' is not an alert kind: ")
    assert "prediction-drift" in err

    _, err = run("rollout", "list", "--state", "bogus", status=1)
    assert err == (
        "refused [invalid-request]: state 'bogus' is not one of running, paused, aborting, "
        "aborted, completed\n"
    )
    out, _ = run("rollout", "list", "--state", "paused")
    assert out == "no rollouts in state paused\n"


def test_devices_list_says_when_the_offset_is_past_the_end(served: Api, run: Cli) -> None:
    for n in range(3):
        served.enroll(f"cam-{n}")
    out, _ = run("devices", "list", "--offset", "100")
    assert out == "--offset 100 is past the end: 3 devices match (--offset 0 for the first page)\n"
    out, _ = run("devices", "list", "--offset", "1")
    assert out.splitlines()[-1] == "devices 2-3 of 3 (--offset for more)"
    refused = served.get("/devices", params={"model": "demo@"})
    assert refused.status_code == 422 and "NAME@VERSION" in refused.json()["detail"]


def test_token_create_prints_only_the_token(run: Cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    open_database(sqlite_url(data)).dispose()  # what `server run --data DIR` does first
    out, err = run(
        "server", "token", "create", "--role", "operator", "--name", "ci", "--data", data
    )
    secret = out.strip()
    assert out == secret + "\n" and secret.startswith("efa_")
    assert "not shown again" in err
    db = Database(sqlite_url(data))
    try:
        with db.session() as session:
            principal = authenticate(session, secret)
    finally:
        db.dispose()
    assert (principal.name, principal.role) == ("ci", Role.OPERATOR)

    url = f"sqlite:///{tmp_path / 'other.db'}"
    open_database(url).dispose()
    out, _ = run("server", "token", "create", "--role", "admin", "--name", "me", "--db", url)
    assert out.startswith("efa_") and out.strip() != secret
    _, err = run("server", "token", "create", "--role", "root", "--name", "x", status=2)
    assert "'root' is not one of" in err


def test_token_create_never_creates_a_database(
    run: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from another directory than the server's: a new database there would hold a
    # token the running server never sees.
    monkeypatch.chdir(tmp_path)
    _, err = run("server", "token", "create", "--role", "admin", "--name", "me", status=2)
    expected = tmp_path / "edgefleet-data" / "server.db"
    assert err.splitlines() == [
        f"error [usage]: no server database at {expected}: pass --data DIR (or --db URL) as "
        "given to `edgefleet server run`; it creates the database"
    ]
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    _, err = run("server", "token", "create", "--role", "admin", "--name", "me", "--db", url,
                 status=2)  # fmt: skip
    assert f"no server database at {tmp_path / 'elsewhere.db'}: " in err
    assert list(tmp_path.iterdir()) == []


def test_server_run_with_its_port_taken_starts_nothing(run: Cli, tmp_path: Path) -> None:
    run("keys", "init", tmp_path / "keys")
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _, err = run(
            "server", "run", "--embedded-broker", "--mqtt-port", str(free_port()),
            "--port", str(port), "--data", data, "--trust", tmp_path / "keys" / "trust.json",
            "--server-key", tmp_path / "keys" / "server.key", status=2,
        )  # fmt: skip
    assert err.splitlines() == [
        f"error [usage]: --port {port}: 127.0.0.1:{port} is already in use (another "
        "server?): stop what listens there, or pass another --port"
    ]
    assert not data.exists()  # no database, no broker: nothing started before the check


def test_token_create_migrates_a_fresh_postgresql_database(run: Cli, postgres_url: str) -> None:
    out, _ = run("server", "token", "create", "--role", "viewer", "--name", "grafana", "--db",
                 postgres_url)  # fmt: skip
    db = Database(postgres_url)
    try:
        with db.session() as session:
            principal = authenticate(session, out.strip())
    finally:
        db.dispose()
    assert (principal.name, principal.role) == ("grafana", Role.VIEWER)


def test_server_run_turns_flags_into_settings(
    run: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust = tmp_path / "trust.json"
    key = tmp_path / "server.key"
    trust.write_text("{}")
    key.write_text("")
    received: list[ServerSettings] = []
    # The runner has tests of its own: stand in for it with its interface, run_server(settings).
    runner = types.ModuleType("edgefleet.server.runner")
    runner.run_server = received.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edgefleet.server.runner", runner)
    monkeypatch.setenv("EF_PASS", "s3cret")
    run(
        "server", "run", "--db", "postgresql://db/edgefleet", "--mqtt", "mqtt://broker:1883",
        "--data", tmp_path / "d", "--host", "0.0.0.0", "--port", "9000", "--public-url",
        "https://fleet.example", "--open-enrollment", "--trust", trust, "--server-key", key,
        "--passphrase-env", "EF_PASS", "--forwarded-allow-ips", "10.0.0.0/8, ::1",
    )  # fmt: skip
    (settings,) = received
    assert settings.data_dir == (tmp_path / "d").resolve()
    assert settings.trust_path == trust.resolve() and settings.server_key_path == key.resolve()
    assert settings.database_url == "postgresql://db/edgefleet"
    assert settings.broker_url == "mqtt://broker:1883" and not settings.embedded_broker
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.base_url == "https://fleet.example" and settings.open_enrollment
    assert settings.server_key_passphrase == b"s3cret"
    assert settings.forwarded_allow_ips == "10.0.0.0/8,::1"

    received.clear()
    run("server", "run", "--embedded-broker", "--mqtt-port", "1999", "--trust", trust,
        "--server-key", key, "--data", tmp_path / "d")  # fmt: skip
    (settings,) = received
    assert settings.embedded_broker and settings.mqtt_port == 1999
    assert settings.database_url == f"sqlite:///{(tmp_path / 'd').resolve() / 'server.db'}"
    assert settings.base_url == "http://127.0.0.1:8080"
    assert settings.forwarded_allow_ips is None  # no proxy header trusted
    assert settings.replica_name == socket.gethostname()  # the same after a restart

    received.clear()
    run("server", "run", "--trust", trust, "--server-key", key, "--replica-name", "edge-1.b_2")
    assert [s.replica_name for s in received] == ["edge-1.b_2"]
    received.clear()
    _, err = run("server", "run", "--trust", trust, "--server-key", key, "--replica-name",
                 "edge 1", status=2)  # fmt: skip
    assert err.splitlines() == [
        "error [usage]: --replica-name 'edge 1' cannot name a replica: pass --replica-name "
        "with 1 to 64 letters, digits, '.', '_' or '-'"
    ]
    _, err = run("server", "run", "--embedded-broker", "--mqtt", "mqtt://b:1883", "--trust",
                 trust, "--server-key", key, status=2)  # fmt: skip
    assert "--mqtt and --embedded-broker exclude each other" in err
    _, err = run("server", "run", "--trust", trust, "--server-key", key, "--passphrase-env",
                 "EF_UNSET", status=2)  # fmt: skip
    assert "EF_UNSET: that environment variable is not set" in err
    for mistyped in ("10.0.0.1/8", "proxy.example", "*,10.0.0.1", ""):
        _, err = run("server", "run", "--trust", trust, "--server-key", key,
                     "--forwarded-allow-ips", mistyped, status=2)  # fmt: skip
        assert "--forwarded-allow-ips: " in err and "is not an IP address or network" in err
    assert received == []


def test_server_run_serves_https_and_an_agent_enrolls_trusting_only_the_fleet_ca(
    tmp_path: Path, trust: TrustRoot, keyset: KeySet
) -> None:
    ca = init_ca(tmp_path / "ca")
    issued, key_pem = ca.issue_key_pair("fleet-server", server_names=["127.0.0.1"], client=False)
    tls_cert, tls_key = tmp_path / "https.crt", tmp_path / "https.key"
    tls_cert.write_bytes(issued.pem)
    tls_key.write_bytes(key_pem)
    trust_path, key_path = write_server_keys(tmp_path / "keys", trust, keyset)
    server = ServerProcess.start(
        tmp_path / "server.log", trust_path, key_path, "--data", tmp_path / "data",
        "--embedded-broker", "--mqtt-port", str(free_port()), "--open-enrollment",
        "--ca", tmp_path / "ca", "--tls-cert", tls_cert, "--tls-key", tls_key,
    )  # fmt: skip
    url = f"https://127.0.0.1:{server.port}"
    fleet_ca = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.crt"))

    def healthy() -> bool:
        assert server.process.poll() is None, server.log
        try:
            return httpx.get(f"{url}{API_PREFIX}/health", verify=fleet_ca).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(healthy, 30), server.log
        config = AgentConfig(
            device_id="cam-https",
            profile="x86_64-vnni",
            state_dir=tmp_path / "state",
            trust_root=trust_path,
            server_url=url,
        )
        layout = StateLayout(config.state_dir)
        with pytest.raises(ServerUnreachableError, match="does not trust"):
            enroll(config, layout)  # the system's CAs do not know the fleet CA
        trusting = config.model_copy(update={"server_ca_file": tmp_path / "ca" / "ca.crt"})
        enroll(trusting, layout)
        certificate = x509.load_pem_x509_certificate(layout.tls_certificate.read_bytes())
        assert certificate.subject.rfc4514_string() == "CN=cam-https"
        assert layout.tls_ca_certificate.read_bytes() == ca.certificate_pem
    finally:
        assert "Traceback" not in server.stop()


def test_the_default_public_url_is_https_when_the_server_serves_it(tmp_path: Path) -> None:
    settings = ServerSettings(tmp_path, tmp_path / "trust.json", tmp_path / "server.key", port=8443)
    assert settings.base_url == "http://127.0.0.1:8443"
    served = dataclasses.replace(settings, tls_cert_file=tmp_path, tls_key_file=tmp_path)
    assert served.base_url == "https://127.0.0.1:8443"


def test_server_run_refuses_https_files_that_do_not_load(run: Cli, tmp_path: Path) -> None:
    trust, key = tmp_path / "trust.json", tmp_path / "server.key"
    trust.write_text("{}")
    key.write_text("")
    ca = init_ca(tmp_path / "ca")
    issued, _ = ca.issue_key_pair("fleet-server", server_names=["127.0.0.1"])
    (tmp_path / "https.crt").write_bytes(issued.pem)
    _, err = run("server", "run", "--trust", trust, "--server-key", key, "--data",
                 tmp_path / "d", "--tls-cert", tmp_path / "https.crt", "--tls-key",
                 tmp_path / "ca" / "ca.key", status=2)  # fmt: skip
    assert err.count("\n") == 1 and "--tls-cert" in err
    assert "not a PEM certificate and its unencrypted key" in err
    _, err = run("server", "run", "--trust", trust, "--server-key", key, "--tls-cert",
                 tmp_path / "https.crt", status=2)  # fmt: skip
    assert "--tls-cert and --tls-key go together" in err
    assert not (tmp_path / "d").exists()


def test_push_over_the_servers_limit_reports_the_limit(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot, run: Cli
) -> None:
    api = make_api(sqlite_database, tmp_path, trust, max_bundle_bytes=1000)
    big = tmp_path / "big.efb"
    big.write_bytes(bytes(3_000_000))
    with serve(api) as url:
        token = api.tokens[Role.OPERATOR]
        _, err = run("bundles", "push", big, "--server", url, "--token", token, status=1)
    assert err.strip() == (
        "refused [invalid-request]: the bundle is 3000000 bytes; this server takes at most 1000"
    )
    assert list(api.context.bundles.uploads_dir.iterdir()) == []
