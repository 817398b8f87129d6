"""The link over mutual TLS (mqtts://) to a mosquitto that requires client certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.agent.errors import ConfigError
from edgefleet.agent.link import AgentLink
from edgefleet.agent.outbox import Outbox
from edgefleet.agentconfig import MqttSettings
from edgefleet.backoff import Backoff
from tests.agent.broker import MosquittoBroker, Observer, free_port, unique_device_id


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def make_pki(directory: Path) -> Pki:
    """A CA, a broker certificate for 127.0.0.1, a client certificate, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("edgefleet test CA", ca_key, None, ca=True)
    ca, _ = _write(directory, "ca", ca_cert, ca_key)
    issuer = (ca_cert.subject, ca_key)
    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server_cert, server_key_path = _write(
        directory, "server", _issue("broker", server_key, issuer, ip="127.0.0.1"), server_key
    )
    client_cert, client_key_path = _write(
        directory, "client", _issue("cam-01", client_key, issuer), client_key
    )
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca, _ = _write(
        directory, "other", _issue("someone else", other_key, None, ca=True), other_key
    )
    return Pki(ca, server_cert, server_key_path, client_cert, client_key_path, other_ca)


@dataclass(frozen=True)
class TlsBroker:
    broker: MosquittoBroker
    tls_url: str


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsBroker]:
    port = free_port()
    extra = (
        f"listener {port} 127.0.0.1\n"
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        "require_certificate true\n"
    )
    with MosquittoBroker.running(tmp_path_factory.mktemp("tls-broker"), extra) as broker:
        yield TlsBroker(broker, f"mqtts://127.0.0.1:{port}")


def tls_link(tmp_path: Path, settings: MqttSettings) -> AgentLink:
    return AgentLink(
        unique_device_id(),
        settings,
        Outbox(tmp_path / "outbox", 1 << 20),
        on_directive=lambda payload: None,
        on_fleet_timestamp=lambda payload: None,
        backoff=Backoff(initial=0.05, maximum=0.3),
        poll_interval=0.1,
        connect_timeout=2.0,
    )


def test_mutual_tls_connects_and_publishes_presence(
    tmp_path: Path, tls_broker: TlsBroker, pki: Pki
) -> None:
    settings = MqttSettings(
        url=tls_broker.tls_url, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
    )
    link = tls_link(tmp_path, settings)
    observer = Observer(tls_broker.broker.url, [link.topics.presence])  # the plain listener
    try:
        link.start()
        assert link.wait_connected(10), link.counters().last_problem
        assert observer.wait_for(lambda: observer.on(link.topics.presence) == [b"online"])
    finally:
        link.stop()
        observer.close()


@pytest.mark.parametrize("case", ["no client certificate", "broker not signed by our CA"])
def test_tls_refusals_keep_the_link_disconnected(
    tmp_path: Path, tls_broker: TlsBroker, pki: Pki, case: str
) -> None:
    if case == "no client certificate":
        settings = MqttSettings(url=tls_broker.tls_url, ca_file=pki.ca)
    else:
        settings = MqttSettings(
            url=tls_broker.tls_url,
            ca_file=pki.other_ca,
            cert_file=pki.client_cert,
            key_file=pki.client_key,
        )
    link = tls_link(tmp_path, settings)
    link.start()
    try:
        assert not link.wait_connected(1.5)
        assert link.counters().connects == 0 and link.counters().last_problem
    finally:
        link.stop()


def test_missing_tls_files_are_a_config_error(tmp_path: Path) -> None:
    settings = MqttSettings(url="mqtts://127.0.0.1:8883", ca_file=tmp_path / "missing.crt")
    with pytest.raises(ConfigError, match="TLS"):
        tls_link(tmp_path, settings)
