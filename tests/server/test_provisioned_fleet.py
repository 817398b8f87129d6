"""A provisioned fleet on the locked-down broker, end to end, through the real commands.

`edgefleet keys init`, `ca init`, `broker config` and a real mosquitto on what they wrote;
`edgefleet server run` over HTTPS (a certificate from `ca issue`) signing device
certificates and keeping the broker's CRL; a golden image from `devices provision
--claim --uses 3`, copied four times and each copy run as `edgefleet agent run` with its
paths moved into the copy (the EDGEFLEET_* overrides). Three devices enroll, get their
certificates and come online over mqtts, and hear the server's announcement of the fields it
accepts; the fourth is refused. A rollout completes over
the locked-down broker; a device that slept through two trust-root rotations walks to v3
and takes the next rollout; a removed device's certificate is revoked, the broker refuses
it after rereading the CRL, and the others carry on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from edgefleet.agent.config import load_config, write_config
from edgefleet.agent.layout import StateLayout
from edgefleet.agentconfig import HealthSettings, LocalApiSettings, TelemetrySettings
from edgefleet.keys import load_private_key
from edgefleet.wire import API_PREFIX as API
from tests.agent.broker import free_port
from tests.agent.power_loss_driver import PROFILE, Bundles, prepare_bundles
from tests.clirun import Cli
from tests.server.serverproc import wait_until
from tests.server.test_broker_lockdown import LockedBroker

WAIT = 60.0  # seconds: the bound on every wait for a condition
CLAIM_TAG = "image=pi-e2e"


@dataclass
class Device:
    """One copy of the golden image and its `edgefleet agent run` process."""

    root: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.root / "etc/edgefleet/agent.toml"

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.root / "var/lib/edgefleet")

    @property
    def log_path(self) -> Path:
        return self.root.parent / f"{self.root.name}.log"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def environment(self) -> dict[str, str]:
        """The overrides that move agent.toml's root-filesystem paths into the copy."""
        etc = self.root / "etc/edgefleet"
        return {
            "EDGEFLEET_STATE_DIR": str(self.layout.root),
            "EDGEFLEET_TRUST_ROOT": str(etc / "trust.json"),
            "EDGEFLEET_SERVER_CA_FILE": str(etc / "ca.crt"),
            "EDGEFLEET_MQTT_CA_FILE": str(etc / "ca.crt"),
        }

    @property
    def device_id(self) -> str:
        return self.layout.device_id_file.read_text().strip()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment},
            )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def status(self, edgefleet: Cli, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
        """`edgefleet agent status --json`, as run on the device."""
        with monkeypatch.context() as patch:
            for name, value in self.environment.items():
                patch.setenv(name, value)
            out, _ = edgefleet("agent", "status", "--config", self.config, "--json")
        status: dict[str, Any] = json.loads(out)
        return status

    def certificate_serial(self) -> int:
        return x509.load_pem_x509_certificate(
            self.layout.tls_certificate.read_bytes()
        ).serial_number


def copy_image(image: Path, root: Path) -> Device:
    """A copy of the image, as written onto one SD card, with test timings: a local API on
    a free port (four agents on one machine), a heartbeat a second, a one-second health check."""
    shutil.copytree(image, root, symlinks=True)
    device = Device(root)
    config = load_config(device.config)
    write_config(
        device.config,
        config.model_copy(
            update={
                "local_api": LocalApiSettings(port=0),
                "telemetry": TelemetrySettings(window_seconds=1, heartbeat_seconds=1),
                "health": HealthSettings(duration_seconds=1, min_requests=0),
            }
        ),
    )
    return device


class FleetServer:
    """`edgefleet server run` over HTTPS, as docs/provisioning.md starts it."""

    def __init__(self, directory: Path, keys: Path, broker: LockedBroker, tls: Path) -> None:
        self.port = free_port()
        self.data = directory / "data"
        self.log_path = directory / "server.log"
        self.reloads = directory / "broker-reloads"
        self.ca_file = broker.ca_dir / "ca.crt"
        out = broker.out
        reload_command = f"sh -c {shlex.quote(f'echo reload >> {self.reloads}')}"
        command = [
            sys.executable, "-m", "edgefleet", "server", "run", "--port", str(self.port),
            "--data", str(self.data), "--trust", str(keys / "trust.json"),
            "--server-key", str(keys / "server.key"),
            "--tls-cert", str(tls / "fleet.crt"), "--tls-key", str(tls / "fleet.key"),
            "--ca", str(broker.ca_dir), "--crl", str(out / "crl.pem"),
            "--broker-reload-command", reload_command,
            "--mqtt", broker.url, "--mqtt-ca", str(out / "ca.crt"),
            "--mqtt-cert", str(broker.server.cert), "--mqtt-key", str(broker.server.key),
            "--share-group-file", str(broker.share_group_file),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def reload_count(self) -> int:
        return len(self.reloads.read_text().splitlines()) if self.reloads.exists() else 0

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.Client(base_url=f"{self.url}{API}", headers=headers, verify=verify)

    def is_healthy(self) -> bool:
        assert self.process.poll() is None, f"the server exited:\n{self.log}"
        try:
            with self.client() as api:
                return api.get("/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log


@pytest.fixture
def edgefleet(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LockedBroker]:
    locked = LockedBroker(tmp_path / "fleet")  # `ca init` and `broker config`
    locked.start()
    try:
        yield locked
    finally:
        locked.stop()


@pytest.fixture
def keys(tmp_path: Path, edgefleet: Cli) -> Path:
    edgefleet("keys", "init", tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def releases(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Bundles:
    return prepare_bundles(
        tmp_path_factory.mktemp("bundles"), load_private_key(keys / "release.key")
    )


@pytest.fixture
def server(
    tmp_path: Path, keys: Path, broker: LockedBroker, edgefleet: Cli
) -> Iterator[FleetServer]:
    tls = tmp_path / "tls"
    edgefleet("ca", "issue", "fleet", "--ca", broker.ca_dir, "--server-name", "127.0.0.1",
              "--no-client", "-o", tls)  # fmt: skip
    running = FleetServer(tmp_path, keys, broker, tls)
    try:
        assert wait_until(running.is_healthy, WAIT), running.log
        yield running
    finally:
        log = running.stop()
        assert "Traceback" not in log, log


def test_a_golden_image_fleet_runs_on_the_locked_down_broker(
    tmp_path: Path,
    keys: Path,
    broker: LockedBroker,
    server: FleetServer,
    releases: Bundles,
    edgefleet: Cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin, _ = edgefleet("server", "token", "create", "--role", "admin", "--name", "provisioning",
                         "--data", server.data)  # fmt: skip
    token = admin.strip()
    monkeypatch.setenv("EDGEFLEET_SERVER", server.url)
    monkeypatch.setenv("EDGEFLEET_TOKEN", token)
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))
    image = tmp_path / "golden"
    edgefleet("devices", "provision", "--claim", "--uses", "3", "--expires", "1h",
              "--id-prefix", "cam", "--profile", PROFILE, "--trust", keys / "trust.json",
              "--ca-cert", server.ca_file, "--mqtt", broker.url, "--tag", CLAIM_TAG,
              "-o", image)  # fmt: skip
    devices = [copy_image(image, tmp_path / f"card{index}") for index in range(4)]
    api = server.client(token)

    def fleet() -> dict[str, dict[str, Any]]:
        listed = api.get("/devices", params={"limit": 100})
        assert listed.status_code == 200, listed.text
        return {item["id"]: item for item in listed.json()["items"]}

    def online(members: list[Device]) -> bool:
        listed = fleet()
        return all(
            device.layout.device_id_file.exists()
            and device.device_id in listed
            and listed[device.device_id]["online"]
            and listed[device.device_id]["heartbeat"] is not None
            for device in members
        )

    def logs() -> str:
        return "\n".join(f"--- {d.root.name}\n{d.log}" for d in devices) + f"\n{server.log}"

    try:
        # Three cards enroll with the claim, get certificates, and come online over mqtts.
        enrolled = devices[:3]
        for device in enrolled:
            device.start()
        assert wait_until(lambda: online(enrolled), WAIT), logs()
        for device in enrolled:
            assert device.layout.tls_certificate.exists(), device.log
            assert not device.layout.enroll_token_file.exists(), device.log
        listed, _ = edgefleet("devices", "list", "--tag", CLAIM_TAG, "--online", "--json")
        assert {item["id"] for item in json.loads(listed)["items"]} == {
            device.device_id for device in enrolled
        }
        # Each reads the server's signed announcement of the fields it accepts (the ACL lets
        # it), and, of the same version, leaves nothing out.
        heard = "the server announced the fields it accepts"
        assert wait_until(lambda: all(heard in d.log for d in enrolled), WAIT), logs()
        assert not [d.log for d in enrolled if "left out" in d.log or "fleet accepts" in d.log]

        # The fourth card finds the claim used up: refused, said in one line, never listed.
        fourth = devices[3]
        fourth.start()
        assert wait_until(lambda: "enrollment failed for good" in fourth.log, WAIT), fourth.log
        refusals = [line for line in fourth.log.splitlines() if "enrollment failed" in line]
        assert len(refusals) == 1 and "refused enrollment" in refusals[0], refusals
        assert fourth.device_id not in fleet()
        fourth.stop()

        # A rollout over the locked-down broker: directives in, status out.
        rollout(edgefleet, tmp_path, releases.releases[0], "1.0.0")
        assert wait_until(
            lambda: all(fleet()[d.device_id]["model_version"] == "1.0.0" for d in enrolled), WAIT
        ), fleet()

        # One card sleeps through two trust-root rotations that keep the server key.
        sleeper = enrolled[0]
        sleeper.stop()
        for version in (2, 3):
            edgefleet("keys", "rotate", "--trust", keys / "trust.json",
                      "--root-key", keys / "root.key")  # fmt: skip
            pushed, _ = edgefleet("trust", "push", keys / "trust.json", "--json")
            assert json.loads(pushed)["version"] == version, pushed
        sleeper.start()
        assert wait_until(
            lambda: sleeper.status(edgefleet, monkeypatch)["trust_root_version"] == 3, WAIT
        ), sleeper.log
        assert wait_until(lambda: online(enrolled), WAIT), logs()
        rollout(edgefleet, tmp_path, releases.releases[1], "1.1.0")
        assert wait_until(
            lambda: all(fleet()[d.device_id]["model_version"] == "1.1.0" for d in enrolled), WAIT
        ), fleet()

        # Removing a device revokes its certificate; once the broker rereads the CRL, it
        # refuses that device and takes the others back.
        removed, kept = enrolled[2], enrolled[:2]
        reloads = server.reload_count()
        edgefleet("devices", "remove", removed.device_id)
        crl = x509.load_pem_x509_crl((broker.out / "crl.pem").read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(removed.certificate_serial())
        assert all(
            crl.get_revoked_certificate_by_serial_number(d.certificate_serial()) is None
            for d in kept
        )
        assert wait_until(lambda: server.reload_count() > reloads, WAIT), server.log
        broker.stop()
        restarted_at = dt.datetime.now(dt.timezone.utc)
        logged = len(broker.log_path.read_text(errors="replace"))
        broker.start()

        def since_restart() -> str:
            return broker.log_path.read_text(errors="replace")[logged:]

        # The removed agent is the only client whose certificate can fail the broker's check
        # (the fourth card is stopped): its attempts fail again and again, none connects.
        assert wait_until(lambda: since_restart().count("certificate verify failed") >= 2, WAIT), (
            since_restart()
        )
        assert f"as {removed.device_id} " not in since_restart()
        assert wait_until(lambda: beat_after(fleet(), kept, restarted_at), WAIT), logs()
        assert removed.device_id not in fleet()
        assert online(kept)
    finally:
        for device in devices:
            device.stop()
        api.close()


def beat_after(
    listed: dict[str, dict[str, Any]], members: list[Device], moment: dt.datetime
) -> bool:
    return all(
        listed[d.device_id]["online"]
        and dt.datetime.fromisoformat(listed[d.device_id]["last_seen"]) > moment
        for d in members
    )


def rollout(edgefleet: Cli, directory: Path, bundle: Path, version: str) -> None:
    """Push `bundle` and roll it out to every device of the claim; it completes."""
    edgefleet("bundles", "push", bundle)
    plan = directory / f"plan-{version}.yaml"
    plan.write_text("stages: [{percent: 34}, {percent: 100}]\ngates: {bake_s: 1}\n")
    started, _ = edgefleet("rollout", "start", "--bundle", f"demo@{version}", "--plan", plan,
                           "--select", CLAIM_TAG, "--json")  # fmt: skip
    watched, _ = edgefleet("rollout", "status", str(json.loads(started)["id"]), "--watch",
                           "--interval", "1")  # fmt: skip
    assert "completed" in watched, watched
