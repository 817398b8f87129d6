"""Devices' client certificates: issued at enrollment, renewed by a signed request, revoked
when the device is removed (the CRL file, the reload command, GET /ca/crl)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import sys
import types
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from edgefleet.certwire import renewal_request
from edgefleet.fleetca import FleetCa, init_ca, make_key_and_csr
from edgefleet.mqtt.devicesig import DeviceKey
from edgefleet.samplewire import META_HEADER
from edgefleet.server.certificates import CrlFile, revocation_list
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import Device, DeviceCertificate
from edgefleet.server.principals import Role
from edgefleet.server.settings import ServerSettings
from edgefleet.trust import TrustRoot
from tests.agent.broker import free_port
from tests.clirun import Cli
from tests.server.apiclient import Api, make_api


@pytest.fixture
def fleet_ca(tmp_path: Path) -> FleetCa:
    return init_ca(tmp_path / "ca")


@pytest.fixture
def api(sqlite_database: Database, tmp_path: Path, trust: TrustRoot, fleet_ca: FleetCa) -> Api:
    api = make_api(sqlite_database, tmp_path, trust)
    api.context.ca = fleet_ca
    return api


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def enroll_with_csr(api: Api, device_id: str, key: DeviceKey, csr: bytes) -> x509.Certificate:
    answer = api.enroll(device_id, public_key=key.public_hex, csr=csr.decode())
    assert answer.status_code in (200, 201), answer.text
    return x509.load_pem_x509_certificate(answer.json()["certificate"].encode())


def renew(api: Api, device_id: str, key: DeviceKey, csr: bytes) -> httpx.Response:
    body, headers = renewal_request(device_id, csr, key)
    response: httpx.Response = api.post(
        f"/devices/{device_id}/certificate", None, content=body, headers=headers
    )
    return response


def test_enrollment_with_a_csr_gets_a_certificate_named_by_the_server(
    api: Api, fleet_ca: FleetCa
) -> None:
    _tls_key, csr = make_key_and_csr("server:edgefleet")  # asks for another identity
    answer = api.enroll("cam-1", csr=csr.decode(), tags={"site": "lab"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert (body["id"], body["tags"]) == ("cam-1", {"site": "lab"})  # the device fields stay
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert common_name(cert) == "cam-1"
    cert.verify_directly_issued_by(fleet_ca.certificate)  # chains to the fleet CA
    assert cert.public_key() == x509.load_pem_x509_csr(csr).public_key()
    assert body["ca_certificate"] == fleet_ca.certificate_pem.decode()
    assert dt.datetime.fromisoformat(body["certificate_not_after"]) == cert.not_valid_after_utc
    with api.context.db.session() as session:
        row = session.scalars(select(DeviceCertificate)).one()
        assert (row.serial, row.device_id) == (format(cert.serial_number, "x"), "cam-1")
        assert row.revoked_at is None


def test_a_repeated_enrollment_gets_a_certificate_only_soon_after_the_first(api: Api) -> None:
    key = DeviceKey.generate()
    _tls_key, csr = make_key_and_csr("cam-1")
    first = enroll_with_csr(api, "cam-1", key, csr)
    again = enroll_with_csr(api, "cam-1", key, csr)  # an agent whose answer was lost
    assert again.serial_number != first.serial_number
    api.clock.advance(2 * 3600)  # later, knowing the public key is not enough
    late = api.enroll("cam-1", public_key=key.public_hex, csr=csr.decode())
    assert late.status_code == 200 and late.json()["certificate"] is None


def test_without_a_ca_or_a_csr_the_answer_has_no_certificate(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust)
    _tls_key, csr = make_key_and_csr("cam-1")
    for device_id, extra in (("cam-1", {"csr": csr.decode()}), ("cam-2", {})):
        answer = api.enroll(device_id, **extra)
        assert answer.status_code == 201, answer.text
        fields = {k: answer.json()[k] for k in ("certificate", "certificate_not_after")}
        assert fields == {"certificate": None, "certificate_not_after": None}
        assert answer.json()["ca_certificate"] is None


def rsa_csr() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-1")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("csr", "reason"),
    [
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "PEM"),
        (rsa_csr(), "not ECDSA P-256"),
    ],
)
def test_a_bad_csr_is_422_and_enrolls_nothing(
    sqlite_database: Database,
    tmp_path: Path,
    trust: TrustRoot,
    fleet_ca: FleetCa,
    csr: str,
    reason: str,
) -> None:
    api = make_api(sqlite_database, tmp_path, trust, open_enrollment=False)
    api.context.ca = fleet_ca
    token = api.post("/enroll-tokens", Role.OPERATOR, json={"ttl_s": 600}).json()["token"]
    refused = api.enroll("cam-1", enroll_token=token, csr=csr)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"] == "invalid-request" and reason in refused.json()["detail"]
    with api.context.db.session() as session:
        assert session.scalars(select(Device)).all() == []
        assert session.scalars(select(DeviceCertificate)).all() == []
    assert api.enroll("cam-1", enroll_token=token).status_code == 201  # the token is unused


def test_a_signed_renewal_issues_a_new_certificate_and_keeps_the_old(
    api: Api, fleet_ca: FleetCa
) -> None:
    key = DeviceKey.generate()
    first = enroll_with_csr(api, "cam-1", key, make_key_and_csr("cam-1")[1])
    renewed = renew(api, "cam-1", key, make_key_and_csr("other-name")[1])
    assert renewed.status_code == 200, renewed.text
    cert = x509.load_pem_x509_certificate(renewed.json()["certificate"].encode())
    assert common_name(cert) == "cam-1" and cert.serial_number != first.serial_number
    cert.verify_directly_issued_by(fleet_ca.certificate)
    with api.context.db.session() as session:
        rows = session.scalars(select(DeviceCertificate)).all()
        assert {row.serial for row in rows} == {
            format(first.serial_number, "x"),
            format(cert.serial_number, "x"),
        }
        assert all(row.revoked_at is None for row in rows)


def test_a_renewal_needs_the_device_signature_an_enrolled_device_and_a_ca(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot, fleet_ca: FleetCa
) -> None:
    api = make_api(sqlite_database, tmp_path, trust)
    key = DeviceKey.generate()
    assert api.enroll("cam-1", public_key=key.public_hex).status_code == 201
    csr = make_key_and_csr("cam-1")[1]
    no_ca = renew(api, "cam-1", key, csr)
    assert no_ca.status_code == 409, no_ca.text
    api.context.ca = fleet_ca
    impostor = renew(api, "cam-1", DeviceKey.generate(), csr)
    assert impostor.status_code == 401, impostor.text
    assert renew(api, "cam-404", key, csr).status_code == 404
    body, headers = renewal_request("cam-1", csr, key)
    other_body = json.dumps({"csr": make_key_and_csr("cam-1")[1].decode()}).encode()
    swapped = api.post("/devices/cam-1/certificate", None, content=other_body, headers=headers)
    assert swapped.status_code == 422, swapped.text  # the signature names another body
    meta = json.loads(headers[META_HEADER])
    assert meta["sha256"] == hashlib.sha256(body).hexdigest()
    with api.context.db.session() as session:
        assert session.scalars(select(DeviceCertificate)).all() == []


def test_removal_revokes_writes_the_crl_and_tells_the_broker(
    api: Api, fleet_ca: FleetCa, tmp_path: Path
) -> None:
    marker = tmp_path / "reloaded"
    crl_path = tmp_path / "broker" / "crl.pem"
    crl_path.parent.mkdir()
    reload = (sys.executable, "-c", f"open({str(marker)!r}, 'a').write('reload\\n')")
    api.context.crl = CrlFile(api.context.db, fleet_ca, crl_path, reload, clock=api.clock)
    api.context.crl.refresh()  # as at start
    assert marker.read_text() == "reload\n"
    assert list(x509.load_pem_x509_crl(crl_path.read_bytes())) == []
    key = DeviceKey.generate()
    first = enroll_with_csr(api, "cam-1", key, make_key_and_csr("cam-1")[1])
    renewed = renew(api, "cam-1", key, make_key_and_csr("cam-1")[1])
    second = x509.load_pem_x509_certificate(renewed.json()["certificate"].encode())
    bystander = enroll_with_csr(api, "cam-2", DeviceKey.generate(), make_key_and_csr("c")[1])

    assert api.delete("/devices/cam-1", Role.OPERATOR).status_code == 204

    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert crl.is_signature_valid(fleet_ca.certificate.public_key())  # type: ignore[arg-type]
    # Valid until the CA expires: the broker would refuse everyone past its next update.
    assert crl.next_update_utc == fleet_ca.certificate.not_valid_after_utc
    revoked = {entry.serial_number for entry in crl}
    assert revoked == {first.serial_number, second.serial_number}
    assert bystander.serial_number not in revoked
    assert marker.read_text() == "reload\nreload\n"
    served = x509.load_pem_x509_crl(api.get("/ca/crl", None).content)
    assert {entry.serial_number for entry in served} == revoked
    audit = [e for e in api.get("/audit").json() if e["action"] == "device.remove"]
    assert sorted(audit[0]["details"]["revoked_certificates"]) == sorted(
        format(serial, "x") for serial in revoked
    )


def test_a_failing_reload_command_is_logged_and_the_removal_stands(
    api: Api, fleet_ca: FleetCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crl_path = tmp_path / "crl.pem"
    failing = (sys.executable, "-c", "import sys; sys.exit('mosquitto is not running')")
    api.context.crl = CrlFile(api.context.db, fleet_ca, crl_path, failing, clock=api.clock)
    enroll_with_csr(api, "cam-1", DeviceKey.generate(), make_key_and_csr("cam-1")[1])
    with caplog.at_level(logging.ERROR, logger="edgefleet.server.certificates"):
        assert api.delete("/devices/cam-1", Role.OPERATOR).status_code == 204
    (record,) = caplog.records
    assert "exited with 1: mosquitto is not running" in record.getMessage()
    assert len(list(x509.load_pem_x509_crl(crl_path.read_bytes()))) == 1


def test_the_crl_leaves_out_expired_certificates(api: Api, fleet_ca: FleetCa) -> None:
    enroll_with_csr(api, "cam-1", DeviceKey.generate(), make_key_and_csr("cam-1")[1])
    assert api.delete("/devices/cam-1", Role.OPERATOR).status_code == 204
    with api.context.db.session() as session:
        now = api.clock()
        assert len(list(x509.load_pem_x509_crl(revocation_list(session, fleet_ca, now)))) == 1
        later = now + dt.timedelta(days=91)  # past the device certificate's lifetime
        assert list(x509.load_pem_x509_crl(revocation_list(session, fleet_ca, later))) == []


def test_the_ca_certificate_and_crl_are_public_and_409_without_a_ca(
    api: Api, fleet_ca: FleetCa, tmp_path: Path
) -> None:
    served = api.get("/ca/certificate", None)
    assert served.status_code == 200 and served.content == (tmp_path / "ca" / "ca.crt").read_bytes()
    crl = api.get("/ca/crl", None)
    assert crl.status_code == 200
    assert x509.load_pem_x509_crl(crl.content).issuer == fleet_ca.certificate.subject
    api.context.ca = None
    for path in ("/ca/certificate", "/ca/crl"):
        response = api.get(path, None)
        assert response.status_code == 409 and "--ca" in response.json()["detail"]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def test_server_run_takes_the_ca_the_crl_and_the_reload_command(
    run: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust, key = tmp_path / "trust.json", tmp_path / "server.key"
    trust.write_text("{}")
    key.write_text("")
    received: list[ServerSettings] = []
    # The runner has tests of its own: stand in for it with its interface, run_server(settings).
    runner = types.ModuleType("edgefleet.server.runner")
    runner.run_server = received.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edgefleet.server.runner", runner)
    (tmp_path / "ca").mkdir()
    base = ("server", "run", "--trust", trust, "--server-key", key, "--data", tmp_path / "d")
    run(*base, "--ca", tmp_path / "ca", "--crl", tmp_path / "crl.pem",
        "--broker-reload-command", "systemctl kill -s HUP 'mosquitto.service'")  # fmt: skip
    (settings,) = received
    assert (settings.ca_dir, settings.crl_path) == (tmp_path / "ca", tmp_path / "crl.pem")
    assert settings.broker_reload_command == ("systemctl", "kill", "-s", "HUP", "mosquitto.service")
    for options, message in [
        (("--crl", tmp_path / "crl.pem"), "--crl needs --ca"),
        (("--ca", tmp_path / "ca", "--broker-reload-command", "true"), "needs --crl"),
        (("--ca", tmp_path / "ca", "--crl", tmp_path / "c", "--broker-reload-command", "'x"),
         "--broker-reload-command"),
    ]:  # fmt: skip
        _, err = run(*base, *options, status=2)
        assert err.count("\n") == 1 and message in err
    assert len(received) == 1


def test_server_run_refuses_a_ca_directory_without_a_ca(run: Cli, tmp_path: Path) -> None:
    run("keys", "init", tmp_path / "keys")
    (tmp_path / "empty").mkdir()
    _, err = run(
        "server", "run", "--embedded-broker", "--mqtt-port", str(free_port()), "--port", "0",
        "--data", tmp_path / "d", "--trust", tmp_path / "keys" / "trust.json", "--server-key",
        tmp_path / "keys" / "server.key", "--ca", tmp_path / "empty", status=2,
    )  # fmt: skip
    assert err.count("\n") == 1 and "edgefleet ca init" in err, err
