"""The device's own TLS identity: key made on the device, certificate from enrollment,
renewal before expiry, the enrolled certificate on a real mutual-TLS mosquitto, and HTTPS
that trusts the fleet CA.

The fleet server here is a small stdlib HTTPS server of our own answering enrollment and
renewal as the API does, signing with a real CA made by `edgefleet.fleetca`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from edgefleet.agent.enroll import enroll
from edgefleet.agent.errors import ServerUnreachableError
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.link import AgentLink
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.runner import Agent
from edgefleet.agent.tlsidentity import (
    CertificateFiles,
    CertificateRenewer,
    ensure_signing_request,
    link_settings,
    renewal_due,
    waits_for_certificate,
)
from edgefleet.agentconfig import AgentConfig, LocalApiSettings, MqttSettings
from edgefleet.backoff import Backoff
from edgefleet.certwire import CertificateRenewal, certificate_path
from edgefleet.fleetca import FleetCa, init_ca
from edgefleet.mqtt.devicesig import DeviceKey
from edgefleet.samplewire import META_HEADER, SIGNATURE_HEADER, verify_request
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from tests.agent.broker import MosquittoBroker, free_port, unique_device_id
from tests.agent.power_loss_driver import PROFILE

ENROLL = "/api/v1/devices/enroll"


@dataclass(frozen=True)
class Fleet:
    ca: FleetCa
    ca_file: Path
    server_cert: Path
    server_key: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    directory = tmp_path_factory.mktemp("fleet-ca")
    ca = init_ca(directory / "ca")
    issued, key = ca.issue_key_pair("fleet-server", server_names=["127.0.0.1"], client=False)
    (directory / "server.crt").write_bytes(issued.pem)
    (directory / "server.key").write_bytes(key)
    return Fleet(
        ca, directory / "ca" / "ca.crt", directory / "server.crt", directory / "server.key"
    )


@dataclass
class FakeFleetServer:
    """Enrollment and renewal as the fleet server answers them; records what it got."""

    ca: FleetCa
    public_keys: dict[str, str] = field(default_factory=dict)
    enrollments: list[dict[str, Any]] = field(default_factory=list)
    renewals: list[str] = field(default_factory=list)  # the device ids renewed
    fail_renewals: bool = False

    def answer_enroll(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.enrollments.append(body)
        self.public_keys[body["device_id"]] = body["public_key"]
        return 201, {"device_id": body["device_id"], "tags": {}, **self.issue(body)}

    def answer_renewal(
        self, device_id: str, raw: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        if self.fail_renewals:
            return 503, {"error": "unavailable", "detail": "try again later"}
        meta = headers[META_HEADER].encode()
        verify_request(
            certificate_path(device_id),
            meta,
            headers[SIGNATURE_HEADER],
            self.public_keys[device_id],
        )
        renewal = CertificateRenewal.model_validate_json(meta)
        assert renewal.device_id == device_id
        assert renewal.sha256 == hashlib.sha256(raw).hexdigest()
        self.renewals.append(device_id)
        return 200, self.issue({"device_id": device_id, **json.loads(raw)})

    def issue(self, body: dict[str, Any]) -> dict[str, Any]:
        issued = self.ca.issue_for_csr(body["csr"].encode(), body["device_id"])
        return {
            "certificate": issued.pem.decode(),
            "certificate_not_after": issued.not_after.isoformat(),
            "ca_certificate": self.ca.certificate_pem.decode(),
        }


@pytest.fixture
def https_server(fleet: Fleet) -> Iterator[tuple[str, FakeFleetServer]]:
    fake = FakeFleetServer(fleet.ca)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == ENROLL:
                status, answer = fake.answer_enroll(json.loads(raw))
            else:
                device_id = self.path.split("/")[-2]
                assert self.path == certificate_path(device_id)
                status, answer = fake.answer_renewal(device_id, raw, dict(self.headers))
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(fleet.server_cert, fleet.server_key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", fake
    finally:
        httpd.shutdown()
        httpd.server_close()


def make_config(tmp_path: Path, **overrides: Any) -> AgentConfig:
    fields: dict[str, Any] = {
        "device_id": "cam-017",
        "profile": "x86_64-vnni",
        "state_dir": tmp_path / "state",
        "trust_root": tmp_path / "trust.json",  # enrollment never reads it
    }
    fields.update(overrides)
    return AgentConfig(**fields)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_is_made_once_in_a_child_process_and_kept_private(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edgefleet.agent.layout import StateLayout\n"
        "from edgefleet.agent.tlsidentity import ensure_signing_request\n"
        "ensure_signing_request(StateLayout(Path(sys.argv[1])), 'cam-017')\n"
        "assert not [m for m in sys.modules if m.startswith('cryptography')], 'loaded'\n"
    )
    subprocess.run([sys.executable, "-c", script, str(layout.root)], check=True)
    files = CertificateFiles.of(layout)
    assert mode(files.key) == 0o600 and mode(layout.tls_dir) == 0o700
    csr = x509.load_pem_x509_csr(files.csr.read_bytes())
    assert csr.is_signature_valid
    key_before = files.key.read_bytes()
    assert ensure_signing_request(layout, "cam-017") == files.csr.read_bytes()
    assert files.key.read_bytes() == key_before  # made once


def test_enrollment_over_https_sends_the_request_and_stores_the_certificate(
    tmp_path: Path, fleet: Fleet, https_server: tuple[str, FakeFleetServer]
) -> None:
    url, fake = https_server
    config = make_config(tmp_path, server_url=url, server_ca_file=fleet.ca_file)
    layout = StateLayout(config.state_dir)
    enroll(config, layout)
    files = CertificateFiles.of(layout)
    sent = x509.load_pem_x509_csr(fake.enrollments[0]["csr"].encode())
    stored = x509.load_pem_x509_certificate(files.certificate.read_bytes())
    assert stored.public_key() == sent.public_key()
    assert files.ca_certificate.read_bytes() == fleet.ca.certificate_pem
    assert (mode(files.certificate), mode(files.ca_certificate)) == (0o600, 0o644)
    validity = json.loads(files.validity.read_bytes())
    assert validity["not_after"] == format_time(stored.not_valid_after_utc)
    assert "PRIVATE KEY" not in json.dumps(fake.enrollments)  # the key never left
    assert not renewal_due(layout)


def test_enrollment_refuses_a_server_certificate_the_device_does_not_trust(
    tmp_path: Path, https_server: tuple[str, FakeFleetServer]
) -> None:
    url, fake = https_server
    config = make_config(tmp_path, server_url=url)  # the system's CAs only
    with pytest.raises(ServerUnreachableError, match=r"does not trust.*server_ca_file"):
        enroll(config, StateLayout(config.state_dir))
    assert fake.enrollments == []


def write_validity(layout: StateLayout, issued_days_ago: float, left_days: float) -> None:
    now = utcnow()
    files = CertificateFiles.of(layout)
    files.validity.write_text(
        json.dumps(
            {
                "issued_at": format_time(now - dt.timedelta(days=issued_days_ago)),
                "not_after": format_time(now + dt.timedelta(days=left_days)),
            }
        )
    )


def test_renewal_is_due_with_less_than_a_third_of_the_lifetime_left(
    tmp_path: Path, fleet: Fleet, https_server: tuple[str, FakeFleetServer]
) -> None:
    url, _ = https_server
    config = make_config(tmp_path, server_url=url, server_ca_file=fleet.ca_file)
    layout = StateLayout(config.state_dir)
    assert not renewal_due(layout)  # no certificate: nothing to renew
    enroll(config, layout)
    write_validity(layout, issued_days_ago=59, left_days=31)
    assert not renewal_due(layout)
    write_validity(layout, issued_days_ago=61, left_days=29)
    assert renewal_due(layout)


def test_renewal_posts_a_device_signed_request_and_stores_the_new_certificate(
    tmp_path: Path, fleet: Fleet, https_server: tuple[str, FakeFleetServer]
) -> None:
    url, fake = https_server
    config = make_config(tmp_path, server_url=url, server_ca_file=fleet.ca_file)
    layout = StateLayout(config.state_dir)
    enroll(config, layout)
    key = DeviceKey.load(layout.device_key)
    files = CertificateFiles.of(layout)
    old = files.certificate.read_bytes()
    write_validity(layout, issued_days_ago=80, left_days=10)
    renewed: list[bool] = []
    clock = [1000.0]
    renewer = CertificateRenewer(
        config,
        layout,
        url,
        key,
        on_renewed=lambda: renewed.append(True),
        backoff=Backoff(initial=60.0, maximum=600.0),
        rng=random.Random(1),
        clock=lambda: clock[0],
    )
    fake.fail_renewals = True
    renewer.step()
    assert (renewer.failures, renewed, files.certificate.read_bytes()) == (1, [], old)
    renewer.step()  # within the backoff: no second request
    assert renewer.failures == 1
    fake.fail_renewals = False
    clock[0] += 600.0
    renewer.step()
    assert fake.renewals == ["cam-017"] and renewed == [True] and renewer.failures == 0
    new = x509.load_pem_x509_certificate(files.certificate.read_bytes())
    assert files.certificate.read_bytes() != old
    assert new.public_key() == x509.load_pem_x509_certificate(old).public_key()  # same key
    assert not renewal_due(layout)


def test_link_settings_use_the_enrolled_identity_only_when_none_is_configured(
    tmp_path: Path, fleet: Fleet, https_server: tuple[str, FakeFleetServer]
) -> None:
    url, _ = https_server
    config = make_config(
        tmp_path,
        server_url=url,
        server_ca_file=fleet.ca_file,
        mqtt=MqttSettings(url="mqtts://127.0.0.1:8883"),
    )
    layout = StateLayout(config.state_dir)
    assert waits_for_certificate(config, layout)
    assert link_settings(config, layout) == config.mqtt
    enroll(config, layout)
    files = CertificateFiles.of(layout)
    assert not waits_for_certificate(config, layout)
    settings = link_settings(config, layout)
    assert (settings.ca_file, settings.cert_file, settings.key_file) == (
        files.ca_certificate,
        files.certificate,
        files.key,
    )
    own = tmp_path / "own.crt"
    configured = config.model_copy(
        update={"mqtt": MqttSettings(url=config.mqtt.url, cert_file=own, key_file=own)}
    )
    assert link_settings(configured, layout).cert_file == own
    assert not waits_for_certificate(configured, layout)


def test_a_waiting_link_connects_with_the_enrolled_certificate_once_it_arrives(
    tmp_path: Path, fleet: Fleet, https_server: tuple[str, FakeFleetServer]
) -> None:
    url, _ = https_server
    port = free_port()
    broker_config = (
        f"listener {port} 127.0.0.1\n"
        f"cafile {fleet.ca_file}\ncertfile {fleet.server_cert}\nkeyfile {fleet.server_key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    device_id = unique_device_id()
    config = make_config(
        tmp_path,
        device_id=device_id,
        server_url=url,
        server_ca_file=fleet.ca_file,
        mqtt=MqttSettings(url=f"mqtts://127.0.0.1:{port}"),
    )
    layout = StateLayout(config.state_dir)
    with MosquittoBroker.running(tmp_path / "broker", broker_config):
        link = AgentLink(
            device_id,
            link_settings(config, layout),  # no certificate yet, no fleet CA
            Outbox(tmp_path / "outbox", 1 << 20),
            on_directive=lambda payload: None,
            on_fleet_timestamp=lambda payload: None,
            backoff=Backoff(initial=0.05, maximum=0.3),
            poll_interval=0.1,
            connect_timeout=2.0,
        )
        try:
            enroll(config, layout)
            link.load_tls_files(link_settings(config, layout))
            link.start()
            assert link.wait_connected(10), link.counters().last_problem
        finally:
            link.stop()


def test_the_agent_waits_for_its_certificate_then_connects_with_it(
    tmp_path: Path,
    fleet: Fleet,
    https_server: tuple[str, FakeFleetServer],
    trust: TrustRoot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, fake = https_server
    port = free_port()
    broker_config = (
        f"listener {port} 127.0.0.1\n"
        f"cafile {fleet.ca_file}\ncertfile {fleet.server_cert}\nkeyfile {fleet.server_key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    (tmp_path / "trust.json").write_bytes(trust.raw)
    config = make_config(
        tmp_path,
        device_id=unique_device_id(),
        profile=PROFILE,
        trust_root=tmp_path / "trust.json",
        server_url=url,
        server_ca_file=fleet.ca_file,
        mqtt=MqttSettings(url=f"mqtts://127.0.0.1:{port}"),
        local_api=LocalApiSettings(enabled=False),
    )
    caplog.set_level(logging.INFO)
    with MosquittoBroker.running(tmp_path / "broker", broker_config):
        agent = Agent(config)
        assert agent.link is not None
        running = threading.Thread(target=agent.run, daemon=True)
        running.start()
        try:
            assert agent.link.wait_connected(30), agent.link.counters().last_problem
            assert len(fake.enrollments) == 1
        finally:
            agent.stopping.set()
            running.join(30)
    waits = [r for r in caplog.records if "the MQTT link waits" in r.getMessage()]
    assert len(waits) == 1
    # No connection was tried without it: the broker would have refused each.
    assert not [r for r in caplog.records if r.getMessage().startswith("MQTT: ")]
